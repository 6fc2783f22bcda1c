"""The ``a2ats`` console command. It loads ``a2ats_hf/cli.py`` by itself, without importing the package, whose
``__init__`` imports transformers and torch (4-8 s) to register the attention: ``a2ats --help`` and argument errors
answer at once, and each subcommand imports what it needs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    package = importlib.util.find_spec("a2ats_hf")  # finds the package without running its __init__
    spec = importlib.util.spec_from_file_location("a2ats_cli_commands", Path(package.origin).with_name("cli.py"))
    cli = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = cli
    spec.loader.exec_module(cli)
    cli.main(argv)


if __name__ == "__main__":
    main()
