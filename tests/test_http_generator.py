"""The OpenAI-compatible generator against misbehaving servers on 127.0.0.1: redirects, dropped
connections, truncated and non-UTF-8 bodies, a server that dribbles, rate limits with Retry-After,
and settings that must fail as one line before any request."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from safetydpo.data.builder import BuildError, Concept, PromptPair, load_build_config
from safetydpo.data.builder.generators import build_generator
from safetydpo.data.builder.generators.openai_http import MAX_RETRY_AFTER, retry_after

BLOOD = Concept(category="violence", name="blood", substitutes=("red paint",))
UNSAFE, SAFE = "a photo of blood on a street at night", "a photo of red paint on a street at night"
GOOD = json.dumps({"choices": [{"message": {"role": "assistant", "content": f"UNSAFE: {UNSAFE}\nSAFE: {SAFE}"}}]}).encode()

Behaviour = Callable[["ScriptedHandler"], None]


class ScriptedServer(ThreadingHTTPServer):
    """Serves each request with the next behaviour of its script and records method, path and Authorization."""

    def __init__(self, script: list[Behaviour]) -> None:
        super().__init__(("127.0.0.1", 0), ScriptedHandler)
        self.script = list(script)
        self.requests: list[tuple[str, str, str | None]] = []

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class ScriptedHandler(BaseHTTPRequestHandler):
    server: ScriptedServer

    def handle_any(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.requests.append((self.command, self.path, self.headers.get("Authorization")))
        self.server.script.pop(0)(self)

    do_GET = do_POST = handle_any  # noqa: N815 (http.server's naming)

    def log_message(self, *args: Any) -> None:
        """Keep test output quiet."""


def answer(body: bytes, status: int = 200, **headers: str) -> Behaviour:
    def behave(handler: ScriptedHandler) -> None:
        handler.send_response(status)
        for name, value in {"Content-Length": str(len(body)), **headers}.items():
            handler.send_header(name.replace("_", "-"), value)
        handler.end_headers()
        handler.wfile.write(body)

    return behave


def hang_up(handler: ScriptedHandler) -> None:
    """Close the connection without a status line (http.client: RemoteDisconnected)."""
    handler.close_connection = True


def truncate(handler: ScriptedHandler) -> None:
    """Promise 1000 bytes, send 10, close (http.client: IncompleteRead)."""
    handler.send_response(200)
    handler.send_header("Content-Length", "1000")
    handler.end_headers()
    handler.wfile.write(GOOD[:10])
    handler.close_connection = True


def dribble(handler: ScriptedHandler) -> None:
    """A complete, valid answer one byte every 0.2 s: no single read ever times out."""
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(GOOD)))
    handler.end_headers()
    try:
        for index in range(len(GOOD)):
            handler.wfile.write(GOOD[index : index + 1])
            handler.wfile.flush()
            time.sleep(0.2)
    except OSError:  # the client gave up
        handler.close_connection = True


@pytest.fixture
def serve() -> Iterator[Callable[[list[Behaviour]], ScriptedServer]]:
    servers: list[ScriptedServer] = []

    def start(script: list[Behaviour]) -> ScriptedServer:
        server = ScriptedServer(script)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def generator(server: ScriptedServer, monkeypatch: pytest.MonkeyPatch, **args: Any) -> Any:
    monkeypatch.setenv("SAFETYDPO_TEST_KEY", "sk-secret")
    return build_generator({"name": "openai", "base_url": server.base_url, "model": "m", "api_key_env": "SAFETYDPO_TEST_KEY", **args})


@pytest.mark.parametrize("status", [302, 307])
def test_a_redirect_is_not_followed_and_the_key_stays_with_the_configured_host(
    serve: Callable[[list[Behaviour]], ScriptedServer], monkeypatch: pytest.MonkeyPatch, status: int
) -> None:
    elsewhere = serve([answer(GOOD)])
    redirecting = serve([answer(b"", status, Location=f"{elsewhere.base_url}/chat/completions")])
    with pytest.raises(BuildError, match=rf"answered HTTP {status} \(redirect to {elsewhere.base_url}/chat/completions\); redirects are not followed") as err:
        generator(redirecting, monkeypatch).propose(BLOOD, 0, 1)
    assert "\n" not in str(err.value)
    assert redirecting.requests == [("POST", "/v1/chat/completions", "Bearer sk-secret")]
    assert elsewhere.requests == [], "the other host never saw a request, let alone the key"


def test_dropped_connections_truncated_and_non_utf8_bodies_are_retried(
    serve: Callable[[list[Behaviour]], ScriptedServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    not_utf8 = GOOD.replace(b"red paint", b"red \xff\xfe paint")
    server = serve([hang_up, truncate, answer(not_utf8), answer(GOOD)])
    assert generator(server, monkeypatch, max_retries=3).propose(BLOOD, 0, 1) == [PromptPair(UNSAFE, SAFE)]
    assert len(server.requests) == 4 and not server.script


def test_the_timeout_bounds_the_whole_request_not_each_read(
    serve: Callable[[list[Behaviour]], ScriptedServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = serve([dribble])  # the whole answer would take len(GOOD) * 0.2 s, about 40 s
    began = time.monotonic()
    with pytest.raises(BuildError, match=r"gave no complete answer within generator.timeout \(1 s\) \(1 attempt\(s\)\)"):
        generator(server, monkeypatch, timeout=1, max_retries=0).propose(BLOOD, 0, 1)
    assert time.monotonic() - began < 3


def test_a_429_waits_as_long_as_retry_after_asks(serve: Callable[[list[Behaviour]], ScriptedServer], monkeypatch: pytest.MonkeyPatch) -> None:
    server = serve([answer(b'{"error": "slow down"}', 429, Retry_After="1.5"), answer(GOOD)])
    began = time.monotonic()
    assert generator(server, monkeypatch, max_retries=1).propose(BLOOD, 0, 1) == [PromptPair(UNSAFE, SAFE)]
    assert time.monotonic() - began >= 1.5, "the back-off alone would have waited 0.5 s"


def test_retry_after_reads_seconds_and_http_dates() -> None:
    assert retry_after("2") == 2.0
    assert retry_after(None) == 0.0 and retry_after("soon") == 0.0 and retry_after("-5") == 0.0
    assert retry_after("86400") == MAX_RETRY_AFTER
    assert 0 < retry_after(time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))) <= 30
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past


def test_a_server_that_keeps_failing_is_one_line(serve: Callable[[list[Behaviour]], ScriptedServer], monkeypatch: pytest.MonkeyPatch) -> None:
    server = serve([hang_up, hang_up])
    with pytest.raises(BuildError, match=r"/v1/chat/completions failed: RemoteDisconnected: .* \(2 attempt\(s\)\); check the server") as err:
        generator(server, monkeypatch, max_retries=1).propose(BLOOD, 0, 1)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"max_retries": -1}, r"generator.max_retries must be at least 0 \(0 = no retry\), got -1"),
        ({"timeout": 0}, "generator.timeout must be a positive number of seconds, got 0"),
        ({"timeout": float("nan")}, "generator.timeout must be a positive number of seconds, got nan"),
        ({"max_tokens": 0}, "generator.max_tokens must be at least 1, got 0"),
        ({"base_url": "localhost:8000/v1"}, "generator.base_url must be an http:// or https:// URL"),
        ({"base_url": "http://:8000/v1"}, "generator.base_url must be an http:// or https:// URL"),
        ({"base_url": "http://localhost:port/v1"}, "generator.base_url must be an http:// or https:// URL"),
    ],
)
def test_bad_settings_fail_before_any_request(args: dict[str, Any], message: str) -> None:
    with pytest.raises(BuildError, match=message):
        build_generator({"name": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m", "api_key_env": None, **args})


def test_a_mistyped_generator_value_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model_index.json").write_text("{}")  # the config check only looks for this file
    (tmp_path / "taxonomy.yaml").write_text(yaml.safe_dump({"violence": {"blood": ["red paint"]}}))
    config = {
        "output": str(tmp_path / "out"),
        "taxonomy": str(tmp_path / "taxonomy.yaml"),
        "generator": {"name": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m", "timeout": "soon"},
        "render": {"base_model": str(tmp_path / "model")},
    }
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(BuildError, match=r"data.yaml: 'generator.timeout' must be float, got 'soon'"):
        load_build_config(tmp_path / "data.yaml")
