"""Generate the run-config reference from the config's own field descriptions.

It lives in docs/config-reference.md and, between the same marker lines, in README.md.
`python -m cli.config_docs` rewrites both; `python -m cli.config_docs --check` exits 1 when
either is out of date (a unit test runs the same check), so the documentation cannot drift from the code.
"""

from __future__ import annotations

import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from orchestrator.run.config import RunConfig
from services.common.settings import models_in

REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "config-reference.md"
README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN = "<!-- BEGIN GENERATED: run config reference (python -m cli.config_docs) -->"
END = "<!-- END GENERATED: run config reference -->"


def _type_name(ann: Any) -> str:
    origin = typing.get_origin(ann)
    if origin is typing.Literal:
        return " \\| ".join(repr(a) for a in typing.get_args(ann))
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in typing.get_args(ann))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(ann))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if ann is type(None):
        return "null"
    return getattr(ann, "__name__", str(ann))


def _default(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, BaseModel):
            return "(section)"
        return f"`{value!r}`"
    if field.default is PydanticUndefined:
        return "**required**"
    return f"`{field.default!r}`"


def _section(model: type[BaseModel], prefix: str, out: list[str], seen: set[str]) -> None:
    rows, children = [], []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        doc = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{key}` | {_type_name(field.annotation)} | {_default(field)} | {doc} |")
        for child in models_in(field.annotation):
            suffix = "[i]." if typing.get_origin(field.annotation) is list else "."
            children.append((child, f"{key}{suffix}"))
    title = prefix.rstrip(".") or "top level"
    out += [f"### `{title}`", "", (model.__doc__ or "").strip().splitlines()[0], "",
            "| field | type | default | description |", "| --- | --- | --- | --- |", *rows, ""]
    for child, child_prefix in children:
        if child_prefix not in seen:
            seen.add(child_prefix)
            _section(child, child_prefix, out, seen)


def generate() -> str:
    """The whole reference, Markdown, between the BEGIN/END marker lines."""
    out = [BEGIN, "", "## Run config reference", "",
           "Every field of `quartet train CONFIG`'s YAML file; set any with `--set key=value` (dotted keys, "
           "YAML values). Unknown fields are rejected. Algorithm defaults depend on `algorithm.name`.", ""]
    _section(RunConfig, "", out, set())
    out += [END, ""]
    return "\n".join(out)


def spliced_readme(text: str, readme: str) -> str:
    """`readme` with the part from the BEGIN line through the END line replaced by `text`."""
    start, end = readme.find(BEGIN), readme.find(END)
    if start < 0 or end < start:
        raise ValueError(f"README.md lacks the marker lines {BEGIN!r} ... {END!r}")
    return readme[:start] + text.rstrip("\n") + readme[end + len(END):]


def main(argv: list[str]) -> int:
    text = generate()
    readme = README.read_text()
    if "--check" in argv:
        stale = [p for p, ok in ((REFERENCE, REFERENCE.is_file() and REFERENCE.read_text() == text),
                                 (README, spliced_readme(text, readme) == readme)) if not ok]
        for path in stale:
            print(f"{path} is out of date: run `python -m cli.config_docs`", file=sys.stderr)
        return 1 if stale else 0
    REFERENCE.parent.mkdir(parents=True, exist_ok=True)
    REFERENCE.write_text(text)
    README.write_text(spliced_readme(text, readme))
    print(f"wrote {REFERENCE} and the reference section of {README}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
