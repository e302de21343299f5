"""Step-time breakdown of the demo workload through the services, next to the same step in one process.

Workload: 8 prompts x 8 samples, up to 6 new tokens, the ~1M-parameter demo model, GRPO with a
reference (KL in the loss), the arithmetic rule reward. The services run as local child processes
(`quartet demo`'s embedded stack). The in-process baseline does the same work with no RPC:
sampling with transformers' generate, the rule reward, a reference forward pass, build_experience +
the same PolicyTrainer update. The difference per step is what the split into services costs
(RPC, serialization, waiting, weight sync), net of what it gains: the services and the trainer
compute side by side (the trainer's log-probs overlap Score and LogProbs).

Inside the services, each RPC's server-side seconds (decoding, the model, encoding) come from
their Prometheus endpoints (quartet_rpc_duration_seconds); what a phase spends beyond them is RPC
transport, client-side (de)serialization and waiting. The report sums that over the step's
critical path: Generate and the weight sync in full, and for the parallel section only what its
slowest member adds beyond its own compute.

    python benchmarks/step_time.py [--steps 30] [--warmup 5] [--out runs/bench/step_time.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def rpc_seconds(port: int) -> dict[tuple[str, str], tuple[float, float]]:
    """(role, method) -> (sum of seconds, count) of a service's server-side RPC durations (call start
    to last response: decoding, the model, encoding) from its Prometheus endpoint."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[tuple[str, str], list[float]] = {}
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            if sample.name in ("quartet_rpc_duration_seconds_sum", "quartet_rpc_duration_seconds_count"):
                key = (sample.labels["role"], sample.labels["method"])
                out.setdefault(key, [0.0, 0.0])[sample.name.endswith("_count")] += sample.value
    return {k: (v[0], v[1]) for k, v in out.items()}


def service_steps(policy: Path, train: Path, run_dir: Path, steps: int, warmup: int) -> tuple[list, dict[str, float]]:
    """The measured steps (after `warmup` ones) and, per RPC, the in-service seconds per step."""
    from demo.run import demo_config
    from orchestrator.run.session import Session

    cfg = demo_config("grpo", steps=steps, run_dir=run_dir, policy=policy, dataset=train, seed=0,
                      overrides=["metrics_port=null", "prompts_per_step=8"])  # the 8 x 8 workload
    with Session(cfg, overwrite=True) as session:  # a benchmark re-measures: its last run is not kept
        o = session.orchestrator
        for _ in range(warmup):
            o.step()
        ports = [s.metrics_port for s in session.stack.services.values() if s.metrics_port]

        def scrape() -> dict[tuple[str, str], tuple[float, float]]:
            return {k: v for port in ports for k, v in rpc_seconds(port).items()}

        before = scrape()
        results = o.run()
        after = scrape()
    n = len(results)
    server = {f"{role}.{method}": (after[(role, method)][0] - before.get((role, method), (0.0, 0.0))[0]) / n
              for role, method in after}
    return results, server


