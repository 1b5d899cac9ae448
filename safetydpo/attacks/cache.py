"""The attack cache: one JSON line per attacked prompt, appended as each prompt finishes.

A rerun reuses every line that matches the prompt, attack, budget and target, so a killed attack
resumes at the first unfinished prompt; a line written by another configuration is an error rather
than a silently mixed result. Each line is written by a single ``write`` and synced, so a kill leaves
at most a truncated last line, which loading drops (the file is rewritten atomically without it).
Any other unreadable line is one error naming ``file:line``. A cache is also the input of a transfer
attack: another evaluation replays its adversarial prompts against its own models.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from safetydpo.attacks.base import AttackError, AttackOutcome
from safetydpo.io import atomic_file

#: Format tag written in every line.
CACHE_FORMAT = "safetydpo.attack/1"


@dataclass(frozen=True)
class CachedAttack:
    """One attacked prompt: what was attacked, how, against which model, and what came out."""

    prompt: str
    prompt_index: int
    adversarial_prompt: str
    attack: str
    target: dict[str, Any]
    """The attacked model: its name and what identifies its weights (pipeline folder, LoRA content hash)."""
    budget: dict[str, Any]
    seed: int
    """The seed of this prompt's generator (derived from the attack's seed and the prompt)."""
    objective: float
    history: list[float]
    higher_is_better: bool

    @classmethod
    def from_outcome(
        cls, prompt: str, prompt_index: int, attack: str, target: dict[str, Any], budget: dict[str, Any], seed: int, outcome: AttackOutcome
    ) -> CachedAttack:
        return cls(prompt, prompt_index, outcome.adversarial_prompt, attack, target, budget, seed, outcome.objective,
                   list(outcome.history), outcome.higher_is_better)

    def line(self) -> str:
        return json.dumps({"format": CACHE_FORMAT, **asdict(self)}, sort_keys=True) + "\n"


_FIELDS = tuple(f.name for f in fields(CachedAttack))


def _parse(text: str, where: str) -> CachedAttack:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise AttackError(f"{where}: not a JSON line ({err.msg}); delete the line (or the file) and rerun to attack that prompt again") from None
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
        raise AttackError(f"{where}: not an attack cache line of format {CACHE_FORMAT}; delete the file or point to an attack cache")
    missing = [name for name in _FIELDS if name not in data]
    if missing:
        raise AttackError(f"{where}: the line lacks {', '.join(missing)}; delete the line (or the file) and rerun")
    return CachedAttack(**{name: data[name] for name in _FIELDS})


def read_cache(path: Path) -> list[CachedAttack]:
    """Every complete line of the cache ``path`` (none if it does not exist); a truncated last line is dropped from the file."""
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    entries = []
    for number, line in enumerate(lines[:-1], start=1):
        if line.strip():
            entries.append(_parse(line, f"{path}:{number}"))
    tail = lines[-1]
    if tail:  # no final newline: the process was killed while writing this line
        try:
            entries.append(_parse(tail, f"{path}:{len(lines)}"))
        except AttackError:
            pass
        with atomic_file(path) as tmp:
            tmp.write_text("".join(entry.line() for entry in entries), encoding="utf-8")
    return entries


def append_entry(path: Path, entry: CachedAttack) -> None:
    """Add one line to the cache in a single synced write (the unit a kill can truncate)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(descriptor, entry.line().encode("utf-8"))
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def reusable(entries: list[CachedAttack], path: Path, attack: str, target: dict[str, Any]) -> dict[int, CachedAttack]:
    """The cached prompts by prompt index, refusing lines from another attack or target (budgets are checked per prompt)."""
    found: dict[int, CachedAttack] = {}
    for number, entry in enumerate(entries, start=1):
        if entry.attack != attack or entry.target != target:
            what = "attack" if entry.attack != attack else "target model"
            raise AttackError(
                f"{path}: line {number} was written for another {what} ({entry.attack} on {entry.target.get('name')}); "
                "delete the file or give this attack another label"
            )
        found[entry.prompt_index] = entry
    return found


def check_reuse(entry: CachedAttack, path: Path, prompt: str, budget: dict[str, Any]) -> None:
    """A cached line must be for this prompt and this budget; otherwise the cache belongs to another run."""
    if entry.prompt != prompt:
        raise AttackError(
            f"{path}: prompt #{entry.prompt_index} is cached as '{entry.prompt[:60]}' but the prompt set now says '{prompt[:60]}'; "
            "delete the file or give this attack another label"
        )
    if entry.budget != budget:
        changed = sorted(key for key in budget.keys() | entry.budget.keys() if budget.get(key) != entry.budget.get(key))
        raise AttackError(
            f"{path}: prompt #{entry.prompt_index} was attacked with another budget ({', '.join(changed)} differ); "
            "delete the file or give this attack another label"
        )
