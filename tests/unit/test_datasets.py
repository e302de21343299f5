"""orchestrator/run/datasets.py: formats, column mapping, references, bad rows, the held-out split.

The chat-template rendering with a real tokenizer is checked token by token in
tests/integration/test_real_model.py; here prompts go through no tokenizer or the tiny char one.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from orchestrator.run.datasets import (
    DatasetError,
    DatasetSpec,
    load_dataset,
    packaged_dataset_path,
    render_prompt,
)

HAVE_PYARROW = importlib.util.find_spec("pyarrow") is not None
HAVE_DATASETS = importlib.util.find_spec("datasets") is not None
ROWS = [
    {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7", "id": "a"},
    {"question": "A shop sells 1,000 pens a day. How many in 2 days?", "answer": "#### 2,000", "id": "b"},
    {"question": "Half of 10?", "answer": "10/2 = 5\n#### 5", "id": "c"},
]


def _jsonl(path: Path, rows: list, raw_lines: dict[int, str] | None = None) -> Path:
    lines = [json.dumps(r) for r in rows]
    for index, text in (raw_lines or {}).items():
        lines.insert(index, text)
    path.write_text("\n".join(lines) + "\n")
    return path


def _spec(path: Path, **kw) -> DatasetSpec:
    return DatasetSpec(path=str(path), kind="gsm8k", **kw)


def test_jsonl_gsm8k_references_metadata_and_sources(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", ROWS)
    data = load_dataset(_spec(path, metadata={"row_id": "id"}))
    assert [e.answer for e in data.train] == ["7", "2000", "5"]
    assert data.train[1].metadata == {"row_id": "b", "answer": "2000"}
    assert [e.source for e in data.train] == [f"{path}:1", f"{path}:2", f"{path}:3"]
    assert data.train[0].prompt == ROWS[0]["question"] and data.train[0].prompt_ids is None
    assert (data.eval, data.skipped) == ([], 0)


def test_column_mapping_joined_question_template_and_answer_key(tmp_path: Path) -> None:
    rows = [{"Body": "There are 87 oranges.", "Question": "How many groups?", "Answer": 145.0, "Type": "Div"}]
    path = _jsonl(tmp_path / "svamp.jsonl", rows)
    spec = DatasetSpec(path=str(path), kind="svamp", template="[{Type}] {question} Answer with a number.",
                       answer_key="target")
    (example,) = load_dataset(spec).train
    assert example.question == "[Div] There are 87 oranges. How many groups? Answer with a number."
    assert example.metadata == {"target": "145"} and example.answer == "145"
    custom = DatasetSpec(path=str(path), question="Question", answer="Answer", reference="plain")
    assert load_dataset(custom).train[0].answer == "145.0"


def test_bad_row_error_names_file_and_line(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", ROWS, raw_lines={2: '{"question": "no answer column"}'})
    with pytest.raises(DatasetError, match=rf"{path}:3: no value in column\(s\) \['answer'\].*bad_rows: skip"):
        load_dataset(_spec(path))
    path = _jsonl(tmp_path / "e.jsonl", ROWS, raw_lines={1: "{not json"})
    with pytest.raises(DatasetError, match=rf"{path}:2: not valid JSON"):
        load_dataset(_spec(path))
    path = _jsonl(tmp_path / "f.jsonl", [*ROWS, {"question": "q", "answer": "the answer is 4"}])
    with pytest.raises(DatasetError, match=rf"{path}:4: reference \(gsm8k\) from column 'answer': no '####"):
        load_dataset(_spec(path))


def test_skip_policy_counts_every_dropped_row(tmp_path: Path) -> None:
    bad = {1: "{not json", 3: '{"question": "q"}', 5: '{"question": "  ", "answer": "#### 1"}', 6: "[1, 2]"}
    path = _jsonl(tmp_path / "d.jsonl", ROWS, raw_lines=bad)
    data = load_dataset(_spec(path, bad_rows="skip"))
    assert len(data.train) == 3 and data.skipped == 4
    assert data.skipped_reasons == {"invalid_json": 1, "missing_column": 1, "empty_question": 1, "not_an_object": 1}
    assert data.skipped_first[0].startswith(f"{path}:2: not valid JSON")


def test_all_rows_bad_is_an_error_with_the_counts(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", [{"q": 1}])
    with pytest.raises(DatasetError, match=r"no usable rows \(1 skipped: \{'missing_column': 1\}\)"):
        load_dataset(_spec(path, bad_rows="skip"))


def test_held_out_split_is_seeded_disjoint_and_complete(tmp_path: Path) -> None:
    rows = [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(20)]
    path = _jsonl(tmp_path / "d.jsonl", rows)
    a = load_dataset(_spec(path, eval_size=5, eval_seed=1))
    b = load_dataset(_spec(path, eval_size=5, eval_seed=1))
    c = load_dataset(_spec(path, eval_size=5, eval_seed=2))
    held = {e.answer for e in a.eval}
    assert len(held) == 5 and held.isdisjoint(e.answer for e in a.train)
    assert held | {e.answer for e in a.train} == {str(i) for i in range(20)}
    assert [e.answer for e in a.eval] == [e.answer for e in b.eval] != [e.answer for e in c.eval]
    assert [e.answer for e in a.train] == sorted((e.answer for e in a.train), key=int)  # file order kept
    with pytest.raises(DatasetError, match="eval_size=20 leaves no training rows"):
        load_dataset(_spec(path, eval_size=20))
    limited = load_dataset(_spec(path, limit=10, eval_size=2))
    assert len(limited.train) == 8 and all(int(e.answer) < 10 for e in [*limited.train, *limited.eval])


def test_eval_path_is_a_separate_file(tmp_path: Path) -> None:
    train = _jsonl(tmp_path / "train.jsonl", ROWS)
    test = _jsonl(tmp_path / "test.jsonl", ROWS[:2])
    data = load_dataset(_spec(train, eval_path=str(test)))
    assert len(data.train) == 3 and [e.source for e in data.eval] == [f"{test}:1", f"{test}:2"]
    assert len(load_dataset(_spec(train, eval_path=str(test), eval_size=1)).eval) == 1


def test_csv_lines_count_multiline_fields(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text('question,answer\n"two\nlines",#### 1\nq2,#### 2\nq3,no marker\n')
    with pytest.raises(DatasetError, match=rf"{path}:5: reference"):
        load_dataset(_spec(path))
    data = load_dataset(_spec(path, bad_rows="skip"))
    assert [e.source for e in data.train] == [f"{path}:2", f"{path}:4"] and data.skipped == 1
    assert data.train[0].question == "two\nlines"


def test_json_list_file(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ROWS))
    assert [e.source for e in load_dataset(_spec(path)).train][-1] == f"{path} row 3"
    path.write_text(json.dumps({"rows": ROWS}))
    with pytest.raises(DatasetError, match="must be a list of objects"):
        load_dataset(_spec(path))


@pytest.mark.skipif(not HAVE_PYARROW, reason="pyarrow not installed (pip install pyarrow)")
def test_parquet_rows_are_numbered(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([*ROWS, {"question": "q", "answer": None, "id": "d"}]), path)
    with pytest.raises(DatasetError, match=rf"{path} row 4: no value in column"):
        load_dataset(_spec(path))
    assert [e.answer for e in load_dataset(_spec(path, bad_rows="skip")).train] == ["7", "2000", "5"]


@pytest.mark.skipif(not HAVE_DATASETS, reason="datasets not installed (pip install datasets)")
def test_hugging_face_datasets_load_from_disk_and_load_dataset(tmp_path: Path) -> None:
    import datasets

    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                          "test": datasets.Dataset.from_list(ROWS[:1])}).save_to_disk(str(folder))
    with pytest.raises(DatasetError, match=r"holds splits \['test', 'train'\]; set split"):
        load_dataset(_spec(folder))
    assert len(load_dataset(_spec(folder, split="train")).train) == 3
    assert load_dataset(_spec(folder, split="test")).train[0].source == f"{folder} row 1"
    with pytest.raises(DatasetError, match="has no split 'dev'"):
        load_dataset(_spec(folder, split="dev"))
    path = _jsonl(tmp_path / "d.jsonl", ROWS)
    via = load_dataset(_spec(path, reader="datasets"))
    assert [e.answer for e in via.train] == ["7", "2000", "5"]


def test_missing_optional_package_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "datasets" else real(name, *a))
    (tmp_path / "saved").mkdir()
    with pytest.raises(DatasetError, match="needs the datasets package: pip install datasets"):
        load_dataset(_spec(tmp_path / "saved"))


def test_spec_errors_say_what_to_change(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(_spec(tmp_path / "none.jsonl"))
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DatasetError, match="set format to one of"):
        load_dataset(_spec(tmp_path / "d.txt"))
    with pytest.raises(ValidationError, match="not a valid format string"):
        DatasetSpec(path="x", template="{question")
    with pytest.raises(ValidationError, match="extra"):
        DatasetSpec(path="x", colums=["q"])


def test_prompts_without_a_chat_template(tiny_checkpoint: Path) -> None:
    from services.common.hf import load_tokenizer

    tokenizer = load_tokenizer(tiny_checkpoint)
    text, ids = render_prompt("12+7=", tokenizer)  # chat: auto falls back to the plain text
    assert text == "12+7=" and tokenizer.decode(ids, skip_special_tokens=True) == "12+7="
    with pytest.raises(DatasetError, match=r"no chat template.*set chat: off"):
        render_prompt("12+7=", tokenizer, chat="on")
    with pytest.raises(DatasetError, match="system_prompt needs the chat template"):
        render_prompt("12+7=", tokenizer, system_prompt="Be brief.")


@pytest.mark.parametrize(("kind", "split", "rows", "skipped"), [
    ("gsm8k", "test", 1319, {}), ("gsm8k", "train", 7473, {}), ("math", "test", 5000, {}),
    ("math", "train", 7498, {"no_reference": 2}),  # two solutions with an empty \boxed{} (test_extract.py)
    ("svamp", "test", 1000, {}), ("mawps", "test", 2065, {}), ("math500", "test", 500, {}),
    ("asdiv", "test", 2093, {"no_reference": 122}),  # names, yes/no, ordinals, ratios, times: not numbers
])
def test_every_packaged_dataset_loads_by_its_preset(kind: str, split: str, rows: int, skipped: dict) -> None:
    try:
        path = packaged_dataset_path(kind, split)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    data = load_dataset(DatasetSpec(path=str(path), kind=kind, bad_rows="skip"))  # type: ignore[arg-type]
    assert (len(data.train), data.skipped_reasons) == (rows, skipped)
    assert all(e.answer and e.question for e in data.train)


class _CountingTokenizer:
    """Tokenizes by words, counting the prompts it renders."""

    chat_template = None

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, text: str) -> dict:
        self.calls += 1
        return {"input_ids": [1] + [4] * len(text.split())}


def test_limit_stops_reading_and_rendering(tmp_path: Path) -> None:
    rows = [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(50)]
    path = _jsonl(tmp_path / "d.jsonl", rows, raw_lines={30: "not json"})  # a bad row past the limit
    tok = _CountingTokenizer()
    data = load_dataset(_spec(path, limit=5, eval_size=1), tok)
    assert tok.calls == 5  # rows past the limit are never rendered (was: all 50)
    assert sorted(e.answer for e in [*data.train, *data.eval]) == ["0", "1", "2", "3", "4"]
    with pytest.raises(DatasetError, match=":31"):  # without a limit the bad row is still reported
        load_dataset(_spec(path), tok)
