"""Peak memory and time of one GRPO update against `algorithm.micro_batch_tokens` (one process per budget).

    python benchmarks/trainer_memory.py --model DIR [--budgets 16384 2048 512] [--rows 16] [--prompt 130] [--completion 200]

Each budget runs in a fresh process (ru_maxrss is a high-water mark): load the model, build the
experience of `--rows` random sequences, one `PolicyTrainer.update`; it prints the update's seconds,
the process's peak RSS, and the loss and gradient norm (equal across budgets: micro-batching
accumulates the same gradient).
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def one_update(model_dir: str, budget: int, rows: int, prompt: int, completion: int) -> str:
    import torch
    from transformers import AutoModelForCausalLM

    from orchestrator.run.algo_config import AlgorithmConfig
    from orchestrator.step.experience import Rollout, build_experience
    from orchestrator.step.trainer import PolicyTrainer

    torch.set_num_threads(1)  # as the orchestrator (models.threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, vocab, (prompt,), generator=g).tolist() for _ in range(rows)]
    completions = [torch.randint(10, vocab, (completion,), generator=g).tolist() for _ in range(rows)]
    cfg = AlgorithmConfig(name="grpo", kl_coef=0.0, micro_batch_tokens=budget)
    rollout = Rollout(prompt_ids=prompts, completion_ids=completions,
                      generator_logprobs=[[-2.0] * completion] * rows,
                      rewards=torch.tensor([float(i % 2) for i in range(rows)]), group_size=min(rows, 8))
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    trainer = PolicyTrainer(model, cfg, seed=0)
    start = time.perf_counter()
    stats = trainer.update(build_experience(rollout, model, cfg, pad_token_id=0))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return (f"micro_batch_tokens {budget:6d}: update {time.perf_counter() - start:5.1f} s, peak RSS {peak:5.2f} GiB "
            f"(model loaded: {loaded:.2f} GiB), loss {stats.policy_loss:.6f}, grad_norm {stats.grad_norm:.6f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--budgets", type=int, nargs="+", default=[16384, 2048, 512])
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=130)
    ap.add_argument("--completion", type=int, default=200)
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the child process of one budget
    args = ap.parse_args()
    if args.one is not None:
        print(one_update(args.model, args.one, args.rows, args.prompt, args.completion), flush=True)
        return
    for budget in args.budgets:
        subprocess.run([sys.executable, __file__, "--model", args.model, "--one", str(budget), "--rows", str(args.rows),
                        "--prompt", str(args.prompt), "--completion", str(args.completion)], check=True)


if __name__ == "__main__":
    main()
