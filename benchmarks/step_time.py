"""Step time of GRPO through Quartet's services against a lean single-process GRPO step (issue 14).

Workload (the issue's recipe): 8 prompts x 8 samples, <= 6 new tokens, the ~1M-parameter demo model
after its warm-up, the arithmetic rule reward, GRPO with lr 3e-5, beta 0.04 (k3 KL to a frozen
reference in the loss), token-mean loss, one epoch on the whole batch.

- Quartet: the embedded stack (`quartet demo`'s services as local child processes) driven by the
  orchestrator in this process; phases from its step log, the step from `step_seconds`.
- Lean reference: what a single-process trainer does and nothing more. Sample with transformers'
  `generate` on the policy itself (no weight copy), the rule reward in-process, one no-grad forward
  of the reference, then one forward + backward of the GRPO loss whose old log-probs are the
  detached log-probs of that same forward (one epoch on fresh samples: the ratio is exactly 1), and
  an Adam step. No separate old-log-prob pass, no micro-batching, no metrics.

The two alternate step by step in this one process (Quartet step k, reference step k, ...), so that
a load change on the box hits both; the report gives medians over the steps after the warm-up and
the ratio Quartet / reference per phase and per step, and the box's load average before and after.
Each RPC's server-side seconds (decode, model, encode) come from the services' Prometheus endpoints
(quartet_rpc_duration_seconds): the rest of a phase is the call itself (client, channel, waiting).

    python benchmarks/step_time.py [--steps 40] [--warmup 5] [--from-demo runs/demo] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import urllib.request
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the shared helpers are imported as `benchmarks.*`
    sys.path.insert(0, str(REPO))

RECIPE = ["prompts_per_step=8", "algorithm.lr=3e-5", "algorithm.kl_coef=0.04", "algorithm.aggregation=token_mean",
          "metrics_port=null"]
PROMPTS, SAMPLES, NEW_TOKENS, LR, BETA, CLIP = 8, 8, 6, 3e-5, 0.04, 0.2


def rpc_seconds(port: int) -> dict[tuple[str, str], tuple[float, float]]:
    """(role, method) -> (sum of seconds, count) of a service's server-side RPC durations (call start
    to last response: decoding, the model, encoding) from its Prometheus endpoint."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[tuple[str, str], list[float]] = {}
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            if sample.name in ("quartet_rpc_duration_seconds_sum", "quartet_rpc_duration_seconds_count"):
                key = (sample.labels["role"], sample.labels["method"])
                out.setdefault(key, [0.0, 0.0])[sample.name.endswith("_count")] += sample.value
    return {k: (v[0], v[1]) for k, v in out.items()}


