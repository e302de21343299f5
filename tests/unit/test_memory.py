"""The malloc settings for large messages: applied once on glibc, and the opt-outs are honoured."""

from __future__ import annotations

import subprocess
import sys

import pytest

CHECK = ("from services.common.memory import tune_malloc_for_large_messages as t; "
         "print(t(), t())")


def run(env: dict[str, str]) -> str:
    import os

    base = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "QUARTET_MALLOC"))}
    return subprocess.run([sys.executable, "-c", CHECK], env={**base, **env}, capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_applied_once_on_glibc_and_left_alone_when_asked() -> None:
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    assert run({}) == "True True"
    assert run({"QUARTET_MALLOC_TUNING": "0"}) == "False False"
    # A user's own glibc settings win: nothing is overridden.
    assert run({"MALLOC_MMAP_THRESHOLD_": "1048576"}) == "False False"
