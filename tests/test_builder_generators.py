"""CoProV2 builder, language-model generators: a tiny random causal LM through transformers, and an
OpenAI-compatible endpoint served by a local http.server with canned (partly malformed) answers."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from safetydpo.data.builder import BuildError, Concept, PairValidator, PromptPair, load_build_config, load_taxonomy
from safetydpo.data.builder.generators import build_generator
from safetydpo.data.builder.generators.instruction import DEFAULT_INSTRUCTION
from safetydpo.data.builder.pairs import collect_pairs, generate_pairs

BLOOD = Concept(category="violence", name="blood", substitutes=("red paint",))


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 1-layer GPT-2 with a word-level tokenizer over the instruction's words,
    both built in code and saved like any local model (a small vocabulary keeps sampling fast)."""
    words = sorted(set(DEFAULT_INSTRUCTION.replace(":", " : ").split()) | {"UNSAFE", "SAFE", "blood", "gore", "red", "paint"})
    vocab = {word: index for index, word in enumerate(["[UNK]", "[PAD]", "[EOS]", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")
    config = GPT2Config(vocab_size=len(vocab), n_layer=1, n_embd=32, n_head=2, n_positions=256, bos_token_id=2, eos_token_id=2)
    folder = tmp_path_factory.mktemp("tiny-lm")
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_transformers_generator_retries_and_accounts_for_every_candidate(
    tmp_path: Path, tiny_pipeline_dir: Path, tiny_lm_dir: Path
) -> None:
    taxonomy = tmp_path / "taxonomy.yaml"
    taxonomy.write_text(yaml.safe_dump({"violence": {"blood": ["red paint"], "gore": ["red flowers"]}}))
    config_path = tmp_path / "data.yaml"
    config_path.write_text(
        yaml.safe_dump(
            {
                "output": str(tmp_path / "out"),
                "taxonomy": str(taxonomy),
                "generator": {"name": "transformers", "model": str(tiny_lm_dir), "max_new_tokens": 16, "device": "cpu"},
                "pairs": {"per_concept": 2, "attempts_per_pair": 3, "batch_size": 4},
                "render": {"base_model": str(tiny_pipeline_dir)},
            }
        )
    )
    config = load_build_config(config_path)
    validator = PairValidator(min_similarity=config.pairs.min_similarity, max_words=config.pairs.max_words)

    def run(folder: str) -> tuple[list[dict[str, str]], dict[str, Any]]:
        concepts = load_taxonomy(taxonomy)
        return generate_pairs(tmp_path / folder, concepts, build_generator(config.generator), validator, 2, 3, 4)

    rows, report = run("first")
    budget = 2 * 3
    for name, stats in report["concepts"].items():
        assert stats["accepted"] + sum(stats["rejected"].values()) == stats["candidates"], name
        assert stats["candidates"] <= budget
        if stats["accepted"] < 2:
            assert stats["candidates"] == budget, f"{name}: bad output must be retried until the budget is spent"
            assert name in report["shortfall"]
    assert report["rejected"].get("unparsable", 0) > 0, "a random LM's answers are garbage and are counted as such"
    for row in rows:
        assert row["concept"] in ("blood", "gore")
        assert validator.rejection(PromptPair(row["unsafe_prompt"], row["safe_prompt"]), row["concept"]) is None
    assert run("second") == (rows, report), "seeded sampling proposes the same candidates on every run"


def test_transformers_generator_names_a_missing_model_folder() -> None:
    with pytest.raises(BuildError, match="generator.model '/no/such/lm' is neither a folder nor a hub id"):
        build_generator({"name": "transformers", "model": "/no/such/lm"})


class CannedChatServer(ThreadingHTTPServer):
    """Answers each POST with the next canned (status, body) for the request's ``seed`` (the candidate
    number), so concurrent requests get the same answers in any arrival order; records every request."""

    def __init__(self, answers: dict[int, list[tuple[int, Any]]]) -> None:
        super().__init__(("127.0.0.1", 0), CannedChatHandler)
        self.answers = {seed: list(queue) for seed, queue in answers.items()}
        self.requests: list[dict[str, Any]] = []

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class CannedChatHandler(BaseHTTPRequestHandler):
    server: CannedChatServer

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        status, payload = self.server.answers[body["seed"]].pop(0)
        data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        """Keep test output quiet."""


def completion(content: str) -> tuple[int, dict[str, Any]]:
    return 200, {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}


@pytest.fixture
def chat_server(request: pytest.FixtureRequest) -> Iterator[CannedChatServer]:
    server = CannedChatServer(request.param)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


GOOD = "UNSAFE: a photo of blood on a street at night\nSAFE: a photo of red paint on a street at night"
GOOD_JSON = json.dumps({"unsafe": "a knife covered in blood in a kitchen", "safe": "a knife covered in red paint in a kitchen"})


@pytest.mark.parametrize(
    "chat_server",
    [
        {
            0: [completion("I'm sorry, I can't help with that.")],  # no labelled lines: unparsable
            1: [(200, {"error": "model overloaded"})],  # not a chat completion: unparsable
            2: [(503, {"error": "busy"}), completion(GOOD)],  # transport failure: retried, not a candidate
            3: [completion(GOOD.upper())],  # same unsafe prompt: duplicate
            4: [completion("UNSAFE: blood everywhere\nSAFE: a bloody mess")],  # concept in the safe prompt
            5: [completion(f"Here you go:\n```json\n{GOOD_JSON}\n```")],
        }
    ],
    indirect=True,
)
def test_openai_generator_retries_bad_answers(chat_server: CannedChatServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAFETYDPO_TEST_KEY", "sk-test")
    spec = {"name": "openai", "base_url": chat_server.base_url, "model": "tiny-chat", "api_key_env": "SAFETYDPO_TEST_KEY", "max_retries": 2}
    result = collect_pairs(build_generator(spec), PairValidator(), BLOOD, count=2, attempts_per_pair=4, batch_size=8)
    assert result.pairs == [
        ["a photo of blood on a street at night", "a photo of red paint on a street at night"],
        ["a knife covered in blood in a kitchen", "a knife covered in red paint in a kitchen"],
    ]
    assert result.candidates == 6
    assert result.rejected == {"concept_in_safe": 1, "duplicate": 1, "unparsable": 2}
    assert not any(chat_server.answers.values()) and len(chat_server.requests) == 7
    first = chat_server.requests[0]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer sk-test"
    assert first["body"]["model"] == "tiny-chat" and "Concept: blood" in first["body"]["messages"][0]["content"]


@pytest.mark.parametrize("chat_server", [{0: [(401, {"error": {"message": "invalid api key"}})]}], indirect=True)
def test_openai_generator_stops_on_a_rejected_key(chat_server: CannedChatServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAFETYDPO_TEST_KEY", "sk-wrong")
    generator = build_generator({"name": "openai", "base_url": chat_server.base_url, "model": "m", "api_key_env": "SAFETYDPO_TEST_KEY"})
    with pytest.raises(BuildError, match=r"/v1/chat/completions answered HTTP 401: .*invalid api key") as err:
        generator.propose(BLOOD, 0, 1)
    assert "\n" not in str(err.value)


def test_openai_generator_names_the_missing_key_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SAFETYDPO_UNSET_KEY", raising=False)
    with pytest.raises(BuildError, match=r"environment variable SAFETYDPO_UNSET_KEY \(generator.api_key_env\) is not set"):
        build_generator({"name": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m", "api_key_env": "SAFETYDPO_UNSET_KEY"})
