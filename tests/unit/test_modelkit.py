"""The tiny model kit: tokenizer, checkpoint round trip, arithmetic task, warm-up, greedy evaluation.

Through the names the package exports, and its submodules for the helpers it does not export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from demo.modelkit import (
    build_char_tokenizer,
    build_tiny_model,
    count_parameters,
    encode_answer,
    encode_prompt,
    extract_number,
    greedy_accuracy,
    greedy_complete,
    is_correct,
    load_jsonl,
    make_arithmetic_rows,
    make_arithmetic_task,
    make_dev_rows,
    make_tiny_checkpoint,
    save_checkpoint,
    sft_warmup,
)
from demo.modelkit.evaluate import left_pad
from demo.modelkit.tokenizer import ALPHABET
from demo.modelkit.warmup import collate_sft

TEXTS = ["23+48=", "71", "-5", "12*3=36", "what is 7 - 9 ?", "a, b. c: (d)!/", "  two  spaces ", ""]


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=1)


# --- tokenizer -------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trip(tokenizer, text: str) -> None:
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert len(ids) == 1 + len(text)  # one token per character, after <bos>
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_tokenizer_ids_and_specials(tokenizer) -> None:
    assert len(tokenizer) == 4 + len(ALPHABET)
    assert (
        tokenizer.pad_token_id,
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.unk_token_id,
    ) == (0, 1, 2, 3)
    assert tokenizer("23+48=", add_special_tokens=False)["input_ids"] == [6, 7, 14, 8, 12, 17]
    assert tokenizer("Q", add_special_tokens=False)["input_ids"] == [tokenizer.unk_token_id]  # no lowercasing
    assert tokenizer.decode([6, 7, tokenizer.eos_token_id], skip_special_tokens=True) == "23"


# --- model and checkpoint ----------------------------------------------------------------------------


def test_build_is_seeded_and_leaves_global_rng_alone(tokenizer) -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_tiny_model(tokenizer, seed=5)
    assert torch.equal(torch.rand(1), before)
    b = build_tiny_model(tokenizer, seed=5)
    c = build_tiny_model(tokenizer, seed=6)
    wa, wb, wc = (m.get_input_embeddings().weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert a.get_output_embeddings().weight.data_ptr() == wa.data_ptr()  # tied
    assert a.config.vocab_size == len(tokenizer) and not a.training


def test_parameter_counts(tokenizer) -> None:
    assert count_parameters(build_tiny_model(tokenizer)) == 134_848
    demo = build_tiny_model(tokenizer, hidden_size=128, num_layers=4, intermediate_size=512)
    assert count_parameters(demo) == 1_056_640


def test_checkpoint_loads_with_plain_transformers(checkpoint: Path, tokenizer) -> None:
    files = {p.name for p in checkpoint.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    tok = AutoTokenizer.from_pretrained(str(checkpoint), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), local_files_only=True)
    for text in TEXTS:
        assert tok(text)["input_ids"] == tokenizer(text)["input_ids"]

    # prompt -> ids -> a few generated tokens -> text, through the reloaded pair only
    enc = tok("23+48=", return_tensors="pt")
    out = model.generate(
        **enc, max_new_tokens=4, do_sample=False, min_new_tokens=4, pad_token_id=tok.pad_token_id
    )
    assert out.shape == (1, 7 + 4)
    text = tok.decode(out[0], skip_special_tokens=True)
    assert text.startswith("23+48=")
    assert text == "23+48=" + tok.decode(out[0, 7:], skip_special_tokens=True)


def test_reloaded_logits_equal_in_memory(tmp_path: Path, tokenizer) -> None:
    model = build_tiny_model(tokenizer, seed=9)
    save_checkpoint(model, tokenizer, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), local_files_only=True).eval()
    ids = torch.tensor([tokenizer("12+34=56")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


def test_qwen2_checkpoint_refused(tmp_path: Path) -> None:
    # transformers 5 reloads any qwen2 checkpoint's tokenizer as a byte-level BPE that drops spaces.
    with pytest.raises(RuntimeError, match="arch='llama'"):
        make_tiny_checkpoint(tmp_path, arch="qwen2")


# --- arithmetic task -----------------------------------------------------------------------------------


def test_task_files_seeded_and_disjoint(tmp_path: Path) -> None:
    tr1, te1 = make_arithmetic_task(tmp_path / "a", n_train=300, n_test=50, seed=7)
    tr2, te2 = make_arithmetic_task(tmp_path / "b", n_train=300, n_test=50, seed=7)
    _, te3 = make_arithmetic_task(tmp_path / "c", n_train=300, n_test=50, seed=8)
    assert tr1.read_bytes() == tr2.read_bytes() and te1.read_bytes() == te2.read_bytes()
    assert te1.read_bytes() != te3.read_bytes()
    train, test = load_jsonl(tr1), load_jsonl(te1)
    assert len(train) == 300 and len(test) == 50
    prompts = [r["prompt"] for r in train + test]
    assert len(set(prompts)) == 350
    for r in train + test:
        a, b = r["prompt"].removesuffix("=").split("+")
        assert r["answer"] == str(int(a) + int(b)) and 0 <= int(a) <= 99 and 0 <= int(b) <= 99
    assert json.loads(tr1.read_text().splitlines()[0]).keys() == {"prompt", "answer"}


def test_dev_rows_are_held_out_from_train_and_test_and_leave_them_unchanged(tmp_path: Path) -> None:
    tr, te = make_arithmetic_task(tmp_path / "a", n_train=300, n_test=50, seed=7, n_dev=40)
    tr0, te0 = make_arithmetic_task(tmp_path / "b", n_train=300, n_test=50, seed=7)
    assert tr.read_bytes() == tr0.read_bytes() and te.read_bytes() == te0.read_bytes()
    dev = load_jsonl(tmp_path / "a" / "dev.jsonl")
    assert len(dev) == 40 and not (tmp_path / "b" / "dev.jsonl").exists()
    used = {r["prompt"] for r in load_jsonl(tr) + load_jsonl(te)}
    assert len({r["prompt"] for r in dev}) == 40 and not used & {r["prompt"] for r in dev}
    assert make_dev_rows(load_jsonl(tr), load_jsonl(te), n_dev=40, seed=7) == dev
    with pytest.raises(ValueError, match="n_dev=9999 must be between 0 and 9650"):
        make_dev_rows(load_jsonl(tr), load_jsonl(te), n_dev=9999, seed=7)


def test_task_ops_and_limits() -> None:
    train, test = make_arithmetic_rows(n_train=10, n_test=6, seed=0, max_operand=3, ops=("-", "*"))
    assert {r["prompt"][1] for r in train + test} <= {"-", "*"}
    assert {"prompt": "0-3=", "answer": "-3"} in make_arithmetic_rows(
        n_train=32, n_test=0, seed=0, max_operand=3, ops=("-", "*")
    )[0]
    with pytest.raises(ValueError, match="at most 16"):
        make_arithmetic_rows(n_train=10, n_test=7, seed=0, max_operand=3)
    with pytest.raises(ValueError, match="ops"):
        make_arithmetic_rows(n_train=1, n_test=1, seed=0, ops=("/",))


def test_load_jsonl_names_bad_line(tmp_path: Path) -> None:
    p = tmp_path / "x.jsonl"
    p.write_text('{"prompt": "1+1=", "answer": "2"}\n\nnot json\n')
    with pytest.raises(ValueError, match=r"x\.jsonl:3"):
        load_jsonl(p)


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("71", "71"),
        ("71<eos>", "71"),
        ("71=3", "71"),
        ("-12", "-12"),
        ("007", "7"),
        ("-0", "0"),
        ("", None),
        ("-", None),
        ("=5", None),
        (" 5", None),
        ("x9", None),
        ("5 6", "5"),
    ],
)
def test_extract_number(text: str, want: str | None) -> None:
    assert extract_number(text) == want


def test_is_correct() -> None:
    assert is_correct("71", "71") and is_correct("71<eos>", "71") and is_correct("-3", "-3")
    assert not is_correct("711", "71") and not is_correct("7", "71") and not is_correct("", "0")
    assert not is_correct("3", "-3")


# --- warm-up and evaluation ------------------------------------------------------------------------------


def test_collate_labels_only_answer(tokenizer) -> None:
    pairs = [
        (encode_prompt(tokenizer, "1+2="), encode_answer(tokenizer, "3")),
        (encode_prompt(tokenizer, "10+20="), encode_answer(tokenizer, "30")),
    ]
    batch = collate_sft(pairs, tokenizer.pad_token_id)
    assert batch.input_ids.shape == (2, 10)
    assert batch.input_ids[0].tolist() == [1, 5, 14, 6, 17, 7, 2, 0, 0, 0]
    assert batch.labels[0].tolist() == [-100] * 5 + [7, 2] + [-100] * 3
    assert batch.labels[1].tolist() == [-100] * 7 + [7, 4, 2]
    assert batch.attention_mask.sum(1).tolist() == [7, 10]


def test_warmup_reduces_loss_and_changes_every_parameter(tokenizer) -> None:
    model = build_tiny_model(tokenizer, seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train, _ = make_arithmetic_rows(n_train=256, n_test=0, seed=0)
    seen = []
    losses = sft_warmup(
        model,
        tokenizer,
        train,
        steps=30,
        batch_size=32,
        lr=3e-3,
        seed=0,
        progress=lambda step, loss: seen.append(step),
    )
    assert seen == list(range(1, 31)) and len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    assert not model.training
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_warmup_is_deterministic(tokenizer) -> None:
    train, _ = make_arithmetic_rows(n_train=64, n_test=0, seed=0)
    runs = [
        sft_warmup(build_tiny_model(tokenizer), tokenizer, train, steps=3, batch_size=8, lr=1e-3, seed=4)
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


def test_warmup_stops_at_target_accuracy(tokenizer) -> None:
    train, held_out = make_arithmetic_rows(n_train=64, n_test=8, seed=0)
    kw = {"steps": 12, "batch_size": 8, "lr": 1e-3, "seed": 0, "eval_rows": held_out, "eval_every": 5}
    # Accuracy is always >= 0: stops at the first check. Never > 1: runs every step.
    assert len(sft_warmup(build_tiny_model(tokenizer), tokenizer, train, target_accuracy=0.0, **kw)) == 5
    assert len(sft_warmup(build_tiny_model(tokenizer), tokenizer, train, target_accuracy=1.01, **kw)) == 12
    with pytest.raises(ValueError, match="eval_rows"):
        sft_warmup(
            build_tiny_model(tokenizer),
            tokenizer,
            train,
            steps=1,
            batch_size=8,
            lr=1e-3,
            seed=0,
            target_accuracy=0.5,
        )


def test_left_pad() -> None:
    ids, mask = left_pad([[5, 6], [7], []], pad_token_id=0)
    assert ids.tolist() == [[5, 6], [0, 7], [0, 0]] and mask.tolist() == [[1, 1], [0, 1], [0, 0]]


@pytest.fixture(scope="module")
def trained_model(tokenizer):
    """A model with peaked, prompt-dependent predictions: random init decodes almost the same for any prompt."""
    model = build_tiny_model(tokenizer, seed=2)
    train, _ = make_arithmetic_rows(n_train=256, n_test=0, seed=1)
    sft_warmup(model, tokenizer, train, steps=40, batch_size=32, lr=3e-3, seed=0)
    return model


def test_left_padded_batch_decodes_like_one_by_one(tokenizer, trained_model) -> None:
    model = trained_model
    prompts = ["1+2=", "23+48=", "99+99=", "5+50=", "0+0=", "what is 7+8 ?"]  # lengths 5..14 with <bos>
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    batched = greedy_complete(model, tokenizer, ids, max_new_tokens=6)
    alone = [greedy_complete(model, tokenizer, [x], max_new_tokens=6)[0] for x in ids]
    assert batched == alone
    assert len({tuple(c) for c in alone}) > 1  # the check would be vacuous if every prompt decoded alike
    # the same through a hand-written argmax loop with no cache and no padding at all
    for x, want in zip(ids, alone, strict=True):
        seq = list(x)
        with torch.no_grad():
            for _ in range(6):
                nxt = int(model(torch.tensor([seq])).logits[0, -1].argmax())
                seq.append(nxt)
                if nxt == tokenizer.eos_token_id:
                    break
        assert seq[len(x) :] == want


def test_greedy_accuracy_counts_and_batch_size_invariance(tokenizer, trained_model) -> None:
    model = trained_model
    _, test = make_arithmetic_rows(n_train=0, n_test=40, seed=3)
    r = greedy_accuracy(model, tokenizer, test, batch_size=64)
    assert r.n == 40 and len(r.examples) == 40 and r.accuracy == r.correct / 40
    assert r.correct == sum(is_correct(c, a) for _, c, a in r.examples)
    assert [e[0] for e in r.examples] == [t["prompt"] for t in test]
    assert greedy_accuracy(model, tokenizer, test, batch_size=7) == r
    assert greedy_accuracy(model, tokenizer, []).n == 0
