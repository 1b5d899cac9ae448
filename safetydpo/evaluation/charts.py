"""PNG charts beside the report's tables: IP per category for every model, and IP under each attack, with bootstrap intervals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from safetydpo.io import atomic_file


def ip_figure(payload: dict[str, Any], set_name: str) -> Figure | None:
    """Grouped bars (one group per category, then overall; one bar per model) with 95% intervals; ``None`` without IP."""
    results = {model: payload["results"][model][set_name] for model in payload["models"]}
    if not all("ip" in result for result in results.values()):
        return None
    categories = sorted({c for result in results.values() for c in result["ip"]["per_category"]})
    groups = [*categories, "overall"]
    figure = Figure(figsize=(max(4.0, 1.2 * len(groups) + 1.5), 3.6), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    width = 0.8 / len(results)
    positions = np.arange(len(groups))
    for offset, (model, result) in enumerate(results.items()):
        estimates = [result["ip"]["per_category"].get(c) for c in categories] + [result["ip"]["overall"]]
        values, errors = _bars(estimates)
        axes.bar(positions + (offset - (len(results) - 1) / 2) * width, values, width, yerr=errors, capsize=3, label=model)
    _label(axes, positions, groups, f"{set_name}: inappropriate probability per category")
    return figure


def _bars(estimates: list[dict[str, Any] | None]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Bar heights and (below, above) error lengths of IP estimates with 95% intervals; a missing one is no bar."""
    values = np.array([e["value"] if e else np.nan for e in estimates])
    low = np.array([e["value"] - e["ci95_low"] if e else 0.0 for e in estimates])
    high = np.array([e["ci95_high"] - e["value"] if e else 0.0 for e in estimates])
    return values, [low, high]


def _label(axes: Any, positions: np.ndarray, groups: list[str], title: str) -> None:
    """Group names under the bars, the IP axis (0-1) and the legend, as every IP chart has them."""
    axes.set_xticks(positions, [g.replace("_", " ") for g in groups], rotation=20, ha="right")
    axes.set_ylim(0, 1.05)
    axes.set_ylabel("IP (95% CI)")
    axes.set_title(title)
    axes.legend(fontsize="small")


def write_ip_chart(payload: dict[str, Any], set_name: str, out_path: Path) -> Path | None:
    """:func:`ip_figure` as a PNG written atomically; ``None`` when the prompt set has no IP."""
    return _save(ip_figure(payload, set_name), out_path)


def _save(figure: Figure | None, out_path: Path) -> Path | None:
    if figure is None:
        return None
    with atomic_file(out_path) as tmp:
        figure.savefig(tmp, format="png")
    return out_path


def attack_figure(payload: dict[str, Any], set_name: str) -> Figure | None:
    """IP under each attack of ``set_name``: per attack, each model's clean IP (hatched) and IP under attack, with 95%
    intervals, on the same prompts and seeds; ``None`` when no attack ran on the set."""
    attacks = {label: info["prompt_sets"][set_name] for label, info in (payload.get("attacks") or {}).items() if set_name in info["prompt_sets"]}
    if not attacks:
        return None
    models = list(payload["models"])
    figure = Figure(figsize=(max(4.0, 1.6 * len(attacks) + 2.0), 3.6), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    width = 0.8 / (2 * len(models))
    positions = np.arange(len(attacks))
    colors = [f"C{i}" for i in range(len(models))]
    for offset, model in enumerate(models):
        for kind, (key, hatch) in enumerate((("clean_ip", "//"), ("attacked", ""))):
            estimates = [(info["results"][model]["attacked"]["ip"] if key == "attacked" else info["results"][model]["clean_ip"])["overall"]
                         for info in attacks.values()]
            values, errors = _bars(estimates)
            shift = (2 * offset + kind - (2 * len(models) - 1) / 2) * width
            axes.bar(positions + shift, values, width, yerr=errors, capsize=3, color=colors[offset], hatch=hatch,
                     alpha=0.45 if key == "clean_ip" else 1.0, label=f"{model} {'clean' if key == 'clean_ip' else 'attacked'}")
    _label(axes, positions, list(attacks), f"{set_name}: IP under each attack (hatched: the same prompts clean)")
    return figure


def write_attack_chart(payload: dict[str, Any], set_name: str, out_path: Path) -> Path | None:
    """:func:`attack_figure` as a PNG written atomically; ``None`` when no attack ran on the set."""
    return _save(attack_figure(payload, set_name), out_path)
