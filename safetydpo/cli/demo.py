"""``safetydpo demo``: the whole method on the embedded ToyWorld, with a before/after report."""

from __future__ import annotations

import argparse
from dataclasses import fields

from safetydpo.toyworld.demo import DemoSettings, run_demo


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per DemoSettings field, so every demo size can be set from a command line."""
    defaults = DemoSettings()
    for field in fields(DemoSettings):
        value = getattr(defaults, field.name)
        flag = f"--{field.name.replace('_', '-')}"
        if isinstance(value, list):
            parser.add_argument(flag, dest=field.name, nargs="+", default=value)
        else:
            parser.add_argument(flag, dest=field.name, type=type(value), default=value)


def settings_from(args: argparse.Namespace) -> DemoSettings:
    return DemoSettings(**{field.name: getattr(args, field.name) for field in fields(DemoSettings)})


def run(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="safetydpo demo",
        description="Build ToyWorld CoProV2 pairs, train one DPO expert per category, Co-Merge them, and "
        "measure IP and prompt fidelity before/after (report in OUTPUT/demo_report.md).",
    )
    add_settings_arguments(parser)
    args = parser.parse_args(argv)
    rows = run_demo(settings_from(args))
    print(f"\n{'category':<16}{'IP base':>9}{'IP aligned':>12}{'drop':>8}{'neutral fid. base/aligned':>28}{'safe fid. base/aligned':>25}")
    for r in rows:
        print(
            f"{r['category']:<16}{r['ip_base']:>9.3f}{r['ip_aligned']:>12.3f}{r['ip_relative_drop']:>8.1%}"
            f"{r['unsafe_fidelity_base']:>16.3f} / {r['unsafe_fidelity_aligned']:.3f}{r['safe_fidelity_base']:>15.3f} / {r['safe_fidelity_aligned']:.3f}"
        )
    print(f"\nreport: {args.output}/demo_report.md")
