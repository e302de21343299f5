"""Sampling with plain transformers (CPU or GPU): our own decode loop over a KV cache.

Why not `model.generate()`: it draws every row from one RNG, so a sample would depend on what else
is in the batch, and it returns processed (temperature / top-p) scores. Here each row has its own
`torch.Generator` (seeded per `backend.sample_seed`) from which max_new_tokens uniforms are drawn
up front; token t of the row inverts its sampling CDF at uniform t. The logprobs are log-softmax
of the raw logits in fp32.

Batch layout: B = sum over requests of P * n rows (each prompt repeated n times), LEFT padded to
the longest prompt so the next token of every row is at the last column; attention_mask marks real
tokens and position_ids count real tokens only, so a padded row computes what it would alone.
Rows that finish (EOS / stop token / stop string / their own max_new_tokens) leave the batch: their cache rows
are dropped (`DynamicCache.batch_select_indices`), so finished rows cost nothing.
"""

from __future__ import annotations

import inspect
import secrets
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from services.common import hf
from services.common.role import ModelConfig
from services.common.weights import model_weight_specs
from services.generator.backend import (
    BackendInfo,
    GeneratedSample,
    GenerationRequest,
    GeneratorBackend,
    completes_stop,
    sample_seed,
    stop_token_ids,
)


@dataclass
class _Rows:
    """Per-row sampling state of one batch, B rows (tensors on the model's device)."""

    prompts: list[list[int]]            # [B] prompt ids
    temperature: torch.Tensor           # [B] float32, 0 = greedy
    top_k: torch.Tensor                 # [B] int64, 0 = off
    top_p: torch.Tensor                 # [B] float32, 1 = off
    max_new: list[int]                  # [B]
    stops: list[frozenset[int]]         # [B] EOS + the request's stop ids
    stop_text: list[tuple[str, ...]]    # [B] the request's stop strings
    uniforms: torch.Tensor              # [B, T_max] float32: row b's draws, one per step, from its own
                                        # generator seeded per sample_seed (all drawn up front)
    owner: list[tuple[int, int]]        # [B] (request index, prompt index)


def _expand(requests: list[GenerationRequest], eos: tuple[int, ...], device: torch.device) -> _Rows:
    """One row per sample, request-major then prompt-major then sample (k = i * n + j)."""
    prompts, temps, ks, ps, max_new, stops, texts, draws, owner = [], [], [], [], [], [], [], [], []
    width = max(req.params.max_new_tokens for req in requests)
    for r, req in enumerate(requests):
        p = req.params
        # Unseeded requests still get per-row generators, seeded from the OS.
        seed = p.seed if p.seed is not None else secrets.randbits(63)
        stop = frozenset(eos) | frozenset(p.stop_token_ids)
        for i, prompt in enumerate(req.prompts):
            for j in range(p.n):
                prompts.append(prompt)
                temps.append(p.temperature)
                ks.append(p.top_k)
                ps.append(p.top_p)
                max_new.append(p.max_new_tokens)
                stops.append(stop)
                texts.append(p.stop)
                gen = torch.Generator().manual_seed(sample_seed(seed, req.first_prompt + i, j))
                # a row's t-th token uses its t-th draw: the same whatever else is batched
                draws.append(torch.rand(width, generator=gen) if p.max_new_tokens == width else
                             torch.cat([torch.rand(p.max_new_tokens, generator=gen),
                                        torch.zeros(width - p.max_new_tokens)]))
                owner.append((r, i))
    return _Rows(prompts, torch.tensor(temps, dtype=torch.float32, device=device),
                 torch.tensor(ks, dtype=torch.int64, device=device),
                 torch.tensor(ps, dtype=torch.float32, device=device), max_new, stops, texts,
                 torch.stack(draws).to(device), owner)


def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  u: torch.Tensor) -> torch.Tensor:
    """Next token per row from raw fp32 logits [B, V] and one uniform u [B] in [0, 1) per row; int64 [B].

    Greedy rows (temperature 0) take the argmax. Sampling rows invert the CDF of
    softmax(logits / temperature) at u; rows with top-k or top-p first sort by probability (stable,
    so ties keep id order) and keep the k most likely tokens and the smallest prefix whose mass
    reaches top_p. Rows without either skip the sort (costly over a large vocabulary). The choice
    depends only on the row's logits, parameters and u.
    """
    out = logits.argmax(dim=-1)
    sampling = temperature > 0
    if not bool(sampling.any()):
        return out
    # Subtract the row max before dividing: a tiny temperature then sends the others to -inf (greedy in
    # the limit) instead of overflowing every logit to +-inf and the softmax to NaN.
    logits = logits - logits.max(dim=-1, keepdim=True).values
    filtered = sampling & ((top_k > 0) | (top_p < 1))
    plain = torch.nonzero(sampling & ~filtered).flatten()
    if plain.numel():
        probs = torch.softmax(logits[plain] / temperature[plain, None], dim=-1)
        out[plain] = _invert_cdf(probs, u[plain])
    rows = torch.nonzero(filtered).flatten()
    if rows.numel():
        scaled = logits[rows] / temperature[rows, None]
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True, stable=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        rank = torch.arange(probs.shape[-1], device=probs.device)
        k = top_k[rows, None]
        keep = (k == 0) | (rank[None, :] < k)
        keep &= (probs.cumsum(dim=-1) - probs) < top_p[rows, None]  # mass before a token; the top one stays
        choice = _invert_cdf(probs * keep, u[rows])
        out[rows] = order.gather(-1, choice[:, None]).squeeze(-1)
    return out


