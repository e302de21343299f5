"""PolicyTrainer on 2 gloo ranks (DDP) against 1 rank on the same experience: the same gradients,
statistics and weights within fp32 tolerance, in every way the batch can be cut (one step whose old
log-probs come from the loss forward, minibatch epochs with a minibatch smaller than the ranks,
micro-batches under a token budget), and the config checks of several ranks."""

from __future__ import annotations

import copy
import gc
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from orchestrator.run.algo_config import AlgorithmConfig
from orchestrator.run.config import ConfigError
from orchestrator.step.distributed import attach, check
from orchestrator.step.ranks import Ranks
from orchestrator.step.trainer import PolicyTrainer
from tests.e2e.test_run import e2e_config
from tests.unit.conftest import make_tiny_qwen
from tests.unit.test_trainer import experience

pytestmark = pytest.mark.usefixtures("one_thread")

# name -> (algorithm config, trainer micro_batch_tokens)
CASES: dict[str, tuple[dict, int]] = {
    # One optimizer step, old log-probs from the loss forward: each rank writes its rows' old log-probs.
    "grpo_one_step": ({"name": "grpo", "lr": 1e-3}, 16384),
    # 4 rows in minibatches of 3 and 1: rank 1 has no row in the second (its backward is weighted 0);
    # micro-batches of one row each, so the ranks accumulate different numbers of backward passes.
    "ppo_minibatches": ({"name": "ppo", "lr": 1e-3, "epochs": 2, "minibatch_size": 3}, 1),
    "grpo_token_mean_entropy": ({"name": "grpo", "lr": 1e-3, "aggregation": "token_mean", "entropy_coef": 0.01,
                                 "reuse_loss_forward": False}, 16384),
    # TRPO sums the ranks' losses, KLs, gradients and Fisher-vector products itself (no DDP).
    "trpo": ({"name": "trpo", "kl_coef": 0.0, "trpo_max_kl": 0.002}, 16384),
    # The Fisher KL on rows 0 and 2 of 4, both rank 0's: rank 1's products are 0 (a row weighted 0).
    "trpo_fisher_half": ({"name": "trpo", "kl_coef": 0.0, "trpo_fisher_fraction": 0.5,
                          "aggregation": "seq_mean_token_mean"}, 16384),
}


def run_case(name: str, ranks: Ranks) -> dict:
    """Two updates of the tiny model on one experience: the stats, the last step's gradients, the weights."""
    settings, budget = CASES[name]
    cfg = AlgorithmConfig(**settings)
    model = make_tiny_qwen()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    exp = experience(model, cfg)
    trainer = PolicyTrainer(model, cfg, seed=5, micro_batch_tokens=budget)
    if ranks.several:
        attach(trainer, ranks)
    stats = [trainer.update(exp) for _ in range(2)]
    return {
        "stats": [s.as_dict() for s in stats],
        "old_logprobs": [s.old_logprobs for s in stats],
        "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},  # none: TRPO
        "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
        "moved": max_diff(start, {n: p.detach() for n, p in model.named_parameters()}),
    }