def local_steps(policy: Path, train: Path, steps: int) -> list[dict[str, float]]:
    """The same step without services: one process, the same model sizes and trainer."""
    from demo.modelkit.arithmetic import is_correct, load_jsonl
    from demo.modelkit.evaluate import left_pad
    from orchestrator.run.algo_config import AlgorithmConfig
    from orchestrator.step.experience import Rollout, build_experience
    from orchestrator.step.policy import sequence_logprobs  # noqa: F401  (same code path as the trainer)
    from orchestrator.step.trainer import PolicyTrainer
    from services.common.hf import load_causal_lm, load_tokenizer

    tok = load_tokenizer(policy)
    model = load_causal_lm(policy, dtype=torch.float32, device="cpu")
    gen_model = load_causal_lm(policy, dtype=torch.float32, device="cpu")
    ref = load_causal_lm(policy, dtype=torch.float32, device="cpu")
    cfg = AlgorithmConfig(name="grpo", lr=2e-5)
    trainer = PolicyTrainer(model, cfg, seed=0)
    rows = load_jsonl(train)
    out = []
    for step in range(steps):
        batch = rows[step * 8:(step + 1) * 8]
        prompts = [list(tok(r["prompt"])["input_ids"]) for r in batch]
        t0 = time.perf_counter()
        ids, attn = left_pad(prompts, tok.pad_token_id)
        with torch.no_grad():
            gen = gen_model.generate(input_ids=ids, attention_mask=attn, do_sample=True, max_new_tokens=6,
                                     num_return_sequences=8, output_scores=True, return_dict_in_generate=True,
                                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, top_k=0)
        completions, gen_lp = [], []
        logp = torch.stack(gen.scores, 1).log_softmax(-1)
        for k, seq in enumerate(gen.sequences[:, ids.shape[1]:].tolist()):
            n = seq.index(tok.eos_token_id) + 1 if tok.eos_token_id in seq else len(seq)
            completions.append(seq[:n])
            gen_lp.append([float(logp[k, t, seq[t]]) for t in range(n)])
        t1 = time.perf_counter()
        texts = [tok.decode(c, skip_special_tokens=True) for c in completions]
        rewards = torch.tensor([float(is_correct(t, batch[k // 8]["answer"])) for k, t in enumerate(texts)])
        t2 = time.perf_counter()
        prompt_ids = [prompts[k // 8] for k in range(len(completions))]
        from orchestrator.step.experience import pad_sequences

        tb = pad_sequences(prompt_ids, completions, pad_token_id=tok.pad_token_id)
        with torch.no_grad():
            logits = ref(input_ids=tb.input_ids, attention_mask=tb.attention_mask).logits.log_softmax(-1)
        ref_lp = [logits[i, len(p) - 1:len(p) - 1 + len(c)].gather(1, torch.tensor(c)[:, None])[:, 0]
                  for i, (p, c) in enumerate(zip(prompt_ids, completions, strict=True))]
        t3 = time.perf_counter()
        rollout = Rollout(prompt_ids=prompt_ids, completion_ids=completions, generator_logprobs=gen_lp,
                          rewards=rewards, group_size=8, ref_logprobs=ref_lp)
        exp = build_experience(rollout, model, cfg, pad_token_id=tok.pad_token_id)
        trainer.update(exp)
        t4 = time.perf_counter()
        gen_model.load_state_dict(model.state_dict())  # the in-process "weight sync"
        t5 = time.perf_counter()
        out.append({"generate": t1 - t0, "score": t2 - t1, "reference": t3 - t2, "update": t4 - t3,
                    "sync": t5 - t4, "step": t5 - t0})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5, help="first steps left out of the means")
    ap.add_argument("--run-dir", type=Path, default=Path("runs/bench-step-time"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--from-demo", type=Path, default=None,
                    help="reuse a demo run directory's warmup/ and task/ instead of warming up again")
    args = ap.parse_args()
    torch.set_num_threads(1)  # as the orchestrator (models.threads) and the local services

    from demo.run import prepare

    if args.from_demo is not None:
        policy, train = args.from_demo / "warmup", args.from_demo / "task" / "train.jsonl"
    else:
        prep = prepare(args.run_dir, seed=0, log=print)
        policy, train = prep.policy_dir, prep.train_path
    results, server = service_steps(policy, train, args.run_dir / "rl", args.steps, args.warmup)
    phases = sorted({p for r in results for p in r.phases})
    svc = {p: statistics.mean(r.phases.get(p, 0.0) for r in results) for p in phases}
    svc["step"] = statistics.mean(r.metrics["step_seconds"] for r in results)
    local = local_steps(policy, train, args.steps)[args.warmup:]
    base = {k: statistics.mean(r[k] for r in local) for k in local[0]}

    # Inside the services: each RPC's server-side seconds (decode, model, encode). The rest of a phase
    # is RPC transport, client-side (de)serialization and waiting.
    inside = {"generate": server.get("generator.Generate", 0.0) + server.get("generator.GetInfo", 0.0),
              "sync": server.get("generator.UpdateWeights", 0.0),
              "score": server.get("reward.Score", 0.0), "reference": server.get("reference.LogProbs", 0.0)}
    outside = {p: max(0.0, svc.get(p, 0.0) - inside[p]) for p in inside}
    # Score, LogProbs and the trainer's own log-probs run side by side: only what the slowest of them
    # adds beyond its own compute lengthens the step.
    parallel = ("score", "reference", "policy_logprobs")
    inside_parallel = max(inside["score"], inside["reference"], svc.get("policy_logprobs", 0.0))
    parallel_extra = max(0.0, max(svc.get(p, 0.0) for p in parallel) - inside_parallel)
    critical = outside["generate"] + outside["sync"] + parallel_extra
    report = {
        "workload": "8 prompts x 8 samples, <= 6 new tokens, demo model (~1.06M params), GRPO + reference",
        "services_seconds": svc, "single_process_seconds": base, "in_service_seconds": inside,
        "outside_service_seconds": outside, "rpc_on_critical_path_seconds": critical,
        "rpc_on_critical_path_share": critical / svc["step"],
        "services_vs_single_process": svc["step"] / base["step"] - 1.0,
        "steps_measured": len(results),
    }
    print(f"{'phase':<16}{'services s':>11}{'in service':>11}{'1-process s':>12}")
    for k in [*phases, "step"]:
        cell = f"{inside[k]:>11.4f}" if k in inside else f"{'':>11}"
        print(f"{k:<16}{svc.get(k, 0.0):>11.4f}{cell}{base.get(k, 0.0):>12.4f}")
    print(f"RPC, serialization and waiting on the step's critical path: {critical:.4f} s/step = "
          f"{critical / svc['step']:.1%} of the step (generate {outside['generate']:.4f}, sync {outside['sync']:.4f}, "
          f"parallel section {parallel_extra:.4f})")
    print(f"step through the services vs one process: {svc['step']:.4f} vs {base['step']:.4f} s "
          f"({svc['step'] / base['step'] - 1.0:+.1%})")
    out = args.out or args.run_dir / "step_time.json"
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