class LeanGRPO:
    """The lean single-process GRPO step: generate, score, reference forward, one forward + backward, Adam."""

    def __init__(self, policy_dir: Path, train: Path, *, threads: int) -> None:
        from demo.modelkit.arithmetic import load_jsonl
        from services.common.hf import load_causal_lm, load_tokenizer

        self.threads = threads
        self.tok = load_tokenizer(policy_dir)
        self.model = load_causal_lm(policy_dir, dtype=torch.float32, device="cpu").eval()
        self.ref = load_causal_lm(policy_dir, dtype=torch.float32, device="cpu").eval()
        self.ref.requires_grad_(False)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=LR)
        self.rows = load_jsonl(train)
        self.pad = self.tok.pad_token_id

    def step(self, step: int) -> dict[str, float]:
        from demo.modelkit.evaluate import left_pad
        from services.reward.rule import is_correct

        tok, pad, eos = self.tok, self.pad, self.tok.eos_token_id
        batch = [self.rows[(step * PROMPTS + i) % len(self.rows)] for i in range(PROMPTS)]
        prompts = [list(tok(r["prompt"])["input_ids"]) for r in batch]
        t0 = time.perf_counter()
        ids, attn = left_pad(prompts, pad)
        with torch.no_grad():
            seqs = self.model.generate(input_ids=ids, attention_mask=attn, do_sample=True, max_new_tokens=NEW_TOKENS,
                                       num_return_sequences=SAMPLES, pad_token_id=pad, eos_token_id=eos, top_k=0)
        completions = []
        for seq in seqs[:, ids.shape[1]:].tolist():
            completions.append(seq[:seq.index(eos) + 1] if eos in seq else seq)
        t1 = time.perf_counter()
        texts = tok.batch_decode(completions, skip_special_tokens=True)
        rewards = torch.tensor([float(is_correct(t, batch[k // SAMPLES]["answer"])) for k, t in enumerate(texts)])
        grouped = rewards.view(PROMPTS, SAMPLES)
        adv = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1, 1)
        t2 = time.perf_counter()
        # Right-padded prompt ++ completion rows; response token k of row i is predicted at start_i + k - 1.
        rows = [p + c for k, c in enumerate(completions) for p in [prompts[k // SAMPLES]]]
        width, t_max = max(map(len, rows)), max(map(len, completions))
        input_ids = torch.full((len(rows), width), pad, dtype=torch.int64)
        attention = torch.zeros_like(input_ids)
        for i, r in enumerate(rows):
            input_ids[i, :len(r)], attention[i, :len(r)] = torch.tensor(r), 1
        start = torch.tensor([len(prompts[k // SAMPLES]) for k in range(len(rows))])
        steps = torch.arange(t_max)
        mask = (steps[None, :] < torch.tensor([len(c) for c in completions])[:, None]).float()
        pos = (start[:, None] - 1 + steps[None, :]).clamp(max=width - 1)
        target = input_ids.gather(1, (pos + 1).clamp(max=width - 1))

        keep = width - int(start.min()) + 1  # logits only from the first position that predicts a response token

        def token_logprobs(model: torch.nn.Module) -> torch.Tensor:
            logits = model(input_ids=input_ids, attention_mask=attention, logits_to_keep=keep).logits
            at = (pos - (width - keep)).clamp(min=0)
            picked = logits.gather(1, at[:, :, None].expand(-1, -1, logits.shape[-1])).log_softmax(-1)
            return picked.gather(2, target[:, :, None]).squeeze(2)

        with torch.no_grad():
            ref_lp = token_logprobs(self.ref)
        t3 = time.perf_counter()
        lp = token_logprobs(self.model)
        ratio = torch.exp(lp - lp.detach())  # old log-probs = this forward's, detached: exactly 1 on-policy
        surrogate = -torch.min(ratio * adv, ratio.clamp(1 - CLIP, 1 + CLIP) * adv)
        kl = torch.exp(ref_lp - lp) - (ref_lp - lp) - 1  # k3 (DeepSeekMath eq. 4)
        loss = ((surrogate + BETA * kl) * mask).sum() / mask.sum()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        t4 = time.perf_counter()
        return {"generate": t1 - t0, "score": t2 - t1, "reference": t3 - t2, "update": t4 - t3, "step": t4 - t0}


def median_table(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for r in rows for k in r})
    return {k: statistics.median(r.get(k, 0.0) for r in rows) for k in keys}


def summary(quartet: list[dict[str, float]], single: list[dict[str, float]], server: dict[str, float]) -> dict:
    q, s = median_table(quartet), median_table(single)
    pairs = [a["step"] / b["step"] for a, b in zip(quartet, single, strict=True)]
    return {"quartet_median_seconds": q, "ratio_of_medians": {k: q[k] / s[k] for k in q if s.get(k)},
            "step_ratio_median_of_pairs": statistics.median(pairs),
            "in_service_mean_seconds": {k: v for k, v in server.items() if not k.endswith(("GetInfo", "Health"))}}


def run(policy: Path, train: Path, run_dir: Path, *, steps: int, warmup: int, variants: dict[str, list[str]],
        lean_threads: int) -> dict:
    """Each variant (name -> run-config overrides) as its own embedded stack, and the lean reference,
    one step of each in turn."""
    from contextlib import ExitStack

    from demo.run import demo_config
    from orchestrator.run.session import Session

    lean = LeanGRPO(policy, train, threads=lean_threads)
    single: list[dict[str, float]] = []
    quartet: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    server: dict[str, dict[str, float]] = {}
    with ExitStack() as stack:
        sessions = {name: stack.enter_context(Session(  # a benchmark re-measures: its last run is not kept
            demo_config("grpo", steps=steps + warmup, run_dir=run_dir / name, policy=policy, dataset=train, seed=0,
                        overrides=[*RECIPE, *extra]), overwrite=True)) for name, extra in variants.items()}
        ports = {name: [s.metrics_port for s in ses.stack.services.values() if s.metrics_port]
                 for name, ses in sessions.items()}

        def scrape(name: str) -> dict[tuple[str, str], tuple[float, float]]:
            return {key: v for port in ports[name] for key, v in rpc_seconds(port).items()}

        own_threads = torch.get_num_threads()
        before: dict[str, dict[tuple[str, str], tuple[float, float]]] = {}
        for k in range(steps + warmup):
            if k == warmup:
                before = {name: scrape(name) for name in sessions}
            for name, ses in sessions.items():
                r = ses.orchestrator.step()
                if k >= warmup:
                    quartet[name].append({**r.phases, "step": r.metrics["step_seconds"]})
            torch.set_num_threads(lean.threads)
            ref = lean.step(k)
            torch.set_num_threads(own_threads)
            if k >= warmup:
                single.append(ref)
        for name in sessions:
            after = scrape(name)
            server[name] = {f"{role}.{method}": (v[0] - before[name].get((role, method), (0.0, 0.0))[0]) / steps
                            for (role, method), v in after.items()}
    return {"reference_median_seconds": median_table(single),
            "variants": {name: {"overrides": variants[name], **summary(quartet[name], single, server[name])}
                         for name in variants},
            "steps_measured": steps, "lean_threads": lean_threads}


def main() -> None:
    from benchmarks.reports import write_report

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5, help="first steps of each left out of the medians")
    ap.add_argument("--run-dir", type=Path, default=Path("runs/bench-step-time"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--from-demo", type=Path, default=None,
                    help="reuse a demo run directory's warmup/ and task/ instead of warming up again")
    ap.add_argument("--lean-threads", type=int, default=1,
                    help="torch threads of the lean reference (Quartet's trainer and services use 1 each)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="extra run-config overrides for Quartet")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                    help="also run Quartet with these overrides (on top of --set), alternating with the others, "
                         "e.g. separate-pass:algorithm.reuse_loss_forward=false")
    args = ap.parse_args()
    torch.set_num_threads(1)  # as the orchestrator (models.threads) and the local services

    from demo.run import prepare

    if args.from_demo is not None:
        policy, train = args.from_demo / "warmup", args.from_demo / "task" / "train.jsonl"
    else:
        prep = prepare(args.run_dir, seed=0, log=print)
        policy, train = prep.policy_dir, prep.train_path
    load_before = os.getloadavg()
    variants = {"quartet": args.overrides}
    for v in args.variant:
        name, _, sets = v.partition(":")
        variants[name] = [*args.overrides, *filter(None, sets.split(","))]
    report = run(policy, train, args.run_dir / "rl", steps=args.steps, warmup=args.warmup, variants=variants,
                 lean_threads=args.lean_threads)
    report["loadavg_before_after"] = [list(load_before), list(os.getloadavg())]
    s = report["reference_median_seconds"]
    for name, v in report["variants"].items():
        q, ratio = v["quartet_median_seconds"], v["ratio_of_medians"]
        print(f"\n{name} {v['overrides']}\n{'phase':<16}{'Quartet s':>10}{'lean s':>10}{'ratio':>8}   "
              f"medians of {args.steps} steps")
        for k in [*(p for p in q if p != "step"), "step"]:
            lean = f"{s[k]:>10.4f}" if k in s else f"{'-':>10}"
            rat = f"{ratio[k]:>8.2f}" if k in ratio else f"{'':>8}"
            print(f"{k:<16}{q[k]:>10.4f}{lean}{rat}")
        print("in service (mean s/step): " + ", ".join(f"{k} {x:.4f}" for k, x in v["in_service_mean_seconds"].items()))
        print(f"step ratio, median of per-step pairs: {v['step_ratio_median_of_pairs']:.3f}")
    print(f"load average (1 min) before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}")
    write_report(report, args.out or args.run_dir / "step_time.json")


if __name__ == "__main__":
    main()
