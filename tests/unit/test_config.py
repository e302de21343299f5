"""Run config: YAML + --set overrides, unknown fields, impossible combinations, messages that say what to change."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    build_config,
    dump_config,
    load_config,
)
from orchestrator.data import Cursor, PromptRow, PromptStream, load_prompts

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def base(**over) -> dict:
    data = {"models": {"policy": "ckpt"}, "dataset": {"path": "train.jsonl"}, "services": {"local": True}}
    data.update(over)
    return data


def test_defaults_follow_the_algorithm() -> None:
    assert build_config(base()).algorithm.name == "grpo"
    ppo = build_config(base(), ["algorithm.name=ppo"])
    assert ppo.algorithm.advantage == "gae" and ppo.uses_value
    assert not build_config(base()).uses_value


def test_set_overrides_parse_yaml_values_and_nest() -> None:
    cfg = build_config(base(), ["algorithm.lr=1e-5", "steps=7", "sampling.stop_token_ids=[2, 3]",
                                "metrics_port=null", "services.local_options.reward.rule=math"])
    assert cfg.algorithm.lr == 1e-5 and cfg.steps == 7 and cfg.sampling.stop_token_ids == [2, 3]
    assert cfg.metrics_port is None
    assert cfg.services.local_options.reward["rule"] == "math"


def test_set_indexes_lists() -> None:
    data = {"services": {"rewards": [{"address": "a:1"}, {"address": "b:2"}]}}
    apply_overrides(data, ["services.rewards.1.weight=0.5"])
    assert data["services"]["rewards"][1]["weight"] == 0.5


@pytest.mark.parametrize("bad", ["noequals", ".a=1", "a..b=1"])
def test_malformed_set_says_how(bad: str) -> None:
    with pytest.raises(ConfigError, match="--set"):
        build_config(base(), [bad])


def test_unknown_field_names_it_and_suggests() -> None:
    with pytest.raises(ConfigError) as e:
        build_config(base(), ["algorithm.lerning_rate=1"])
    assert "algorithm.lerning_rate: unknown field" in str(e.value)
    with pytest.raises(ConfigError) as e:
        build_config(base(), ["prompts_per_stp=3"])
    msg = str(e.value)
    assert "did you mean 'prompts_per_step'" in msg and "Remove or rename it" in msg


def test_missing_required_field_says_what_to_add() -> None:
    with pytest.raises(ConfigError, match=r"models: required field is missing; add it"):
        build_config({"dataset": {"path": "x"}})


def test_group_zscore_with_one_sample_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"samples_per_prompt >= 2.*set samples_per_prompt to 2 or more"):
        build_config(base(samples_per_prompt=1))


def test_gae_without_value_service_is_rejected() -> None:
    data = base(services={"generator": {"address": "127.0.0.1:1"}, "rewards": [{"address": "127.0.0.1:2"}],
                          "reference": {"address": "127.0.0.1:3"}})
    build_config(data)  # grpo: no critic needed
    with pytest.raises(ConfigError, match=r"advantage=gae needs a value service: set services.value"):
        build_config(data, ["algorithm.name=ppo"])


def test_remote_run_needs_generator_and_rewards_and_reference_for_kl() -> None:
    with pytest.raises(ConfigError, match=r"services.generator is required"):
        build_config(base(services={}))
    with pytest.raises(ConfigError, match=r"services.rewards is empty"):
        build_config(base(services={"generator": {"address": "h:1"}}))
    ok = {"generator": {"address": "h:1"}, "rewards": [{"address": "h:2"}]}
    with pytest.raises(ConfigError, match=r"needs a reference service.*or kl_coef: 0"):
        build_config(base(services=ok))
    assert not build_config(base(services=ok), ["algorithm.kl_coef=0"]).uses_reference


def test_local_with_endpoints_is_ambiguous() -> None:
    with pytest.raises(ConfigError, match=r"remove services.generator"):
        build_config(base(services={"local": True, "generator": {"address": "h:1"}}))


def test_out_of_range_value_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"sampling.top_p: .*less than or equal to 1"):
        build_config(base(), ["sampling.top_p=2"])


def test_load_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)


def test_dump_round_trips(tmp_path: Path) -> None:
    cfg = build_config(base(), ["algorithm.name=trpo", "seed=3"])
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize("name", ["grpo", "ppo", "trpo"])
def test_examples_validate(name: str) -> None:
    cfg = load_config(EXAMPLES / f"{name}.yaml")
    assert isinstance(cfg, RunConfig) and cfg.algorithm.name == name


def test_cursor_wraps_with_a_new_seeded_order() -> None:
    rows = [PromptRow(str(i), {}) for i in range(5)]
    a = PromptStream(rows, seed=1, shuffle=True)
    first = [r.text for r in a.next_batch(5)]
    second = [r.text for r in a.next_batch(5)]
    assert sorted(first) == sorted(second) == [str(i) for i in range(5)]
    assert first != second  # a fresh shuffle per epoch
    b = PromptStream(rows, seed=1, shuffle=True, cursor=Cursor(0, 3))
    assert [r.text for r in b.next_batch(4)] == first[3:] + second[:2]  # resume across the boundary
    assert b.cursor == Cursor(1, 2)


def test_dataset_missing_column_says_which(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"question": "1+1=", "answer": "2"}\n')
    cfg = build_config(base(dataset={"path": str(path)})).dataset
    with pytest.raises(ConfigError, match=r"no column\(s\) \['prompt'\].*dataset.prompt_column"):
        load_prompts(cfg)
    cfg = build_config(base(dataset={"path": str(path), "prompt_column": "question"})).dataset
    assert load_prompts(cfg) == [PromptRow("1+1=", {"answer": "2"})]


def test_config_reference_is_up_to_date() -> None:
    from orchestrator.docs import REFERENCE, generate

    assert REFERENCE.read_text() == generate(), "docs/config-reference.md is stale: run `python -m orchestrator.docs`"
