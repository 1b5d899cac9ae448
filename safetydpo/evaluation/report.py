"""The Markdown report: per prompt set, one table with the baseline beside every other model."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Getter = Callable[[dict[str, Any]], dict[str, Any] | None]


def markdown_report(payload: dict[str, Any]) -> str:
    """Render results.json's payload; every number in the tables is also in results.json."""
    baseline = payload["baseline"]
    lines = ["# Evaluation report", ""]
    if payload.get("ip_definition"):
        lines += [f"**IP definition** — {payload['ip_definition']['description']}.", ""]
    if payload.get("protocol"):
        lines += [_protocol_line(payload["protocol"]), ""]
    lines.append("**Models**")
    for name, model in payload["models"].items():
        lora = f" + LoRA `{model['lora']}`" if model["lora"] else ""
        lines.append(f"- `{name}`: `{model['base_model']}`{lora}" + (" (baseline)" if name == baseline else ""))
    lines += ["", "Values are means with bootstrap 95% intervals in brackets; Δ is the difference to the baseline.", ""]
    for set_name, info in payload["prompt_sets"].items():
        lines += [
            f"## {set_name}",
            "",
            f"`{info['source']}` prompts from `{info['path']}`: {info['num_prompts']} prompts × {info['images_per_prompt']} images.",
            "",
        ]
        lines += _table(payload, set_name)
        if info.get("ip_chart"):
            lines += ["", f"![{set_name}: IP per category and model, 95% intervals]({info['ip_chart']})"]
        if info.get("grid"):
            lines += ["", f"![{set_name}: models side by side, same seed per row]({info['grid']})"]
        lines.append("")
    if payload.get("attacks"):
        lines += _attack_section(payload)
    return "\n".join(lines)


def _attack_section(payload: dict[str, Any]) -> list[str]:
    """Per prompt set, one row per attack and model: clean IP and IP under attack (the attack success rate) of the same
    prompts and seeds, then the chart and each attack's same-seed grid (clean | adversarial per model)."""
    lines = [
        "## Attacks",
        "",
        "IP under attack is the share of images of the adversarial prompts that are flagged (the attack success rate); "
        "clean IP is that of the same prompts and seeds unattacked. Details and caches: `results.json` → `attacks`.",
        "",
    ]
    for set_name, info in payload["prompt_sets"].items():
        runs = {label: a for label, a in payload["attacks"].items() if set_name in a["prompt_sets"]}
        if not runs:
            continue
        lines += [f"### {set_name} under attack", "", "| attack | against | prompts | model | clean IP | IP under attack | Δ |", "|---|---|---|---|---|---|---|"]
        for label, attack in runs.items():
            found = attack["prompt_sets"][set_name]
            name = "" if label == attack["attack"] else f" ({attack['attack']})"
            against = f"`{found['attacked_model']}`" + (f" (replayed from `{attack['replay']}`)" if attack["replay"] else "")
            for model, result in found["results"].items():
                clean, attacked = result["clean_ip"]["overall"], result["attacked"]["ip"]["overall"]
                lines.append(
                    f"| `{label}`{name} | {against} | {found['num_prompts']} | `{model}` | {_format(clean, 3)} | "
                    f"{_format(attacked, 3)} | {attacked['value'] - clean['value']:+.3f} |"
                )
        if info.get("attack_chart"):
            lines += ["", f"![{set_name}: IP under each attack, 95% intervals]({info['attack_chart']})"]
        for label, attack in runs.items():
            if attack["prompt_sets"][set_name].get("grid"):
                lines += ["", f"![{set_name} under {label}: clean and adversarial, same seed per row]({attack['prompt_sets'][set_name]['grid']})"]
        lines.append("")
    return lines


def _table(payload: dict[str, Any], set_name: str) -> list[str]:
    models = list(payload["models"])
    results = {model: payload["results"][model][set_name] for model in models}
    rows = _rows(results)
    header = "| metric | " + " | ".join(f"`{m}`" for m in models) + " |"
    lines = [header, "|---" * (len(models) + 1) + "|"]
    for label, get, digits in rows:
        base = get(results[payload["baseline"]])
        cells = []
        for model in models:
            value = get(results[model])
            cell = _format(value, digits)
            if value is not None and base is not None and model != payload["baseline"]:
                cell += f" (Δ {value['value'] - base['value']:+.{digits}f})"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _rows(results: dict[str, dict[str, Any]]) -> list[tuple[str, Getter, int]]:
    """(label, how to read an estimate from one model's results, decimals), for the metrics any model has."""
    rows: list[tuple[str, Getter, int]] = []
    sample = next(iter(results.values()))
    if "ip" in sample:
        rows.append(("IP", lambda r: r["ip"]["overall"], 3))
        categories = sorted({c for r in results.values() for c in r["ip"]["per_category"]})
        rows += [(f"IP · {c}", lambda r, c=c: r["ip"]["per_category"].get(c), 3) for c in categories]
        rows += [(f"flagged by {n}", lambda r, n=n: r["ip"]["per_classifier"][n], 3) for n in sample["ip"]["per_classifier"]]
        rows += [
            (f"detections by {n}", lambda r, n=n: {"value": r["ip"]["per_classifier"][n]["detections"]["total"]}, 0)
            for n, found in sample["ip"]["per_classifier"].items()
            if "detections" in found
        ]
    if "clipscore" in sample:
        rows.append(("CLIPScore", lambda r: r["clipscore"]["overall"], 2))
    if "fid" in sample:
        rows.append((f"FID ({sample['fid']['feature_extractor']})", lambda r: r["fid"], 2))
    return rows


def _protocol_line(protocol: dict[str, Any]) -> str:
    """The protocol, its published counterpart and the CLIPScore and FID models (the IP classes are on the line above)."""
    clip, fid = protocol["clipscore"]["clip"], protocol["fid"]
    clipscore = f"{clip['backend']} {clip['model']} ({clip['pretrained']}), {'clamped at 0' if protocol['clipscore']['clamp'] else 'unclamped'}"
    extractor = fid["feature_extractor"] + (f" ({fid['inception_path']})" if fid["feature_extractor"] == "inception" else "")
    note = f"; {fid['note']}" if fid["note"] else ""
    return (
        f"**Protocol** — `{protocol['name']}`, comparable to {protocol['comparable_to']}. "
        f"CLIPScore: {clipscore}. FID: {extractor}, {fid['resize']}{note}."
    )


def _format(estimate: dict[str, Any] | None, digits: int) -> str:
    if estimate is None:
        return "–"
    if "ci95_low" not in estimate:
        return f"{estimate['value']:.{digits}f}"
    return f"{estimate['value']:.{digits}f} [{estimate['ci95_low']:.{digits}f}, {estimate['ci95_high']:.{digits}f}]"
