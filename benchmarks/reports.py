"""What the benchmark scripts share: writing a report where the user asked for it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_report(report: dict[str, Any], out: Path) -> None:
    """Write `report` as indented JSON to `out` (its folder created if missing) and say where."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