def _invert_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index i with cdf[i-1] <= u * total < cdf[i] per row of (unnormalised) probs [R, V]: never a
    zero-probability entry (right=True), clamped against rounding at the top."""
    cdf = probs.cumsum(dim=-1)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(-1)
    return idx.clamp(max=probs.shape[-1] - 1)


class TransformersBackend(GeneratorBackend):
    """AutoModelForCausalLM + our decode loop; see the module docstring."""

    name = "transformers"

    def __init__(self, model: ModelConfig, *, attn_implementation: str | None = None) -> None:
        self.model_config = model
        self.attn_implementation = attn_implementation
        self.version = 0
        self._info: BackendInfo | None = None

    def load(self) -> None:
        if not self.model_config.path:
            raise ValueError("model.path is required for the generator (a local checkpoint directory)")
        device = hf.resolve_device(self.model_config.device, field="model.device")
        dtype = hf.resolve_dtype(self.model_config.dtype, device=device, field="model.dtype")
        self.tokenizer = hf.load_tokenizer(self.model_config.path)
        self.model = hf.load_causal_lm(self.model_config.path, dtype=dtype, device=device,
                                       attn_implementation=self.attn_implementation)
        self.device = device
        # transformers 5 renamed the forward argument `past_key_values` to `cache`
        params = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._targets = dict(self.model.state_dict())
        self._specs, self._aliases = model_weight_specs(self._targets)
        eos = stop_token_ids(self.tokenizer, getattr(self.model.generation_config, "eos_token_id", None))
        cfg = self.model.config
        self._info = BackendInfo(
            backend=self.name, model_path=str(self.model_config.path),
            tokenizer_fingerprint=hf.tokenizer_fingerprint(self.tokenizer),
            vocab_size=int(self.model.get_output_embeddings().weight.shape[0]),
            dtype=str(dtype).removeprefix("torch."), device=str(device), eos_token_ids=eos,
            max_positions=int(getattr(cfg, "max_position_embeddings", None) or 1 << 30),
        )

    def expected_weights(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {n: (s.shape, s.dtype) for n, s in self._specs.items()}

    def weight_aliases(self) -> dict[str, str]:
        return dict(self._aliases)

    @torch.no_grad()
    def apply_weights(self, state: dict[str, torch.Tensor], version: int) -> None:
        for name, tensor in state.items():
            self._targets[name].copy_(tensor)  # state_dict tensors share storage with the parameters
        self.version = version

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                 cache: DynamicCache) -> torch.Tensor:
        """Raw fp32 logits of the last position, [B, V]."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, logits_to_keep=1, **{self._cache_kw: cache})
        return out.logits[:, -1, :].float()

    @torch.no_grad()
    def generate_many(self, requests: list[GenerationRequest]) -> list[list[GeneratedSample]]:
        rows = _expand(requests, self.info.eos_token_ids, self.device)
        B = len(rows.prompts)
        width = max(len(p) for p in rows.prompts)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.full((B, width), pad, dtype=torch.int64)
        mask = torch.zeros((B, width), dtype=torch.int64)
        for b, prompt in enumerate(rows.prompts):
            input_ids[b, width - len(prompt):] = torch.tensor(prompt)
            mask[b, width - len(prompt):] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(input_ids, mask, positions, cache)
        next_pos = positions[:, -1] + 1                               # [B'] position of the next token
        alive = torch.arange(B, device=self.device)                   # [B'] original row of each batch row
        tokens: list[list[int]] = [[] for _ in range(B)]
        logprobs: list[list[float]] = [[] for _ in range(B)]
        finish: list[str] = ["length"] * B
        while True:
            a = alive
            step = len(tokens[int(a[0])])  # every live row has made the same number of tokens
            picked = sample_tokens(logits, rows.temperature[a], rows.top_k[a], rows.top_p[a], rows.uniforms[a, step])
            lp = torch.log_softmax(logits, dim=-1).gather(-1, picked[:, None]).squeeze(-1)
            keep = []
            for pos, (b, tok, lpv) in enumerate(zip(a.tolist(), picked.tolist(), lp.tolist(), strict=True)):
                tokens[b].append(tok)
                logprobs[b].append(lpv)
                if tok in rows.stops[b] or (rows.stop_text[b] and completes_stop(tokens[b], rows.stop_text[b],
                                                                                 self.decode)):
                    finish[b] = "stop"
                elif len(tokens[b]) < rows.max_new[b]:
                    keep.append(pos)
            if not keep:
                break
            if len(keep) < len(a):  # finished rows leave the batch, cache included
                idx = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(idx)
                alive, mask, next_pos, picked = alive[idx], mask[idx], next_pos[idx], picked[idx]
            mask = torch.cat([mask, mask.new_ones((len(alive), 1))], dim=1)
            logits = self._forward(picked[:, None], mask, next_pos[:, None], cache)
            next_pos = next_pos + 1
        return self._collect(requests, rows, tokens, logprobs, finish)

    @staticmethod
    def _collect(requests: list[GenerationRequest], rows: _Rows, tokens: list[list[int]],
                 logprobs: list[list[float]], finish: list[str]) -> list[list[GeneratedSample]]:
        out: list[list[GeneratedSample]] = [[] for _ in requests]
        for b, (r, i) in enumerate(rows.owner):
            out[r].append(GeneratedSample(prompt_index=i, token_ids=tokens[b], logprobs=logprobs[b],
                                          finish_reason=finish[b]))  # type: ignore[arg-type]
        return out
