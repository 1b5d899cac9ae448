"""``python -m safetydpo.cli ...``: the ``safetydpo`` command, for an interpreter whose scripts folder is not on PATH."""

from safetydpo.cli.main import main

main()
