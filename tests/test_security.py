"""Configs and checkpoints never run code: class paths, callables and a resumed checkpoint's stored
hyper-parameters import only trusted packages (safetydpo, Lightning, torch.optim, installed plugins,
``SAFETYDPO_TRUSTED_IMPORTS``)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from fixtures_train import REPO, tiny_config, write_config

from safetydpo.lightning_cli import _ParseOnlyCLI, parse_fit_config
from safetydpo.registry import TRUSTED_IMPORTS_ENV, UntrustedImportError, trusted_imports


def plant(folder: Path, module: str) -> Path:
    """A module ``module`` in ``folder`` that, when imported, writes the returned marker file."""
    marker = folder / f"{module}.ran"
    (folder / f"{module}.py").write_text(
        "from pathlib import Path\nfrom lightning.pytorch import Callback\n"
        f"Path({str(marker)!r}).write_text('imported')\n\nclass Thing(Callback):\n    pass\n"
    )
    return marker


def fit_config(folder: Path, **changes: Any) -> Path:
    """configs/tiny.yaml (paths that need not exist: parsing builds nothing) with ``trainer`` keys changed."""
    config = tiny_config(folder, folder / "pipeline", folder / "data")
    config["trainer"].update(changes)
    return write_config(folder / "config.yaml", config)


def test_a_config_imports_only_trusted_packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = plant(tmp_path, "planted_callbacks")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(TRUSTED_IMPORTS_ENV, raising=False)
    config = fit_config(tmp_path, callbacks=[{"class_path": "planted_callbacks.Thing"}])
    with pytest.raises(Exception, match=rf"Importing 'planted_callbacks.Thing' is not allowed.*set {TRUSTED_IMPORTS_ENV}=PACKAGE"):
        parse_fit_config(["--config", str(config)])
    assert not marker.exists() and "planted_callbacks" not in sys.modules

    monkeypatch.setenv(TRUSTED_IMPORTS_ENV, "planted_callbacks")  # the user's own package, named by the user
    _, namespace = parse_fit_config(["--config", str(config)])
    assert marker.exists() and [cb.class_path for cb in namespace.trainer.callbacks] == ["planted_callbacks.Thing"]


@pytest.mark.parametrize(
    "trainer",
    [
        {"callbacks": [{"class_path": "lightning.pytorch.callbacks.LambdaCallback", "init_args": {"on_fit_start": "os.system"}}]},
        {"callbacks": [{"class_path": "subprocess.Popen", "init_args": {"args": ["touch", "pwned"]}}]},
        {"plugins": [{"class_path": "builtins.exec", "init_args": {"source": "print('pwned')"}}]},
    ],
)
def test_a_shared_config_cannot_name_a_command_runner(tmp_path: Path, trainer: dict[str, Any]) -> None:
    with pytest.raises(Exception, match=r"Importing '(os.system|subprocess.Popen|builtins.exec)' is not allowed"):
        parse_fit_config(["--config", str(fit_config(tmp_path, **trainer))])


def test_resume_neither_imports_nor_adopts_the_checkpoint_hyper_parameters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = plant(tmp_path, "planted_loss")
    monkeypatch.syspath_prepend(str(tmp_path))
    stored = {"base_model": "/elsewhere", "category": "hate", "learning_rate": 0.5, "loss": {"class_path": "planted_loss.Thing", "init_args": {}}}
    checkpoint = tmp_path / "last.ckpt"
    torch.save({"hyper_parameters": stored, "state_dict": {}}, checkpoint)
    config = yaml.safe_load(fit_config(tmp_path).read_text())

    class ParseFit(_ParseOnlyCLI):
        """``safetydpo fit`` up to (not including) building and running anything."""

        def _run_subcommand(self, subcommand: str) -> None:
            pass

    monkeypatch.setattr(sys, "argv", ["safetydpo"])
    cli = ParseFit(args=["fit", "--config", str(tmp_path / "config.yaml"), "--ckpt_path", str(checkpoint)], parser_kwargs={"exit_on_error": False})
    model = cli.config.fit.model.init_args
    assert (model.base_model, model.category, model.learning_rate) == tuple(config["model"]["init_args"][k] for k in ("base_model", "category", "learning_rate"))
    assert model.loss == config["model"]["init_args"]["loss"] and not marker.exists()


def test_trusted_packages_are_listed_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TRUSTED_IMPORTS_ENV, "mypkg, lab.callbacks")
    names = trusted_imports()
    assert {"safetydpo", "lightning.pytorch", "torch.optim", "mypkg", "lab.callbacks"} <= set(names)
    monkeypatch.setenv(TRUSTED_IMPORTS_ENV, "my-pkg")
    with pytest.raises(UntrustedImportError, match=rf"{TRUSTED_IMPORTS_ENV}: 'my-pkg' is not a dotted package name"):
        trusted_imports()


def test_every_class_path_in_the_shipped_configs_is_trusted() -> None:
    paths = set()
    for path in (REPO / "configs").rglob("*.yaml"):
        text = path.read_text()
        paths.update(word.strip("'\"{},") for line in text.splitlines() if "class_path:" in line for word in line.split("class_path:")[1].split()[:1])
    dotted = {path for path in paths if "." in path}
    assert dotted, "the configs name Lightning and safetydpo classes"
    trusted = trusted_imports()
    assert all(any(p == t or p.startswith(t + ".") for t in trusted) for p in dotted), sorted(dotted)
