"""Regenerate the Python stubs of the wire contract from protos/quartet/v1/*.proto.

    python scripts/gen_protos.py          # rewrite *_pb2.py, *_pb2.pyi, *_pb2_grpc.py
    python scripts/gen_protos.py --check  # exit 1 if the committed stubs differ from a fresh generation

The stubs are committed so that a user needs no protoc; --check runs in CI so they never drift.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "protos"
PACKAGE = PROTO_ROOT / "quartet" / "v1"
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

    protos = sorted(PACKAGE.glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(p.relative_to(PROTO_ROOT)) for p in protos),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed; see the messages above")
    return sorted(p for p in (out_dir / "quartet" / "v1").iterdir() if p.name.endswith(SUFFIXES))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        committed = sorted(p for p in PACKAGE.iterdir() if p.name.endswith(SUFFIXES))
        if args.check:
            fresh_names = {p.name for p in fresh}
            stale = [p.name for p in committed if p.name not in fresh_names]
            drift = [p.name for p in fresh if not (PACKAGE / p.name).exists()
                     or not filecmp.cmp(p, PACKAGE / p.name, shallow=False)]
            if drift or stale:
                print("generated stubs are out of date with protos/: " + ", ".join(drift + stale), file=sys.stderr)
                print("run: python scripts/gen_protos.py", file=sys.stderr)
                return 1
            print(f"stubs up to date ({len(fresh)} files)")
            return 0
        for p in committed:
            p.unlink()
        for p in fresh:
            shutil.copy(p, PACKAGE / p.name)
        print(f"wrote {len(fresh)} files to {PACKAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
