"""The README's set-up text: what a new user copies first must be right for a CPU-only machine."""

from __future__ import annotations

import re
from pathlib import Path

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_cpu_only_users_are_told_how_to_get_the_cpu_wheel() -> None:
    assert re.search(r"pip install torch==2\.13\.0 --index-url https://download\.pytorch\.org/whl/cpu", README)


def test_the_suite_time_and_its_fast_subset_are_stated() -> None:
    assert 'python -m pytest -q -m "not slow"' in README
    assert re.search(r"whole suite takes about \d+-\d+ minutes", README)


def test_the_demo_paragraph_counts_the_services_each_algorithm_starts() -> None:
    assert "four services on loopback" not in README.split("## How it fits together")[0]
    assert re.search(r"GRPO and TRPO start three", README), "say how many services each algorithm starts"
