"""Run config: YAML + --set overrides, unknown fields, impossible combinations, messages that say what to change."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.run.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    build_config,
    dump_config,
    load_config,
)
from orchestrator.run.data import Cursor, PromptRow, PromptStream, load_prompts, load_rows

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


@pytest.mark.parametrize("name", sorted(p.stem for p in EXAMPLES.glob("*.yaml")))
def test_each_examples_dump_loads_back(tmp_path: Path, name: str) -> None:
    """run_dir/config.yaml (the resolved config) is a config `quartet train` takes: a run can be redone from it."""
    cfg = load_config(EXAMPLES / f"{name}.yaml")
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize("name", sorted(p.stem for p in EXAMPLES.glob("*.yaml")))
def test_examples_validate(name: str) -> None:
    cfg = load_config(EXAMPLES / f"{name}.yaml")
    assert isinstance(cfg, RunConfig) and cfg.algorithm.name == name.split("_")[-1]
    if cfg.dataset.kind not in ("prompts", "custom"):  # a real-data example: evaluated, with a format reward
        assert cfg.eval is not None and cfg.eval.every > 0
        rules = [r.options.get("rule") for r in cfg.services.local_options.reward_services()]
        assert "math" in rules and "final_answer" in rules, rules


def test_example_list_holds_the_real_data_examples() -> None:
    assert {"gsm8k_grpo.yaml", "math_grpo.yaml"} <= {p.name for p in EXAMPLES.glob("*.yaml")}


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


def test_a_cursor_saved_exactly_at_an_epoch_end_resumes_into_the_next_epoch() -> None:
    # The bug other trainers had: a resume at the end of an epoch thought the data was used up.
    rows = [PromptRow(str(i), {}) for i in range(4)]
    straight = PromptStream(rows, seed=3, shuffle=True)
    straight.next_batch(4)
    assert straight.cursor == Cursor(0, 4)
    expected = [r.text for r in straight.next_batch(4)]
    resumed = PromptStream(rows, seed=3, shuffle=True, cursor=Cursor(0, 4))
    assert [r.text for r in resumed.next_batch(4)] == expected and resumed.cursor == Cursor(1, 4)


def test_dataset_missing_column_says_which(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"question": "1+1=", "answer": "2"}\n')
    cfg = build_config(base(dataset={"path": str(path)})).dataset
    with pytest.raises(ConfigError, match=r"no column\(s\) \['prompt'\].*dataset.prompt_column"):
        load_prompts(cfg)
    cfg = build_config(base(dataset={"path": str(path), "prompt_column": "question"})).dataset
    assert load_prompts(cfg) == [PromptRow("1+1=", {"answer": "2"})]


def test_dataset_kind_chooses_the_loader_and_rejects_the_other_ones_fields(tmp_path: Path) -> None:
    path = tmp_path / "gsm8k.jsonl"
    path.write_text('{"question": "Tom has 3 apples and eats one. How many are left?", "answer": "3 - 1 = 2\\n#### 2"}\n'
                    '{"question": "2+2?", "answer": "no final line"}\n')
    with pytest.raises(ConfigError, match=r"dataset\.kind to custom"):
        build_config(base(dataset={"path": str(path), "template": "Q: {question}"}))
    with pytest.raises(ConfigError, match=r"dataset\.question"):
        build_config(base(dataset={"path": str(path), "kind": "gsm8k", "prompt_column": "question"}))
    with pytest.raises(ConfigError, match="answer_key='ref' but the local reward reads answer_key='answer'"):
        build_config(base(dataset={"path": str(path), "kind": "gsm8k", "answer_key": "ref"},
                          services={"local": True, "local_options": {"reward": {"kind": "rule", "rule": "math"}}}))
    math_ref = {"local": True, "local_options": {"reward": {"kind": "rule", "rule": "math", "answer_key": "ref"}}}
    cfg = build_config(base(dataset={"path": str(path), "kind": "gsm8k", "bad_rows": "skip", "answer_key": "ref"},
                            services=math_ref))
    assert build_config(RunConfig.model_validate(cfg.model_dump()).model_dump()).dataset == cfg.dataset  # dump reloads
    logged: list[str] = []
    rows = load_rows(cfg.dataset, _WordTokenizer(), logged.append)
    assert rows == [PromptRow("Tom has 3 apples and eats one. How many are left?", {"ref": "2"}, (1,) + (4,) * 11)]
    assert "skipped 1 bad row(s) {'no_reference': 1}" in logged[0] and "1 training prompts" in logged[1]
    # The loader's ids are what the generator gets; plain rows are tokenised as before.
    assert rows[0].token_ids(_WordTokenizer()) == [1] + [4] * 11
    assert PromptRow("a b", {}).token_ids(_WordTokenizer()) == [1, 4, 4]
    plain = build_config(base(dataset={"path": str(path), "prompt_column": "question"})).dataset
    assert load_rows(plain, None)[0].ids is None


class _WordTokenizer:
    """A BOS then one id per word; no chat template (so the loader tokenises the plain text)."""

    chat_template = None

    def __call__(self, text: str) -> dict:
        return {"input_ids": [1] + [4] * len(text.split())}


def test_config_reference_is_up_to_date() -> None:
    from cli.config_docs import README, REFERENCE, generate, spliced_readme

    text = generate()
    assert REFERENCE.read_text() == text, "docs/config-reference.md is stale: run `python -m cli.config_docs`"
    readme = README.read_text()
    assert spliced_readme(text, readme) == readme, "README.md's config reference is stale: run `python -m cli.config_docs`"


def remote(**endpoint) -> dict:
    ep = {"address": "127.0.0.1:1", **endpoint}
    return base(services={"generator": ep, "rewards": [dict(ep, address="127.0.0.1:2")]}, algorithm={"kl_coef": 0})


def test_dumped_config_never_holds_tokens(tmp_path: Path) -> None:
    cfg = build_config(remote(token="call-SECRET-1", admin_token="admin-SECRET-2"))
    assert cfg.services.generator.call_token() == "call-SECRET-1"
    assert cfg.services.generator.admin_call_token() == "admin-SECRET-2"
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(cfg))
    text = path.read_text()
    assert "SECRET" not in text and "127.0.0.1:1" in text
    assert "SECRET" not in repr(cfg) and "SECRET" not in str(cfg.services.generator)
    assert load_config(path).services.generator.call_token() is None  # the dump loads, without the secret
    cfg.services.rewards[0].token = "late-SECRET-3"  # set after loading, as docker/entrypoint.py does
    assert "SECRET" not in dump_config(cfg)
    assert cfg.services.rewards[0].call_token() == "late-SECRET-3"


def test_tokens_from_files_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "call").write_text("file-SECRET\n")
    monkeypatch.setenv("TEST_QUARTET_ADMIN", "env-SECRET")
    cfg = build_config(remote(token_file=str(tmp_path / "call"), admin_token_env="TEST_QUARTET_ADMIN"))
    ep = cfg.services.generator
    assert ep.call_token() == "file-SECRET" and ep.admin_call_token() == "env-SECRET"
    assert "SECRET" not in dump_config(cfg) and "TEST_QUARTET_ADMIN" in dump_config(cfg)
    missing = build_config(remote(token_file=str(tmp_path / "nope"))).services.generator
    with pytest.raises(ConfigError, match=r"token_file .*nope.* does not exist; fix the path"):
        missing.call_token()
    monkeypatch.delenv("TEST_QUARTET_ADMIN")
    with pytest.raises(ConfigError, match=r"admin_token_env names TEST_QUARTET_ADMIN, which is unset"):
        ep.admin_call_token()


def test_metrics_host_and_retry_settings() -> None:
    cfg = build_config(base())
    assert cfg.metrics_host == "127.0.0.1" and cfg.services.retry.max_attempts >= 2
    cfg = build_config(base(), ["metrics_host=0.0.0.0", "services.retry.budget_s=5"])
    assert cfg.metrics_host == "0.0.0.0" and cfg.services.retry.budget_s == 5
    with pytest.raises(ConfigError, match=r"raise max_backoff_s or lower initial_backoff_s"):
        build_config(base(), ["services.retry.max_backoff_s=0.1", "services.retry.initial_backoff_s=1"])


def test_several_local_rewards_are_named_weighted_and_exclusive_with_reward() -> None:
    from orchestrator.run.session import local_specs

    two = [{"name": "correct", "options": {"kind": "rule", "rule": "math"}},
           {"name": "format", "weight": 0.2, "options": {"kind": "rule", "rule": "final_answer"}}]
    cfg = build_config(base(services={"local": True, "local_options": {"rewards": two}}))
    specs = [(s.role, s.label, s.options.get("rule")) for s in local_specs(cfg)]
    assert specs[1:3] == [("reward", "reward-correct", "math"), ("reward", "reward-format", "final_answer")]
    assert [(r.name, r.weight) for r in cfg.services.local_options.reward_services()] == [("correct", 1.0),
                                                                                         ("format", 0.2)]
    one = build_config(base())  # the single reward keeps its label and weight 1
    assert [(s.label, s.options["rule"]) for s in local_specs(one) if s.role == "reward"] == [("reward", "arithmetic")]
    with pytest.raises(ConfigError, match="both reward and rewards"):
        build_config(base(services={"local": True, "local_options": {"rewards": two, "reward": {"rule": "math"}}}))
    with pytest.raises(ConfigError, match=r"names .* repeat"):
        build_config(base(services={"local": True, "local_options": {"rewards": [two[0], two[0]]}}))
    with pytest.raises(ConfigError, match=r"rewards\.0\.name"):
        build_config(base(services={"local": True, "local_options": {"rewards": [{**two[0], "name": "Bad Name"}]}}))
    with pytest.raises(ConfigError, match="weights sum to 0"):
        build_config(base(services={"local": True, "local_options": {"rewards": [{**two[0], "weight": 0}]}}))
