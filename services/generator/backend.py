"""The generator's backend interface and its plain types (no protobuf here).

A backend samples completions for batches of prompts and takes new weights. The batcher
(batcher.py) is the only caller: it runs every `generate_many` and every `apply_weights` on one
worker thread, so a backend never sees two of them at once and never needs its own lock.

Seeding, the contract every backend keeps: sample j of prompt i of a request with seed s is drawn
from a generator seeded by `sample_seed(s, first_prompt + i, j)`, so its tokens do not depend on what
else is in the batch, on the batch order, on how many samples the request asked for, or on how a
caller split its prompts across generator replicas (`first_prompt` is the request's offset).

Logprobs, the other contract: log pi(token | prefix) under the RAW policy (log-softmax of the
unmodified logits in fp32, temperature 1, no top-k / top-p), the distribution the trainer
computes; temperature, top-k and top-p only shape the distribution tokens are drawn from.
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from services.common.chat import end_of_turn_token_ids
from services.common.errors import InvalidArgument, OutOfRange

FinishReason = Literal["stop", "length"]
LOGPROB_MODE = "raw"


@dataclass(frozen=True)
class SamplingParams:
    """How to sample every prompt of one request."""

    n: int = 1                                  # samples per prompt G
    temperature: float = 1.0                    # 0 = greedy (argmax of the raw logits)
    top_p: float = 1.0                          # nucleus mass in (0, 1]; 1 = off
    top_k: int = 0                              # keep the k most likely tokens; 0 = off
    max_new_tokens: int = 16                    # most tokens generated per sample
    stop_token_ids: tuple[int, ...] = ()        # stop after emitting one of these (EOS always stops)
    stop: tuple[str, ...] = ()                  # stop after the token that completes one of these strings
    seed: int | None = None                     # None = nondeterministic


@dataclass(frozen=True)
class GenerationRequest:
    """One caller's prompts and parameters; the unit the batcher queues."""

    prompts: list[list[int]]                    # [P] token id rows, each non-empty
    params: SamplingParams
    first_prompt: int = 0                       # prompt i is seeded as prompt first_prompt + i of the caller's
                                                # batch (GenerateRequest.prompt_index_offset: split across replicas)

    @property
    def num_sequences(self) -> int:
        return len(self.prompts) * self.params.n

    @property
    def budget_tokens(self) -> int:
        """Tokens this request may occupy in a batch: (prompt + max_new_tokens) per sample."""
        return sum(len(p) + self.params.max_new_tokens for p in self.prompts) * self.params.n


@dataclass(frozen=True)
class GeneratedSample:
    """One sampled completion. Samples of a request are prompt-major: k = i * n + j."""

    prompt_index: int                           # i
    token_ids: list[int]                        # [T] sampled ids (the stop token included)
    logprobs: list[float]                       # [T] raw-policy log pi(token_t | prefix), fp32
    finish_reason: FinishReason


@dataclass(frozen=True)
class BackendInfo:
    """What a loaded backend serves (reported in GetInfo)."""

    backend: str                                # "transformers" | "vllm"
    model_path: str
    tokenizer_fingerprint: str
    vocab_size: int                             # logit width; valid ids are [0, vocab_size)
    dtype: str                                  # e.g. "float32"
    device: str                                 # e.g. "cpu", "cuda:0"
    eos_token_ids: tuple[int, ...]
    max_positions: int                          # longest prompt + completion the model takes


@dataclass(frozen=True)
class Limits:
    """Limits enforced on every request (Options fills them in)."""

    max_prompts: int
    max_samples_per_prompt: int
    max_new_tokens: int
    max_batch_sequences: int
    max_tokens_per_call: int


# Largest prompt index of a request (its offset included): GenerateResponse.prompt_index is an int32.
MAX_PROMPT_INDEX = 2**31 - 1


#: Bounds on SamplingParams.stop (a stop string is matched against decoded text after every token).
MAX_STOP_STRINGS, MAX_STOP_CHARS = 16, 200


def completes_stop(token_ids: Sequence[int], stop: Sequence[str], decode: Callable[[list[int]], str]) -> bool:
    """Whether the last of `token_ids` [T] completes a stop string: it occurs in the text of the tail and not in
    that text without the last token.

    The tail is the last len(s) + 1 tokens: every token decodes to at least one character (a piece of a
    multi-byte character decodes to U+FFFD), so L characters span at most L tokens; the one more token
    keeps a tokenizer's boundary handling (a word-start space) from hiding the first character.
    """
    for s in stop:
        tail = list(token_ids[-(len(s) + 1):])
        if tail and s in decode(tail) and s not in decode(tail[:-1]):
            return True
    return False


def stop_string_end(token_ids: Sequence[int], stop: Sequence[str], decode: Callable[[list[int]], str]) -> int | None:
    """Tokens up to and including the first one that completes a stop string, or None when none does."""
    for k in range(1, len(token_ids) + 1):
        if completes_stop(token_ids[:k], stop, decode):
            return k
    return None


def sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """63-bit seed of sample j of prompt i (blake2b of the triple: independent streams, stable)."""
    digest = hashlib.blake2b(f"{seed}:{prompt_index}:{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def stop_token_ids(tokenizer: Any, generation_eos: int | list[int] | None) -> tuple[int, ...]:
    """The ids that end a sample, sorted: the tokenizer's EOS, the generation config's EOS (one id or a
    list) and the chat template's end-of-turn marker(s): a chat model ends its turn on <|im_end|>, not eos."""
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    eos |= set(generation_eos if isinstance(generation_eos, list) else [generation_eos] if generation_eos is not None else [])
    eos |= set(end_of_turn_token_ids(tokenizer))
    return tuple(sorted(eos))


class GeneratorBackend(abc.ABC):
    """A model that samples. Subclasses: TransformersBackend, VLLMBackend."""

    #: Engine name reported in GetInfo and metrics ("transformers", "vllm").
    name: str = ""
    #: Weight version now served (0 = as loaded); set by apply_weights.
    version: int = 0

    def __str__(self) -> str:  # the runtime labels its info metric with str(role.backend)
        return self.name

    @abc.abstractmethod
    def load(self) -> None:
        """Load tokenizer and model (slow)."""

    #: What is served; set by load().
    _info: BackendInfo | None = None

    @property
    def info(self) -> BackendInfo:
        """What is served; only valid after load()."""
        if self._info is None:
            raise RuntimeError("backend not loaded")
        return self._info

    @abc.abstractmethod
    def generate_many(self, requests: list[GenerationRequest]) -> list[list[GeneratedSample]]:
        """Sample every request in one batch; result r holds request r's P * n samples, prompt-major."""

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[GeneratedSample]:
        """Sample one request: P * n samples, prompt-major."""
        return self.generate_many([GenerationRequest(prompts, params)])[0]

    @abc.abstractmethod
    def expected_weights(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of every tensor an update must carry (tied aliases left out)."""

    def weight_aliases(self) -> dict[str, str]:
        """Alias name -> canonical name for tied tensors an update may also name."""
        return {}

    @abc.abstractmethod
    def apply_weights(self, state: dict[str, torch.Tensor], version: int) -> None:
        """Copy a complete, validated state (names of expected_weights) into the model; serve `version`."""

    @abc.abstractmethod
    def decode(self, token_ids: list[int]) -> str:
        """Token ids -> text (special tokens skipped)."""

    def close(self) -> None:  # noqa: B027 - an optional hook, not every backend holds resources
        """Release the model."""


def validate_request(request: GenerationRequest, limits: Limits, info: BackendInfo) -> None:
    """Raise InvalidArgument / OutOfRange naming the field for anything the backend must not see."""
    p = request.params
    if not request.prompts:
        raise InvalidArgument("prompt_ids", "no prompts: send at least one row")
    if request.first_prompt + len(request.prompts) > MAX_PROMPT_INDEX:  # answered as int32 prompt_index
        raise OutOfRange("prompt_index_offset", f"{request.first_prompt} + {len(request.prompts)} prompts passes "
                                                f"{MAX_PROMPT_INDEX}")
    if len(request.prompts) > limits.max_prompts:
        raise OutOfRange("prompt_ids", f"{len(request.prompts)} prompts, at most {limits.max_prompts} per call")
    if p.n < 1:
        raise InvalidArgument("params.n", f"must be >= 1, got {p.n}")
    if p.n > limits.max_samples_per_prompt:
        raise OutOfRange("params.n", f"{p.n} samples per prompt, at most {limits.max_samples_per_prompt}")
    if p.max_new_tokens < 1:
        raise InvalidArgument("params.max_new_tokens", f"must be >= 1, got {p.max_new_tokens}")
    if p.max_new_tokens > limits.max_new_tokens:
        raise OutOfRange("params.max_new_tokens", f"{p.max_new_tokens}, at most {limits.max_new_tokens}")
    if not p.temperature >= 0 or p.temperature == float("inf"):  # also catches NaN
        raise InvalidArgument("params.temperature", f"must be finite and >= 0 (0 = greedy), got {p.temperature}")
    if not 0 < p.top_p <= 1:
        raise InvalidArgument("params.top_p", f"must be in (0, 1] (0 on the wire means 1), got {p.top_p}")
    if p.top_k < 0:
        raise InvalidArgument("params.top_k", f"must be >= 0 (0 = off), got {p.top_k}")
    if len(p.stop) > MAX_STOP_STRINGS:
        raise InvalidArgument("params.stop", f"{len(p.stop)} stop strings, at most {MAX_STOP_STRINGS}")
    for i, text in enumerate(p.stop):
        if not 0 < len(text) <= MAX_STOP_CHARS:
            raise InvalidArgument(f"params.stop[{i}]", f"{len(text)} characters; a stop string has 1 to "
                                                       f"{MAX_STOP_CHARS}")
    bad_stop = [t for t in p.stop_token_ids if not 0 <= t < info.vocab_size]
    if bad_stop:
        raise OutOfRange("params.stop_token_ids", f"ids {bad_stop[:5]} outside [0, {info.vocab_size})")
    if request.num_sequences > limits.max_batch_sequences:
        raise OutOfRange("params.n", f"{len(request.prompts)} prompts x n={p.n} = {request.num_sequences} "
                                     f"sequences, at most {limits.max_batch_sequences} per call")
    for i, row in enumerate(request.prompts):
        if not row:
            raise InvalidArgument(f"prompt_ids[{i}]", "empty prompt: every row needs at least one token")
        lo, hi = min(row), max(row)
        if lo < 0 or hi >= info.vocab_size:
            raise OutOfRange(f"prompt_ids[{i}]", f"token id {lo if lo < 0 else hi} outside [0, {info.vocab_size})")
        if len(row) + p.max_new_tokens > info.max_positions:
            raise OutOfRange(f"prompt_ids[{i}]", f"{len(row)} prompt tokens + max_new_tokens {p.max_new_tokens} "
                                                 f"exceed the model's {info.max_positions} positions")
    if request.budget_tokens > limits.max_tokens_per_call:
        raise OutOfRange("prompt_ids", f"(prompt + max_new_tokens) x n = {request.budget_tokens} tokens, at most "
                                       f"{limits.max_tokens_per_call} per call; split the request")
