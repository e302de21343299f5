"""The prompt set and the data cursor (part of the run state, so a resumed run sees the same prompts).

The order within an epoch is a permutation seeded by (run seed, epoch): it depends on nothing else,
so the cursor is just (epoch, position) and a resumed run at any point, an epoch boundary included,
continues with exactly the prompts an uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.run.config import ConfigError, DatasetConfig
from orchestrator.run.datasets import DatasetError, load_dataset


@dataclass(frozen=True)
class PromptRow:
    """One prompt and its string metadata (e.g. {"answer": "71"}) for reward services."""

    text: str
    metadata: dict[str, str]
    ids: tuple[int, ...] | None = None  # (P,) the prompt's token ids when the loader made them (chat template)

    def token_ids(self, tokenizer: Any) -> list[int]:
        """The ids the generator gets: the loader's own when present (re-tokenising a chat-templated
        text would add a second BOS), else the text tokenised as the tokenizer normally does."""
        return list(self.ids) if self.ids is not None else list(tokenizer(self.text)["input_ids"])


@dataclass(frozen=True)
class Cursor:
    """Where the run is in the data: epoch number and position inside that epoch's order."""

    epoch: int = 0
    position: int = 0


def _read_rows(cfg: DatasetConfig) -> list[dict]:
    path = Path(cfg.path)
    if not path.is_file():
        raise ConfigError(f"dataset.path={cfg.path!r} does not exist; point it at a local .jsonl or .parquet file")
    fmt = cfg.format if cfg.format != "auto" else ("parquet" if path.suffix == ".parquet" else "jsonl")
    if fmt == "parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ConfigError("dataset.format=parquet needs pyarrow: pip install pyarrow, or convert to jsonl") from e
        return pq.read_table(path).to_pylist()
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ConfigError(f"dataset.path {path}:{lineno}: not valid JSON ({e.msg})") from e
    return rows


def load_prompts(cfg: DatasetConfig) -> list[PromptRow]:
    """Rows of the dataset as PromptRows; a missing column is a config error naming it."""
    rows = _read_rows(cfg)
    if not rows:
        raise ConfigError(f"dataset.path={cfg.path!r} holds no rows")
    out = []
    for i, row in enumerate(rows):
        missing = [c for c in (cfg.prompt_column, *cfg.metadata_columns) if c not in row]
        if missing:
            raise ConfigError(
                f"dataset row {i} has no column(s) {missing}; its columns are {sorted(row)}: "
                "set dataset.prompt_column / dataset.metadata_columns accordingly"
            )
        out.append(PromptRow(str(row[cfg.prompt_column]), {c: str(row[c]) for c in cfg.metadata_columns}))
    return out


def load_rows(cfg: DatasetConfig, tokenizer: Any, log: Any = print) -> list[PromptRow]:
    """The training prompts of the run: plain rows (kind prompts) or the real-data loader's examples,
    rendered and tokenised with the policy's tokenizer; skipped bad rows and the held-out size are logged."""
    return load_split(cfg, tokenizer, log)[0]


def load_split(cfg: DatasetConfig, tokenizer: Any, log: Any = print, *,
               what: str = "training prompts") -> tuple[list[PromptRow], list[PromptRow]]:
    """(training prompts, held-out prompts) of one load: the held-out rows are dataset.eval_size / eval_path's
    (none for kind prompts). `what` names the first list in the log line."""
    if cfg.kind == "prompts":
        return load_prompts(cfg), []
    try:
        loaded = load_dataset(cfg.spec(), tokenizer)
    except DatasetError as e:
        raise ConfigError(f"dataset: {e}") from e
    if loaded.skipped:
        log(f"dataset: skipped {loaded.skipped} bad row(s) {loaded.skipped_reasons}; first: {loaded.skipped_first}")
    log(f"dataset: {len(loaded.train)} {what} ({cfg.kind}), {len(loaded.eval)} held out")
    return ([PromptRow(e.prompt, e.metadata, e.prompt_ids) for e in loaded.train],
            [PromptRow(e.prompt, e.metadata, e.prompt_ids) for e in loaded.eval])


class PromptStream:
    """Deterministic batches of prompts; wraps to a freshly shuffled epoch at the end."""

    def __init__(self, rows: list[PromptRow], *, seed: int, shuffle: bool, cursor: Cursor | None = None) -> None:
        self.rows = rows
        self.seed = seed
        self.shuffle = shuffle
        self.cursor = cursor or Cursor()

    def order(self, epoch: int) -> list[int]:
        """Indices of the rows in the order epoch `epoch` visits them."""
        idx = list(range(len(self.rows)))
        if self.shuffle:
            random.Random(f"quartet-data:{self.seed}:{epoch}").shuffle(idx)
        return idx

    def next_batch(self, n: int) -> list[PromptRow]:
        """The next n prompts (crossing into the next epoch when this one runs out)."""
        epoch, pos = self.cursor.epoch, self.cursor.position
        order = self.order(epoch)
        picked = []
        while len(picked) < n:
            if pos >= len(order):
                epoch, pos = epoch + 1, 0
                order = self.order(epoch)
            picked.append(self.rows[order[pos]])
            pos += 1
        self.cursor = Cursor(epoch, pos)
        return picked
