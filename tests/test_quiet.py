"""Expected library messages are silenced narrowly: other warnings still show, and --verbose shows everything."""

from __future__ import annotations

import logging
import warnings

import pytest

from safetydpo import quiet
from safetydpo.cli.main import main


def shown(*messages: str) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        quiet.ignore_warnings(r"expected noise \d+")
        for message in messages:
            warnings.warn(message, UserWarning, stacklevel=1)
    return [str(warning.message) for warning in caught]


def test_only_the_named_warning_is_ignored() -> None:
    assert shown("expected noise 12", "a genuinely new warning") == ["a genuinely new warning"]


def test_verbose_shows_the_ignored_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(quiet.VERBOSE_ENV, "1")
    assert shown("expected noise 12") == ["expected noise 12"]


def test_log_records_are_dropped_by_pattern_only(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("safetydpo.tests.quiet")
    quiet.drop_log_messages(logger.name, r"^💡 Tip: ")
    quiet.drop_log_messages(logger.name, r"^💡 Tip: ")
    with caplog.at_level(logging.INFO, logger=logger.name):
        logger.info("💡 Tip: buy our cloud")
        logger.info("GPU available: False")
    assert [record.getMessage() for record in caplog.records] == ["GPU available: False"]
    assert len(quiet._log_filters[logger.name].patterns) == 1, "a repeated call adds nothing twice"


def test_verbose_flag_reaches_the_command(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(quiet.VERBOSE_ENV, "0")  # recorded, so the flag's "1" is undone after the test
    assert not quiet.verbose()
    with pytest.raises(SystemExit):
        main(["--verbose", "run", "--help"])
    assert quiet.verbose() and "--dry_run" in capsys.readouterr().out
