"""The frozen reference policy: log π_ref(t_k | t_<k) of the response tokens of full sequences.

A plain class (no gRPC): the servicer decodes a request and calls `logprobs`; tests call it directly.
The model is loaded once by `load()` and never changes. Log-probabilities are those of the raw model
at temperature 1 (no temperature, top-p or top-k), taken in fp32 whatever the compute dtype: the
orchestrator's KL term compares them with the policy's own fp32 log-probabilities.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from prometheus_client import CollectorRegistry, Counter
from torch import Tensor

from services.common import hf
from services.common.batching import CallGate, SequencesLike, micro_batches, unbatch
from services.common.errors import NotReady
from services.common.model_role import ModelBackend
from services.common.role import ModelConfig

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from services.reference import Options


@functools.cache
def _takes_logits_to_keep(model_type: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_type.forward).parameters


class ReferenceBackend(ModelBackend):
    """Scores response tokens under a frozen causal LM, micro-batched under a token budget."""

    options: Options

    def __init__(self, model_cfg: ModelConfig, options: Options, registry: CollectorRegistry) -> None:
        super().__init__(model_cfg, options)
        self._model: PreTrainedModel | None = None
        self.gate = CallGate(options.max_concurrent, "reference")
        self.sequences_total = Counter(
            "quartet_reference_sequences", "Sequences scored by LogProbs.", registry=registry)
        self.tokens_total = Counter(
            "quartet_reference_tokens", "Real (unpadded) tokens run through the reference model.", registry=registry)
        self.response_tokens_total = Counter(
            "quartet_reference_response_tokens", "Response tokens whose log-probability was returned.",
            registry=registry)
        self.padded_tokens_total = Counter(
            "quartet_reference_padded_tokens", "Tokens in forward passes, padding included (rows x width).",
            registry=registry)
        self.micro_batches_total = Counter(
            "quartet_reference_micro_batches", "Forward passes (micro-batches) run by LogProbs.", registry=registry)

    def load(self) -> None:
        """Load tokenizer and model (slow). Until it returns, logprobs raises NotReady."""
        path, device, dtype = self._placement()
        tokenizer = hf.load_tokenizer(path)
        model = hf.load_causal_lm(path, dtype=dtype, device=device, attn_implementation=self.options.attn_implementation)
        model.requires_grad_(False)
        self._loaded(path, dtype, device, model, tokenizer)
        self._model = model

    def logprobs(self, sequences: SequencesLike, response_start: Sequence[int] | Tensor) -> list[Tensor]:
        """log π_ref of every response token, temperature 1.

        Args:
            sequences: B rows of token ids, prompt ++ response (list of lists, 1-d tensors or RaggedTensor).
            response_start: [B] index where each row's response begins, 1 <= response_start_i <= len_i.

        Returns:
            B float32 CPU tensors; row i has len_i - response_start_i entries (0 when the row has no
            response), entry j = log π_ref(t_k | t_<k) for k = response_start_i + j.

        Raises:
            InvalidArgument / OutOfRange naming the field (see batching.check_sequences), Overloaded when
            max_concurrent calls are already running, NotReady before load().
        """
        model, info = self._model, self.info
        if model is None or info is None:
            raise NotReady("reference model is still loading")
        with self.gate.enter():
            rows, starts = self._check(sequences, response_start, info)
            pieces = []
            with torch.inference_mode():
                for mb in micro_batches(rows, starts, self.options.max_batch_tokens, pad_id=self._pad_id):
                    pieces.append((mb, self._score(model, mb, info.device)))
                    self.micro_batches_total.inc()
                    self.padded_tokens_total.inc(mb.num_tokens)
            out = unbatch(pieces, len(rows))
        self.sequences_total.inc(len(rows))
        self.tokens_total.inc(sum(r.numel() for r in rows))
        self.response_tokens_total.inc(sum(r.numel() for r in out))
        return out

    @staticmethod
    def _score(model: PreTrainedModel, mb, device: torch.device) -> list[Tensor]:
        """Response-token log-probabilities of one micro-batch, rows in micro-batch order."""
        # Only the positions from the earliest response on go through the LM head (most of the cost
        # with a large vocabulary), where the model takes logits_to_keep.
        keep = mb.input_ids.shape[1] - int(mb.response_start.min()) + 1
        extra = {"logits_to_keep": keep} if _takes_logits_to_keep(type(model)) else {}
        logits = model(
            input_ids=mb.input_ids.to(device),
            attention_mask=mb.attention_mask.to(device),
            position_ids=mb.position_ids.to(device),
            use_cache=False,
            **extra,
        ).logits  # [b, kept, V]: the last `kept` of the W positions
        # Logits at position p predict token p + 1 (batching's alignment): the target of position p.
        targets = mb.response_view(torch.roll(mb.input_ids, -1, dims=1)).to(device)  # [b, T]
        offset = mb.input_ids.shape[1] - logits.shape[1]
        index = (mb.response_positions.to(device) - offset).clamp(min=0)  # below 0 only on masked padding
        picked = logits.gather(1, index[:, :, None].expand(-1, -1, logits.shape[-1])).float()  # [b, T, V]
        logprobs = picked.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(picked, dim=-1)
        return [r.clone() for r in mb.split_responses(logprobs.cpu())]
