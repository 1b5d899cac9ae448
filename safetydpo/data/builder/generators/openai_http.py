"""Pair generation through an OpenAI-compatible ``/chat/completions`` endpoint (vLLM, TGI, llama.cpp, OpenAI)."""

from __future__ import annotations

import contextlib
import email.utils
import http.client
import json
import math
import os
import socket
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

from safetydpo.data.builder.errors import BuildError
from safetydpo.data.builder.generators.base import GENERATORS, PairGenerator
from safetydpo.data.builder.generators.instruction import DEFAULT_INSTRUCTION, check_instruction, parse_pair, render_instruction
from safetydpo.data.builder.records import Concept, PromptPair

#: Statuses worth retrying: rate limits and server-side trouble.
RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
#: Longest ``Retry-After`` wait honoured (seconds): a longer one is cut to it, so a build never stalls for hours.
MAX_RETRY_AFTER = 120.0


class _Retry(Exception):
    """A failed attempt worth repeating; ``wait`` is what the server's ``Retry-After`` asked for (seconds)."""

    def __init__(self, reason: str, wait: float = 0.0) -> None:
        super().__init__(reason)
        self.reason, self.wait = reason, wait


def retry_after(value: str | None) -> float:
    """The seconds a ``Retry-After`` header asks for (a number or an HTTP date), capped at ``MAX_RETRY_AFTER``; 0 if absent or unreadable."""
    if not value:
        return 0.0
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return 0.0
        when = when if when.tzinfo else when.replace(tzinfo=timezone.utc)
        seconds = (when - datetime.now(timezone.utc)).total_seconds()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER) if math.isfinite(seconds) else 0.0


