"""``safetydpo data build|inspect|import``: build, check and import CoProV2-format datasets."""

from __future__ import annotations

import argparse
from pathlib import Path

from safetydpo.data.builder import BuildError, build, import_table, inspect_dataset, load_build_config
from safetydpo.data.builder.importer import LAYOUTS
from safetydpo.data.coprov2 import DatasetError


def _build(args: argparse.Namespace) -> None:
    result = build(load_build_config(args.config))
    print(f"{result.output}: {result.rows} pairs in {result.shards} shards ({result.rendered_shards} rendered by this run)")
    report = result.generation
    if "candidates" in report:
        print(f"generation: {report['accepted']} pairs from {report['candidates']} candidates; rejected: {report['rejected']}")
        for name, ratio in report["shortfall"].items():
            print(f"  short of quota: {name} {ratio}")


def _inspect(args: argparse.Namespace) -> None:
    grid = None if args.no_grid else (args.grid or args.dir / "sample_grid.png")
    print("\n".join(inspect_dataset(args.dir, grid, samples=args.samples, seed=args.seed, tile=args.tile).lines()))


def _import(args: argparse.Namespace) -> None:
    columns = {}
    for mapping in args.column:
        ours, sep, theirs = mapping.partition("=")
        if not sep or not ours or not theirs:
            raise BuildError(f"--column '{mapping}' is not OURS=THEIRS (e.g. unsafe_prompt=prompt_unsafe)")
        columns[ours] = theirs
    result = import_table(args.table, args.out, layout=args.layout, images=args.images, taxonomy=args.taxonomy, columns=columns)
    written = "pairs.parquet and metadata.parquet" if result.metadata else "pairs.parquet"
    skipped = f"; {result.unpaired} unpaired images skipped" if result.unpaired else ""
    print(f"{args.out}: {written} with {result.pairs} pairs {result.categories}{skipped}")


def run(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="safetydpo data", description="Build, inspect and import CoProV2-format datasets.")
    commands = parser.add_subparsers(dest="command", required=True)
    build_parser = commands.add_parser("build", help="generate prompt pairs and render them with the model being aligned (resumable)")
    build_parser.add_argument("--config", type=Path, required=True, help="build config, e.g. configs/data.yaml")
    inspect_parser = commands.add_parser("inspect", help="counts per category/concept, missing files, a sample grid PNG")
    inspect_parser.add_argument("dir", type=Path, help="dataset folder")
    inspect_parser.add_argument("--grid", type=Path, help="sample grid path (default DIR/sample_grid.png)")
    inspect_parser.add_argument("--no-grid", action="store_true", help="write no grid")
    inspect_parser.add_argument("--samples", type=int, default=8, help="pairs in the grid")
    inspect_parser.add_argument("--seed", type=int, default=0, help="which pairs the grid shows")
    inspect_parser.add_argument("--tile", type=int, default=128, help="grid image size in pixels")
    import_parser = commands.add_parser("import", help="convert a pair table (CSV/JSONL/Parquet, e.g. the released CoProV2)")
    import_parser.add_argument("table", type=Path, help="the table file")
    import_parser.add_argument("--out", type=Path, required=True, help="folder for pairs.parquet (and metadata.parquet)")
    import_parser.add_argument("--layout", choices=LAYOUTS, default="auto", help="coprov2: a row per image; pairs: a row per pair")
    import_parser.add_argument("--images", type=Path, help="folder the table's image paths are relative to; writes metadata.parquet")
    import_parser.add_argument("--taxonomy", type=Path, help="assign concepts by the taxonomy concept each unsafe prompt names")
    import_parser.add_argument("--column", action="append", default=[], metavar="OURS=THEIRS", help="map a column name (pairs layout)")
    args = parser.parse_args(argv)
    handlers = {"build": _build, "inspect": _inspect, "import": _import}
    try:
        handlers[args.command](args)
    except (BuildError, DatasetError, FileNotFoundError) as err:
        parser.exit(2, f"safetydpo data {args.command}: error: {err}\n")
