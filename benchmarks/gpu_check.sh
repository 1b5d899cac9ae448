#!/usr/bin/env bash
# The prepared GPU check (issue 17, docs/performance.md): on one H100/H200, in at most 8 minutes,
#   1. the SD 1.5-size training step, ours vs naive, batch 8, 512 px (benchmarks/train_throughput.py),
#   2. the same with --compile,
#   3. generation, our renderer (compile + channels_last) vs a plain diffusers loop, batch 8, 512 px,
#      20 steps, bf16 (benchmarks/generation_throughput.py),
# and ONE Markdown table of the results on stdout (and in $OUT/gpu_check.md, with the logs, if OUT is set).
# Each benchmark runs under `timeout`, so the whole check stays within its budget even if one part hangs
# or compiles slowly; such a row says "timed out".
#
#   benchmarks/gpu_check.sh           # CUDA, SD 1.5 size
#   benchmarks/gpu_check.sh --tiny    # dry run on the CPU with the tiny pipeline (seconds; compile rows skipped)
#
# PYTHON (default: python) is the interpreter with safetydpo installed.
set -uo pipefail

here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python}
mode=${1:-gpu}
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
start=$SECONDS

case $mode in
  gpu)
    train=(--device cuda --batch-size 8 --steps 10 --warmup 3)
    generate=(--device cuda --batch-size 8 --batches 4 --warmup 1 --steps 20 --compile --channels-last)
    limits=(100 200 170) ;;
  --tiny)
    train=(--tiny --device cpu --batch-size 2 --steps 1 --warmup 0)
    generate=(--tiny --device cpu --batch-size 2 --batches 1 --warmup 0 --steps 2 --channels-last)
    limits=(120 0 120) ;;
  *)
    echo "usage: $0 [--tiny]" >&2
    exit 2 ;;
esac

run() {  # run NAME LIMIT SCRIPT ARGS...: the benchmark's output in $logs/NAME.log, its exit status in $logs/NAME.rc
  local name=$1 limit=$2
  shift 2
  echo "gpu_check: $name (at most ${limit} s)" >&2
  timeout "$limit" "$python" "$here/$@" >"$logs/$name.log" 2>&1
  echo $? >"$logs/$name.rc"
}

run train "${limits[0]}" train_throughput.py "${train[@]}"
if [[ ${limits[1]} -gt 0 ]]; then
  run train_compile "${limits[1]}" train_throughput.py "${train[@]}" --compile
fi
run generation "${limits[2]}" generation_throughput.py "${generate[@]}"

"$python" - "$logs" "$mode" "$((SECONDS - start))" >"$logs/table.md" <<'EOF'
"""One Markdown table from the benchmark logs: a row per run, what it measured or why it has no figure."""
import re
import sys
from pathlib import Path

logs, mode, elapsed = Path(sys.argv[1]), sys.argv[2], sys.argv[3]


def cells(name: str) -> dict[str, str] | str:
    """The log's table rows and ratio lines, or why there are none (skipped, timed out, failed)."""
    log, rc = logs / f"{name}.log", logs / f"{name}.rc"
    if not rc.is_file():
        return "skipped (--tiny: torch.compile is not run on the CPU)"
    status, text = int(rc.read_text()), log.read_text(errors="replace")
    if status == 124:
        return "timed out"
    if status != 0:
        last = [line for line in text.splitlines() if line.strip()][-1:] or ["no output"]
        return f"failed (exit {status}: {last[0][:120]})"
    rows = {row[0]: row[1:] for row in (line.strip("| ").split(" | ") for line in text.splitlines() if line.startswith("| "))}
    found = {key: value for key, value in rows.items() if key in ("ours", "naive", "plain")}
    found |= dict(re.findall(r"^ours/(?:naive|plain) (images/s|pairs/s|peak memory): (\S+)", text, re.MULTILINE))
    found["setup"] = text.splitlines()[0] if text else ""
    return found


runs = [
    ("training, ours vs naive", "train", "pairs/s", "≥ 3x pairs/s at ≤ 0.5x peak memory"),
    ("training + compile, ours vs naive", "train_compile", "pairs/s", "≥ 3x pairs/s at ≤ 0.5x peak memory"),
    ("generation, ours vs plain diffusers loop", "generation", "images/s", "≥ 1.5x images/s"),
]
print(f"GPU check ({'dry run on the CPU, tiny pipeline: not a measurement' if mode == '--tiny' else 'SD 1.5 size'}), {elapsed} s in all\n")
print("| run | ours | baseline | ours/baseline | peak memory ours/baseline | target |")
print("| --- | ---: | ---: | ---: | ---: | --- |")
setups = []
for title, name, unit, target in runs:
    found = cells(name)
    if isinstance(found, str):
        print(f"| {title} | {found} | | | | {target} |")
        continue
    baseline = found.get("naive") or found.get("plain")
    ours = found["ours"]
    memory = f" ({ours[1]})" if len(ours) > 1 and "GiB" in ours[1] else ""
    base_memory = f" ({baseline[1]})" if len(baseline) > 1 and "GiB" in baseline[1] else ""
    print(f"| {title} | {ours[0]} {unit}{memory} | {baseline[0]} {unit}{base_memory} | {found.get(unit, 'n/a')} | "
          f"{found.get('peak memory', 'n/a')} | {target} |")
    setups.append(f"- {title}: {found['setup']}")
print("\n" + "\n".join(setups))
EOF

cat "$logs/table.md"
if [[ -n ${OUT:-} ]]; then
  mkdir -p "$OUT/gpu_check_logs"
  cp "$logs/table.md" "$OUT/gpu_check.md"
  cp "$logs"/*.log "$OUT/gpu_check_logs/"
fi
