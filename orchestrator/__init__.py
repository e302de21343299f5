"""The orchestrator: the trainable policy and its update (`step`), the remote roles (`remote`) and
the run around the steps (`run`)."""

import services  # noqa: F401  (grpc's fork support off before grpc loads: see services/__init__.py)
