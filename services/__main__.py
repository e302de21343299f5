"""`python -m services [serve] [ROLE] --config FILE`: run one role, without the `quartet` CLI.

The same command as `quartet serve` (services.common.command); the launcher starts local services
this way, so a service process never imports the cli package.
"""

from __future__ import annotations

import sys

import typer

from services.common.command import SERVE_HELP, exit_process, serve_command


def main(argv: list[str]) -> None:
    app = typer.Typer(add_completion=False, context_settings={"help_option_names": ["-h", "--help"]})
    app.command(help=SERVE_HELP)(serve_command(exit_process))
    # `serve` is the only command; it may be named, as in `quartet serve`.
    app(args=argv[1:] if argv[:1] == ["serve"] else argv, prog_name="python -m services")


if __name__ == "__main__":
    main(sys.argv[1:])
