"""`quartet serve ROLE`: run one model role as a gRPC service until SIGTERM/SIGINT.

The command (its flags, built from the service config's fields, and its body) lives in
services.common.command, shared with `python -m services`; this module only registers it.
"""

from __future__ import annotations

from services.common.command import SERVE_HELP, exit_process, serve_command

__all__ = ["SERVE_HELP", "serve"]


def _exit_process(code: int) -> None:
    exit_process(code)


# The lambda looks `_exit_process` up at call time, so tests can replace it on this module.
serve = serve_command(lambda code: _exit_process(code))
