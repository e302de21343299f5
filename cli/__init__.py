"""The `quartet` command line: see cli/main.py."""

import services  # noqa: F401  (grpc's fork support off before grpc loads: see services/__init__.py)


def console():
    """The console every command prints through. soft_wrap: rich never breaks a line itself, so a long path
    or a suggested command stays one line that can be copied (the terminal still folds it for display)."""
    from rich.console import Console

    return Console(soft_wrap=True)
