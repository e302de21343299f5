"""The `quartet` command line: see cli/main.py."""

import services  # noqa: F401  (grpc's fork support off before grpc loads: see services/__init__.py)
