"""Reward model backend: a sequence-classification checkpoint whose single logit is the reward.

Loads `AutoModelForSequenceClassification` (num_labels = 1) and the checkpoint's *own* tokenizer
from a local directory: a reward model may use a different vocabulary from the policy, which is
why Score carries text as well as ids. Each sample is scored as the text prompt + completion,
tokenized with the tokenizer's special tokens, left-truncated to `model_max_tokens` (the end of a
completion is where its answer is), padded and run in micro-batches under no_grad.

Pooling is transformers' own: the logit at the last token that is not the pad token, which
works for left or right padding as long as the pad id differs from real tokens (we pad on the
left, so the last position is always real; a tokenizer whose pad equals eos can still mis-pool
a text ending in eos, as in transformers itself).
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

from services.common.hf import load_tokenizer, resolve_device, resolve_dtype, tokenizer_fingerprint
from services.common.role import ModelConfig
from services.reward.backend import RewardBackend, RewardBatch, RewardMetrics, RewardResult
from services.reward.options import Options


class ModelBackend(RewardBackend):
    """Scores prompt_text + completion_text with a sequence-classification reward model."""

    kind = "model"
    requires = frozenset({"prompt_text", "completion_text"})

    def __init__(self, model: ModelConfig, options: Options, metrics: RewardMetrics) -> None:
        super().__init__(metrics, max_batch=options.max_batch)
        if not model.path:
            raise ValueError("kind=model needs a reward model checkpoint: pass --model PATH (model.path)")
        path = Path(model.path).expanduser()
        self.identity = f"model:{path.name}"
        self.path = str(path)
        self.device = resolve_device(model.device)
        self.dtype = resolve_dtype(model.dtype, device=self.device)
        self.batch_size = options.model_batch_size
        self.max_tokens = options.model_max_tokens
        self.tokenizer = load_tokenizer(path)
        self.tokenizer.padding_side = "left"
        self.tokenizer.truncation_side = "left"
        self.model = AutoModelForSequenceClassification.from_pretrained(
            str(path), dtype=self.dtype, local_files_only=True
        )
        if self.model.config.num_labels != 1:
            raise ValueError(f"reward model {self.path!r} has num_labels={self.model.config.num_labels}; "
                             "a reward model needs exactly one output (num_labels=1)")
        if self.model.config.pad_token_id is None:
            # Batched pooling finds the last non-pad token; the tokenizer's pad id is what we pad with.
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.to(self.device).eval()
        self._lock = threading.Lock()  # one forward at a time: concurrent calls would only fight for cores

    @torch.no_grad()
    def compute(self, batch: RewardBatch) -> RewardResult:
        texts = [p + c for p, c in zip(batch.prompt_text, batch.completion_text, strict=True)]
        out: list[torch.Tensor] = []
        with self._lock:
            for i in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(texts[i:i + self.batch_size], return_tensors="pt", padding=True,
                                     truncation=True, max_length=self.max_tokens)
                enc = {k: v.to(self.device) for k, v in enc.items()}
                logits = self.model(**enc).logits  # [b, 1]
                out.append(logits[:, 0].float().cpu())
        rewards = torch.cat(out)  # [B]
        return RewardResult(rewards=rewards, failed=[False] * len(texts))

    def info(self) -> dict[str, str]:
        return {
            "model_path": self.path, "dtype": str(self.dtype).removeprefix("torch."), "device": str(self.device),
            "tokenizer_fingerprint": tokenizer_fingerprint(self.tokenizer),
        }
