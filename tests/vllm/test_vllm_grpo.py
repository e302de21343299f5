"""A 3-step GRPO run through the embedded stack with the vLLM generator, as a user runs it:
`quartet train run.yaml` as a subprocess with services.local and options.backend=vllm for the
generator. The run completes, every trained parameter changes, the generator's logprobs agree with
the trainer's (fp32), and the service processes (vLLM's engine included) are gone afterwards."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("vllm")
psutil = pytest.importorskip("psutil")  # a vLLM dependency

from safetensors.torch import load_file  # noqa: E402
from vllm.platforms import current_platform  # noqa: E402

from tests.e2e.test_run import e2e_config, task  # noqa: E402, F401  (task is a fixture)
from tests.vllm.conftest import logprob_atol  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_three_grpo_steps_with_the_vllm_generator(vllm_checkpoint: Path, task, tmp_path: Path) -> None:  # noqa: F811
    run_dir = tmp_path / "run"
    cfg = e2e_config("grpo", vllm_checkpoint, task, run_dir, "services.local_options.generator.backend=vllm",
                     "services.local_options.generator.torch_threads=1", f"models.device={current_platform.device_type}",
                     # on a GPU the reference and the trainer share the card (ignored on CPU: kv_cache_gib applies)
                     "services.local_options.generator.gpu_memory_utilization=0.3", "metrics_port=null")
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    proc = subprocess.run([sys.executable, "-m", "cli.main", "train", str(cfg_path)], capture_output=True,
                          text=True, timeout=600)
    generator_log = run_dir / "services" / "generator.log"
    tail = generator_log.read_text()[-3000:] if generator_log.exists() else "(no generator log)"
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\ngenerator log:\n{tail}"

    steps = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3]
    for s in steps:
        assert all(v == v and abs(v) != float("inf") for v in s.values() if isinstance(v, float)), s
        # generator (vLLM) and trainer (transformers) compute the same fp32 logprobs of the sampled tokens
        atol = logprob_atol(current_platform.device_type)
        assert s["logprob_gap_mean"] < atol and s["logprob_gap_max"] < 10 * atol, s
        assert s["weight_version"] == s["step"]  # each step's weight sync acknowledged by the vLLM generator
    # vLLM names its processes in the generator's log: all of them ended with the run
    engine = {int(pid) for pid in re.findall(r"\((?:EngineCore|Worker|VllmWorker)\S* pid=(\d+)\)",
                                             generator_log.read_text())}
    assert engine, "no vLLM engine process in the generator's log: did it run the vllm backend?"
    procs = []
    for pid in engine:
        with contextlib.suppress(psutil.NoSuchProcess):  # already gone
            procs.append(psutil.Process(pid))
    # vLLM's worker notices its engine core's exit on its own, up to a few seconds after the service exited
    _, alive = psutil.wait_procs(procs, timeout=30)
    assert alive == [], f"vLLM processes still running 30 s after the run: {alive}"

    before = load_file(vllm_checkpoint / "model.safetensors")
    final = sorted((run_dir / "checkpoints").glob("step-*"))[-1] / "policy" / "model.safetensors"
    after = load_file(final)
    unchanged = [k for k, v in before.items() if torch.equal(v, after[k])]
    assert unchanged == [], f"parameters not changed by GRPO: {unchanged}"
