"""``metrix`` command line: one thin module per command group over the library's jobs, one error boundary
(:mod:`metrix.cli.common`)."""

from __future__ import annotations

from typing import List, Optional

from metrix.cli.common import app

# importing a command module registers its commands; this order is the order of `metrix --help`
from metrix.cli import train, search, classical, verification, recommend, fewshot, selfsup, text, serve, explain, export  # noqa: E402,F401,I001


def main(argv: Optional[List[str]] = None) -> None:
    app(args=argv)


if __name__ == "__main__":
    main()