def _rank_main(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        results = {name: run_case(name, Ranks(rank=rank, size=2)) for name in CASES}
        if rank == 0:
            torch.save(results, out)
    finally:
        gc.collect()  # the cases' DDP wrappers go before their process group (see distributed.detach)
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    """Every case on 2 gloo ranks (spawned processes on 127.0.0.1), as rank 0 saw it; a rank's error
    is raised here with its traceback."""
    out = tmp_path_factory.mktemp("ranks") / "rank0.pt"
    mp.spawn(_rank_main, args=(free_port(), str(out)), nprocs=2, join=True)
    return torch.load(out, weights_only=False)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.slow  # two spawned processes importing torch and transformers: ~15 s on 2 cores
@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_update_like_one(two_ranks, name):
    one, two = run_case(name, Ranks()), two_ranks[name]
    for s1, s2 in zip(one["stats"], two["stats"], strict=True):
        assert s1.keys() == s2.keys()
        for key in s1:
            assert s2[key] == pytest.approx(s1[key], rel=1e-5, abs=1e-6), key
    for o1, o2 in zip(one["old_logprobs"], two["old_logprobs"], strict=True):
        assert (o1 is None) == (o2 is None)
        if o1 is not None:  # rank 1's rows came back from it
            torch.testing.assert_close(o2, o1, atol=1e-6, rtol=1e-5)
    # Gradients of the last step, after DDP's all-reduce: the one-rank gradient, not twice it nor half.
    grad_diff = max_diff(one["grads"], two["grads"]) if one["grads"] else 0.0
    assert grad_diff < 1e-6 and (one["grads"] or name.startswith("trpo"))
    weight_diff = max_diff(one["weights"], two["weights"])
    print(f"{name}: max |grad diff| {grad_diff:.2e}, max |weight diff| {weight_diff:.2e} "
          f"(the updates moved a weight by up to {one['moved']:.1e})")
    assert weight_diff < 1e-5 and one["moved"] > 100 * weight_diff
    assert all(s["optimizer_steps"] >= 1 for s in one["stats"])  # every update stepped (TRPO: accepted)


def test_several_ranks_refuse_a_trpo_batch_smaller_than_the_ranks_and_a_fixed_gpu(tmp_path):
    cfg = e2e_config("trpo", tmp_path, {"train": tmp_path / "t.jsonl", "root": tmp_path}, tmp_path / "run",
                     "prompts_per_step=1", "samples_per_prompt=2")
    check(cfg, 1)  # one rank: anything goes
    check(cfg, 2)
    with pytest.raises(ConfigError, match=r"prompts_per_step x samples_per_prompt = 2 .* 3 torchrun ranks"):
        check(cfg, 3)
    gpu = copy.deepcopy(cfg).model_copy(update={"algorithm": AlgorithmConfig(name="grpo"),
                                                "models": cfg.models.model_copy(update={"device": "cuda:1"})})
    with pytest.raises(ConfigError, match=r"models\.device='cuda:1'"):
        check(gpu, 2)


def test_one_rank_is_untouched_by_torch_distributed():
    ranks = Ranks()
    assert not ranks.several and ranks.share(5).tolist() == [0, 1, 2, 3, 4]
    values = torch.tensor([1.0, 2.0])
    assert ranks.sum(values) is values and ranks.sum_floats({"a": 1.0}) == {"a": 1.0}
    assert Ranks(rank=1, size=3).share(7).tolist() == [1, 4]


def test_retries_under_torchrun_point_to_torchrun_restarts(monkeypatch, tmp_path):
    import io

    import typer
    from rich.console import Console

    from cli.train import _start_ranks

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    cfg = e2e_config("grpo", tmp_path, {"train": tmp_path / "t.jsonl", "root": tmp_path}, tmp_path / "run")
    console = Console(file=io.StringIO(), width=200)
    with pytest.raises(typer.Exit) as exit_:
        _start_ranks(cfg, console, retries=1)  # refused before any process group is joined
    assert exit_.value.exit_code == 2
    assert "torchrun --max-restarts N" in console.file.getvalue() and "--resume" in console.file.getvalue()


def test_await_exit_returns_when_the_processes_are_gone_or_only_unreaped(tmp_path) -> None:
    # A failing rank 0 waits for the ranks on its host to exit before it exits (torchrun would
    # otherwise SIGTERM a rank still tearing down after `stop` and report it as failed too).
    import subprocess
    import sys
    import threading
    import time
    from pathlib import Path

    from orchestrator.step.distributed import await_exit

    go = tmp_path / "go"
    waiter = subprocess.Popen([sys.executable, "-c", f"import os, time\nwhile not os.path.exists({str(go)!r}): "
                                                     "time.sleep(0.01)"])
    unreaped = subprocess.Popen([sys.executable, "-c", "pass"])  # exits at once; not waited for until the end
    stuck = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        deadline = time.monotonic() + 30
        while Path(f"/proc/{unreaped.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline, "the short-lived child never exited"
            time.sleep(0.02)
        threading.Timer(0.3, go.touch).start()  # the waiter can exit only from then on
        t0 = time.monotonic()
        assert await_exit([waiter.pid, unreaped.pid], timeout_s=20) == []
        assert 0.3 <= time.monotonic() - t0 < 15
        t0 = time.monotonic()
        assert await_exit([stuck.pid], timeout_s=0.4) == [stuck.pid]  # bounded: a hung rank does not hold it
        assert 0.4 <= time.monotonic() - t0 < 5
    finally:
        go.touch()
        stuck.kill()
        for p in (waiter, unreaped, stuck):
            p.wait()
