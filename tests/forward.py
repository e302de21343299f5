"""Plain transformers, the yardstick the generators are checked against: a checkpoint loaded in fp32
(eval mode) and log-probabilities from one unpadded forward pass, which is what the trainer computes.

Imports only torch and transformers: the vLLM tests (tests/vllm, run in the environment that
scripts/vllm_ci.sh builds) use it too.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel


def hf_model(path: Path) -> PreTrainedModel:
    """The checkpoint at `path` in fp32, eval mode, from local files only."""
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True).eval()


def direct_logprobs(model: PreTrainedModel, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """log pi(completion_t | prefix) from one unpadded forward pass of plain transformers, fp32: [T]."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    return logp[len(prompt) - 1:-1].gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)