@GENERATORS.register("openai")
class OpenAIChatGenerator(PairGenerator):
    """One chat completion per candidate, ``concurrency`` requests in flight; a malformed answer is an
    unparsable candidate, not an error.

    Transport failures (connection errors, dropped connections, truncated or non-UTF-8 bodies, the
    whole-request deadline, rate limits, 5xx) are retried with exponential back-off, at least as long
    as the server's ``Retry-After``; other HTTP errors (a wrong key, model or URL) stop the build with
    the status and the server's message. Redirects are never followed: that would send the API key
    (and, as urllib does, a body-less GET) to wherever the server points.

    Args:
        base_url: endpoint root, e.g. ``http://localhost:8000/v1``; ``/chat/completions`` is appended.
        model: model name the server expects.
        api_key_env: environment variable holding the API key (sent as a Bearer token); ``null``
            for servers without authentication.
        template: the instruction, with ``{category}``, ``{concept}``, ``{substitutes}``.
        temperature: sampling temperature.
        max_tokens: answer length limit.
        timeout: seconds one whole request may take (connect, send, the complete answer).
        max_retries: retries of one request after a transport failure (0 = one attempt).
        concurrency: requests in flight at once (candidates keep their order whatever finishes first).
        seed: base of the per-request ``seed`` (honoured by servers that support it).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        template: str = DEFAULT_INSTRUCTION,
        temperature: float = 1.0,
        max_tokens: int = 128,
        timeout: float = 60.0,
        max_retries: int = 4,
        concurrency: int = 4,
        seed: int = 0,
    ) -> None:
        check_instruction(template)
        for key, value in {"concurrency": concurrency, "max_tokens": max_tokens}.items():
            if value < 1:
                raise BuildError(f"generator.{key} must be at least 1, got {value}")
        if max_retries < 0:
            raise BuildError(f"generator.max_retries must be at least 0 (0 = no retry), got {max_retries}")
        if not (math.isfinite(timeout) and timeout > 0):
            raise BuildError(f"generator.timeout must be a positive number of seconds, got {timeout}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        parts = urllib.parse.urlsplit(self.url)
        try:
            port = parts.port
        except ValueError:
            port = -1
        if parts.scheme not in ("http", "https") or not parts.hostname or port == -1:
            raise BuildError(f"generator.base_url must be an http:// or https:// URL such as http://localhost:8000/v1, got {base_url!r}")
        self.api_key = os.environ.get(api_key_env, "") if api_key_env else ""
        if api_key_env and not self.api_key:
            raise BuildError(f"environment variable {api_key_env} (generator.api_key_env) is not set")
        connection = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self._connect = lambda: connection(parts.hostname, port, timeout=timeout)
        self._path = urllib.parse.urlunsplit(("", "", parts.path, parts.query, ""))
        self.model, self.template, self.temperature, self.max_tokens = model, template, temperature, max_tokens
        self.timeout, self.max_retries, self.concurrency, self.seed = timeout, max_retries, concurrency, seed

    def propose(self, concept: Concept, start: int, count: int) -> list[PromptPair | None]:
        instruction = render_instruction(self.template, concept)
        with ThreadPoolExecutor(self.concurrency) as pool:
            answers = list(pool.map(lambda number: self._complete(instruction, self.seed + number), range(start, start + count)))
        return [parse_pair(answer) for answer in answers]

    def _complete(self, instruction: str, seed: int) -> str | None:
        """The first choice's message content, or ``None`` when the response is not a chat completion."""
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": instruction}],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "seed": seed,
        }
        payload = self._post(json.dumps(body).encode("utf-8"))
        try:
            content = payload["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            return None
        return content if isinstance(content, str) else None

    def _post(self, payload: bytes) -> Any:
        """The decoded JSON answer (``None`` when it is not JSON), retrying transport failures."""
        attempt = 0
        while True:
            try:
                return self._attempt(payload)
            except _Retry as failure:
                if attempt == self.max_retries:
                    raise BuildError(
                        f"{self.url} {failure.reason} ({attempt + 1} attempt(s)); check the server, "
                        "or raise generator.max_retries / generator.timeout"
                    ) from None
                time.sleep(max(0.5 * 2**attempt, failure.wait))
                attempt += 1

    def _attempt(self, payload: bytes) -> Any:
        status, headers, data = self._exchange(payload)
        if 300 <= status < 400:
            raise BuildError(
                f"{self.url} answered HTTP {status} (redirect to {headers.get('Location')}); redirects are not followed, "
                "so the API key never goes elsewhere: set generator.base_url to the final URL"
            )
        if status in RETRYABLE_STATUS:
            raise _Retry(f"answered HTTP {status}: {_detail(data)}", retry_after(headers.get("Retry-After")))
        if not 200 <= status < 300:
            raise BuildError(f"{self.url} answered HTTP {status}: {_detail(data)}")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise _Retry("answered a body that is not valid UTF-8") from None
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return None

    def _exchange(self, payload: bytes) -> tuple[int, http.client.HTTPMessage, bytes]:
        """One POST within ``timeout`` seconds in all (a socket timeout alone is per read: a server
        sending one byte at a time would hold the request forever); raises ``_Retry`` on any failure."""
        connection = self._connect()
        expired = threading.Event()
        sockets: list[socket.socket] = []  # kept here: the connection drops its own once the answer's headers are in

        def abort() -> None:
            expired.set()
            for sock in sockets:  # the plain socket's shutdown wakes a blocked read, TLS or not
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)

        timer = threading.Timer(self.timeout, abort)
        timer.daemon = True
        timer.start()
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})}
        try:
            connection.connect()
            sockets.append(connection.sock)
            if expired.is_set():
                raise TimeoutError
            connection.request("POST", self._path, body=payload, headers=headers)
            response = connection.getresponse()
            data = response.read()
            if expired.is_set():
                raise TimeoutError
        except (OSError, http.client.HTTPException) as err:
            if expired.is_set():
                raise _Retry(f"gave no complete answer within generator.timeout ({self.timeout:g} s)") from None
            raise _Retry(f"failed: {type(err).__name__}: {err}") from None
        finally:
            timer.cancel()
            connection.close()
        return response.status, response.headers, data


def _detail(data: bytes) -> str:
    """The start of an error body, on one line."""
    return " ".join(data.decode("utf-8", errors="replace")[:200].split())
