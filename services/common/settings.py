"""One config loader for services and runs: layers merged into a dict, validated by a pydantic model.

Layers, lowest precedence first:

    model defaults < YAML file < environment (a fixed table of QUARTET_* names) < flags < --set key=value

`--set` keys are dotted paths (`server.port=5000`, `services.rewards.0.weight=2`, list items by
index) and values are YAML, so `5000` is an int, `true` a bool, `[1, 2]` a list and `null` None.
A layer holds only what the user gave: a flag or variable left unset never overwrites the file.

Every problem is a ConfigError whose lines each start with the dotted field path and say what to
change; a misspelt key gets the closest valid name (difflib) and the list of valid ones.

pydantic-settings was considered: its environment source wants one prefix scheme for every field
(QUARTET_SERVER__PORT), while our variable names are short and fixed (QUARTET_PORT, QUARTET_GRACE),
and runs read no environment at all, so a plain merge of dicts is the simpler loader.
"""

from __future__ import annotations

import copy
import difflib
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration problem; the message names the field(s) and says what to change."""


# --- layers ----------------------------------------------------------------------------------------


def read_yaml(path: str | Path, *, what: str = "config") -> dict[str, Any]:
    """The mapping in a YAML file ({} for an empty file); ConfigError naming the file otherwise."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{what} file {str(p)!r} does not exist; pass the path of a YAML file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{what} file {str(p)!r}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} file {str(p)!r} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} file {str(p)!r}: the top level must be a mapping of fields (key: value)")
    return data


def parse_set(items: Iterable[str]) -> dict[str, Any]:
    """`["server.port=5000", "options.kind=rule"]` -> {"server": {"port": 5000}, "options": {"kind": "rule"}}."""
    return apply_sets({}, items)


def apply_sets(data: dict[str, Any], items: Iterable[str]) -> dict[str, Any]:
    """Set each `a.b=value` into the nested dict `data` (in place; returned); list items by index."""
    for item in items:
        parts, value = _parse_one(item)
        node: Any = data
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                at = ".".join(parts[:i])
                if not part.isdigit():
                    raise ConfigError(f"--set {item!r}: {at} is a list; index it, e.g. {at}.0.{part}")
                if int(part) >= len(node):
                    raise ConfigError(f"--set {item!r}: {at} has only {len(node)} items")
                key: Any = int(part)
            else:
                key = part
                if not last and not isinstance(node.get(key), dict | list):
                    node[key] = {}
            if last:
                node[key] = value
            else:
                node = node[key]
    return data


def _parse_one(item: str) -> tuple[list[str], Any]:
    key, sep, raw = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise ConfigError(f"--set {item!r}: expected key=value with a dotted key, e.g. server.port=5000 or steps=7")
    try:
        return parts, (yaml.safe_load(raw) if raw.strip() else "")
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML ({e}); quote it") from None


def env_layer(names: Mapping[str, str], environ: Mapping[str, str]) -> dict[str, Any]:
    """The values of the variables in `names` (variable -> dotted field path) that are set and non-empty.

    Values stay strings (pydantic converts "5000" to an int); an empty variable counts as unset,
    as it does for click's envvar options.
    """
    out: dict[str, Any] = {}
    for var, path in names.items():
        value = environ.get(var, "")
        if value.strip():
            _set_path(out, path.split("."), value)
    return out


def flag_layer(values: Mapping[str, Any]) -> dict[str, Any]:
    """{dotted path: value} of flags -> nested dict, leaving out the flags not given (None)."""
    out: dict[str, Any] = {}
    for path, value in values.items():
        if value is not None:
            _set_path(out, path.split("."), str(value) if isinstance(value, Path) else value)
    return out


def _set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[path[-1]] = value


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Dicts merge key by key; anything else in `override` replaces the value in `base`."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load(
    model: type[M],
    *,
    file: str | Path | None = None,
    data: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
    sets: Iterable[str] = (),
    what: str = "config",
) -> M:
    """Merge the layers (defaults < file or data < env < flags < sets) and validate them as `model`.

    Args:
        data: the file's content when it is already read (instead of `file`).
        env: variable name -> dotted field path; read from `environ` (no environment layer if None).
        flags: dotted field path -> value given on the command line (None: not given).
        what: names the file in errors ("run config", "service config").
    """
    merged = read_yaml(file, what=what) if file is not None else copy.deepcopy(dict(data or {}))
    if env and environ is not None:
        merged = deep_merge(merged, env_layer(env, environ))
    merged = deep_merge(merged, flag_layer(flags or {}))
    return validate(model, apply_sets(merged, sets))


# --- errors ----------------------------------------------------------------------------------------


def validate(model: type[M], data: Any, *, prefix: str = "") -> M:
    """model.model_validate(data), errors rewritten as a ConfigError of `explain`'s lines.

    `prefix` is the path of `data` in a larger config (role options are checked as "options").
    """
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError("\n".join(explain(e, model, prefix=prefix))) from None


def explain(err: ValidationError, model: type[BaseModel], *, prefix: str = "") -> list[str]:
    """One line per problem, each starting with the dotted field path and saying what to change."""
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and "[" in p))
        path = [*(prefix.split(".") if prefix else []), *(str(p) for p in loc)]
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            holder = model_at(model, loc[:-1])
            valid = sorted(holder.model_fields) if holder else []
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else "."
            listed = f" Valid fields here: {', '.join(valid)}." if valid else ""
            lines.append(f"{'.'.join(path)}: unknown field{hint}{listed} Remove or rename it.")
            continue
        if e["type"] == "missing":
            name = ".".join(path)
            lines.append(f"{name}: required field is missing; add it to the config or pass --set {name}=...")
            continue
        # A model-level validator names the field it rejects as "field: problem"; fold it into the path.
        head, sep, rest = msg.partition(": ")
        holder = model_at(model, loc)
        if sep and holder is not None and head in holder.model_fields:
            path, msg = [*path, head], rest
        got = e.get("input")
        secret = path and "token" in path[-1] and not path[-1].endswith(("_file", "_env"))
        shown = "" if secret or isinstance(got, dict | list) or got is None else f" (got {got!r})"
        lines.append(f"{'.'.join(path)}: {msg}{shown}" if path else f"{msg}{shown}")
    return lines


def model_at(model: type[BaseModel], loc: Iterable[Any]) -> type[BaseModel] | None:
    """The pydantic model class found at the field path `loc` (list indexes skipped), or None."""
    cls: type[BaseModel] | None = model
    for part in loc:
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(part) if cls is not None else None
        if field is None:
            return None
        cls = next(iter(models_in(field.annotation)), None)
    return cls


def models_in(ann: Any) -> list[type[BaseModel]]:
    """Pydantic models inside an annotation (X, X | None, list[X])."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return [ann]
    return [m for a in typing.get_args(ann) for m in models_in(a)]
