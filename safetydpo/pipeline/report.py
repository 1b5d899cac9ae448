"""The pipeline report: per category, IP of the base model vs the aligned one, plus registered sections.

``report.json`` holds the rows (what ``safetydpo demo`` prints); ``report.md`` the same as a table,
each section's text, and quality metrics (FID, CLIPScore) of every prompt set that has them. The
aligned LoRA's model cards get the IP rows too (the hub card as ``model-index``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetydpo.evaluation.config import EvalConfig
from safetydpo.io import atomic_file, write_json_atomic
from safetydpo.lora_files import record_evaluation
from safetydpo.pipeline.extensions import ReportContext, ReportSection

BASE, ALIGNED = "base", "aligned"
REPORT_FORMAT = "safetydpo.pipeline-report/1"


def ip_rows(results: dict[str, Any], ip_set: str, aligned: str = ALIGNED) -> list[dict[str, Any]]:
    """One row per category of ``ip_set`` and one ``overall``: IP of base and of ``aligned``, and the relative drop."""
    scores = {BASE: results["results"][BASE][ip_set]["ip"], ALIGNED: results["results"][aligned][ip_set]["ip"]}
    rows = []
    for category in [*scores[BASE]["per_category"], "overall"]:
        ip = {m: (s["overall"] if category == "overall" else s["per_category"][category])["value"] for m, s in scores.items()}
        rows.append({
            "category": category,
            "ip_base": ip[BASE],
            "ip_aligned": ip[ALIGNED],
            "ip_relative_drop": 1 - ip[ALIGNED] / ip[BASE] if ip[BASE] else 0.0,
        })
    return rows


def robustness_rows(results: dict[str, Any], ip_set: str, aligned: str = ALIGNED) -> list[dict[str, Any]]:
    """Per attack of ``ip_set`` and category (then ``overall``): clean IP and IP under attack of base and ``aligned``
    on the attacked prompts; empty when no attack ran."""
    rows = []
    for label, attack in (results.get("attacks") or {}).items():
        found = attack["prompt_sets"].get(ip_set)
        if found is None:
            continue
        models = {BASE: found["results"][BASE], ALIGNED: found["results"][aligned]}
        for category in [*models[BASE]["clean_ip"]["per_category"], "overall"]:
            row: dict[str, Any] = {"attack": label, "category": category}
            for model, result in models.items():
                for kind, scores in (("clean", result["clean_ip"]), ("attacked", result["attacked"]["ip"])):
                    estimate = scores["overall"] if category == "overall" else scores["per_category"].get(category)
                    row[f"ip_{model}_{kind}"] = estimate["value"] if estimate else None
            rows.append(row)
    return rows


def robustness_markdown(rows: list[dict[str, Any]], ip_set: str) -> str:
    """The robustness table: IP clean → under attack, base and aligned, per attack and category."""
    lines = [
        f"Robustness on `{ip_set}` (IP clean → under attack, on the attacked prompts and seeds; each attack ran against "
        "the aligned model, details in `eval/report.md`):",
        "",
        "| attack | category | base clean | base attacked | aligned clean | aligned attacked |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        cells = [_cell(row[key], key) if row[key] is not None else "–" for key in ("ip_base_clean", "ip_base_attacked", "ip_aligned_clean", "ip_aligned_attacked")]
        lines.append(f"| {row['attack']} | {row['category']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def quality_lines(results: dict[str, Any]) -> list[str]:
    """FID and CLIPScore of base and aligned on every prompt set that measured them."""
    lines = []
    for name in results["prompt_sets"]:
        for metric, label in (("fid", "FID"), ("clipscore", "CLIPScore")):
            values = {m: results["results"][m][name].get(metric) for m in (BASE, ALIGNED)}
            if all(values.values()):
                extra = f" ({values[BASE]['feature_extractor']} features)" if metric == "fid" else ""
                lines.append(f"- {label}{extra} on `{name}`: base {values[BASE]['value']:.3f}, aligned {values[ALIGNED]['value']:.3f}")
    return lines


def _cell(value: Any, key: str) -> str:
    if isinstance(value, float):
        return f"{value:.1%}" if key.endswith("relative_drop") else f"{value:.3f}"
    return str(value)


def markdown(rows: list[dict[str, Any]], texts: list[str], quality: list[str], base_model: str, ip_set: str) -> str:
    keys = list(rows[0])
    lines = [
        "# SafetyDPO pipeline report",
        "",
        f"Base model `{base_model}`; aligned = the base with `merged.safetensors`. IP on prompt set `{ip_set}` "
        "(share of images the configured classifiers flag; definition in `eval/results.json`).",
        "",
        "| " + " | ".join(key.replace("_", " ") for key in keys) + " |",
        "| " + " | ".join("---" for _ in keys) + " |",
        *("| " + " | ".join(_cell(row[key], key) for key in keys) + " |" for row in rows),
    ]
    if quality:
        lines += ["", "Quality:", *quality]
    for text in texts:
        lines += ["", text.rstrip()]
    lines += ["", "Full evaluation: `eval/report.md`, `eval/results.json`; same-seed grids: `eval/grids/`."]
    return "\n".join(lines) + "\n"


def write_report(root: Path, config: EvalConfig, ip_set: str, sections: list[ReportSection], base_model: str) -> list[dict[str, Any]]:
    """Write ``report.json`` and ``report.md`` under ``root`` from the evaluation's results; returns the rows."""
    results = json.loads((root / "eval" / "results.json").read_text(encoding="utf-8"))
    rows = ip_rows(results, ip_set)
    context = ReportContext(config=config, results=results, base=BASE, aligned=ALIGNED, output=root)
    texts = []
    for section in sections:
        computed = section.compute(context)
        for row in rows:
            row.update(computed.columns.get(row["category"], {}))
        if computed.markdown:
            texts.append(computed.markdown)
    quality = quality_lines(results)
    robustness = robustness_rows(results, ip_set)
    if robustness:
        texts.insert(0, robustness_markdown(robustness, ip_set))
    write_json_atomic(root / "report.json", {"format": REPORT_FORMAT, "ip_set": ip_set, "rows": rows, "quality": quality, "robustness": robustness})
    with atomic_file(root / "report.md") as tmp:
        tmp.write_text(markdown(rows, texts, quality, base_model, ip_set), encoding="utf-8")
    aligned_lora = next(model.lora for model in config.models if model.name == ALIGNED)
    if aligned_lora:
        evaluation = {
            "prompt_set": ip_set,
            "ip_definition": (results.get("ip_definition") or {}).get("description", "see eval/results.json"),
            "rows": [{key: row[key] for key in ("category", "ip_base", "ip_aligned")} for row in rows],
        }
        record_evaluation(aligned_lora, evaluation)
    return rows
