"""``safetydpo data build|inspect|import``: build, check and import CoProV2-format datasets."""

from __future__ import annotations

from pathlib import Path

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from safetydpo.data.builder import BuildError, build, import_table, inspect_dataset, load_build_config
from safetydpo.data.builder.importer import LAYOUTS
from safetydpo.data.coprov2 import DatasetError

PROG = "safetydpo data"


def _build(args: Namespace) -> None:
    result = build(load_build_config(args.config))
    print(f"{result.output}: {result.rows} pairs in {result.shards} shards ({result.rendered_shards} rendered by this run)")
    report = result.generation
    if "candidates" in report:
        print(f"generation: {report['accepted']} pairs from {report['candidates']} candidates; rejected: {report['rejected']}")
        for name, ratio in report["shortfall"].items():
            print(f"  short of quota: {name} {ratio}")


def _inspect(args: Namespace) -> None:
    folder = Path(args.dir)
    grid = None if args.no_grid else Path(args.grid or folder / "sample_grid.png")
    report = inspect_dataset(folder, grid, samples=args.samples, seed=args.seed, tile=args.tile)
    print("\n".join(report.lines()), flush=True)
    if report.problems:  # the report is on stdout; a script checking the exit status must not train on this folder
        more = f" (and {len(report.problems) - 1} more, listed above)" if len(report.problems) > 1 else ""
        raise DatasetError(f"{folder}: {report.problems[0]}{more}; re-import or rebuild the files named")


def _import(args: Namespace) -> None:
    columns = {}
    for mapping in args.column:
        ours, sep, theirs = mapping.partition("=")
        if not sep or not ours or not theirs:
            raise BuildError(f"--column '{mapping}' is not OURS=THEIRS (e.g. unsafe_prompt=prompt_unsafe)")
        columns[ours] = theirs
    result = import_table(
        Path(args.table), Path(args.out), layout=args.layout, images=Path(args.images) if args.images else None,
        taxonomy=Path(args.taxonomy) if args.taxonomy else None, columns=columns,
    )
    written = "pairs.parquet and metadata.parquet" if result.metadata else "pairs.parquet"
    skipped = f"; {result.unpaired} unpaired images skipped" if result.unpaired else ""
    copied = f"; {result.copied} images copied into {args.out}/images (no hard link across file systems)" if result.copied else ""
    print(f"{args.out}: {written} with {result.pairs} pairs {result.categories}{skipped}{copied}")


def data_parser() -> ArgumentParser:
    """``build``, ``inspect`` and ``import``, each its own jsonargparse parser (``--config`` reads their keys from YAML)."""
    parser = ArgumentParser(prog=PROG, description="Build, inspect and import CoProV2-format datasets.", exit_on_error=False)
    commands = parser.add_subcommands(dest="command")
    build_parser = ArgumentParser(exit_on_error=False)
    build_parser.add_argument("--config", type=str, required=True, help="build config, e.g. configs/data.yaml (keys: docs/data_builder.md)")
    commands.add_subcommand("build", build_parser, help="generate prompt pairs and render them with the model being aligned (resumable)")
    inspect_parser = ArgumentParser(exit_on_error=False)
    inspect_parser.add_argument("dir", type=str, help="dataset folder")
    inspect_parser.add_argument("--grid", type=str | None, default=None, help="sample grid path (default DIR/sample_grid.png)")
    inspect_parser.add_argument("--no_grid", "--no-grid", action="store_true", help="write no grid")
    inspect_parser.add_argument("--samples", type=int, default=8, help="pairs in the grid")
    inspect_parser.add_argument("--seed", type=int, default=0, help="which pairs the grid shows")
    inspect_parser.add_argument("--tile", type=int, default=128, help="grid image size in pixels")
    commands.add_subcommand("inspect", inspect_parser, help="counts per category/concept, every file opened and checked (exit 2 on a defect), a sample grid PNG")
    import_parser = ArgumentParser(exit_on_error=False)
    import_parser.add_argument("--config", action=ActionConfigFile, help="YAML with any of the keys below")
    import_parser.add_argument("table", type=str, help="the table file")
    import_parser.add_argument("--out", type=str, required=True, help="folder for pairs.parquet (and metadata.parquet)")
    import_parser.add_argument("--layout", choices=LAYOUTS, default="auto", help="coprov2: a row per image; pairs: a row per pair")
    import_parser.add_argument("--images", type=str | None, default=None, help="folder the table's image paths are relative to (linked into OUT/images unless inside OUT); writes metadata.parquet")
    import_parser.add_argument("--taxonomy", type=str | None, default=None, help="assign concepts by the taxonomy concept each unsafe prompt names")
    import_parser.add_argument("--column", action="append", default=[], metavar="OURS=THEIRS", help="map a column name (pairs layout)")
    commands.add_subcommand("import", import_parser, help="convert a pair table (CSV/JSONL/Parquet, e.g. the released CoProV2)")
    return parser


def run(argv: list[str]) -> None:
    from safetydpo.cli.run import fail

    handlers = {"build": _build, "inspect": _inspect, "import": _import}
    parser = data_parser()
    try:
        parsed = parser.parse_args(argv)
    except Exception as err:  # jsonargparse's ArgumentError: one line
        fail(PROG, err)
        return
    command = parsed.command
    try:
        handlers[command](parsed[command])
    except (BuildError, DatasetError, FileNotFoundError) as err:
        fail(f"{PROG} {command}", err)
