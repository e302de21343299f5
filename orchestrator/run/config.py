"""The run config: one typed file (YAML) plus `--set key=value` overrides.

Every field carries its own description (docs/config-reference.md is generated from them by
`cli.config_docs`). It is loaded by the loader services share (services.common.settings): errors
name the field and say what to change, a misspelt key gets the list of valid keys and the closest
match, an impossible combination says which side to change. The `services:` section is in
orchestrator.run.services_config (its names are importable from here too).
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from orchestrator.run.algo_config import AlgorithmConfig
from orchestrator.run.datasets import DatasetSpec
from orchestrator.run.services_config import (
    Deadlines,
    Endpoint,
    LocalServices,
    LocalTls,
    RetryConfig,
    RewardEndpoint,
    ServicesConfig,
    Strict,
)
from services.common.settings import ConfigError, apply_sets, load

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DatasetConfig",
    "Deadlines",
    "Endpoint",
    "EvalConfig",
    "LocalServices",
    "LocalTls",
    "ModelsConfig",
    "ProgressConfig",
    "ReportTo",
    "RetryConfig",
    "RewardEndpoint",
    "RunConfig",
    "SamplingConfig",
    "ServicesConfig",
    "apply_overrides",
    "build_config",
    "dump_config",
    "load_config",
]

#: `--set` into a nested dict (list items by index: services.rewards.0.weight=2); the shared parser.
apply_overrides = apply_sets


class ModelsConfig(Strict):
    """Checkpoints of the roles (local Hugging Face directories)."""

    policy: str = Field(..., description="Checkpoint the policy starts from (trained by the orchestrator, served by the generator).")
    reference: str | None = Field(None, description="Frozen reference checkpoint for the KL term; default: the policy checkpoint.")
    value: str | None = Field(None, description="Trunk of the critic (value service); default: the policy checkpoint.")
    dtype: str = Field("float32", description="Trainer dtype: float32 (CPU; bit-reproducible) | bfloat16 | float16.")
    device: str = Field("cpu", description="Trainer device: cpu | cuda | cuda:N | auto.")
    threads: int | None = Field(
        1, ge=1, description="Intra-op CPU threads of the trainer (torch.set_num_threads); null = torch's default. "
        "1 by default: the local services share the cores, and OpenMP threads that wait on each other under CPU "
        "contention made a 1M-parameter update 10-40x slower in our measurements.",
    )


class SamplingConfig(Strict):
    """How the generator samples (the trainer always uses the raw policy's logprobs)."""

    temperature: float = Field(1.0, gt=0, description="Sampling temperature (> 0).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus mass in (0, 1]; 1 = off.")
    top_k: int = Field(0, ge=0, description="Keep the k most likely tokens; 0 = off.")
    max_new_tokens: int = Field(6, ge=1, description="Most tokens generated per sample.")
    stop_token_ids: list[int] = Field(default_factory=list, description="Extra stop tokens (EOS always stops).")
    stop: list[str] = Field(
        default_factory=list, max_length=16, description="Stop strings (1-200 characters each, both generator "
        "backends): a sample ends with the token that completes one. The stop text is kept and nothing is cut, so "
        "the trainer gets exactly the sampled tokens; e.g. [\"\\n\\nQuestion:\"] for a base model.")

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: list[str]) -> list[str]:
        bad = [s for s in value if not 0 < len(s) <= 200]
        if bad:
            raise ValueError(f"stop strings must have 1 to 200 characters; fix or drop {bad[:3]}")
        return value


class DatasetConfig(DatasetSpec):
    """The prompts: kind prompts reads {prompt, answer}-style rows as given (the demo's format); any
    other kind goes through orchestrator.run.datasets (presets, column mapping, chat template, reference
    extraction, bad-row policy, held-out split)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    kind: Literal["prompts", "custom", "gsm8k", "math", "math500", "svamp", "asdiv", "mawps"] = Field(  # type: ignore[assignment]
        "prompts", description="prompts: one prompt text per row, tokenised as is (prompt_column, metadata_columns); "
        "custom or a known dataset (gsm8k, math, ...): the real-data loader (question, answer, reference, chat, ...).")
    prompt_column: str = Field("prompt", description="kind prompts: column holding the prompt text.")
    metadata_columns: list[str] = Field(
        default_factory=lambda: ["answer"], description="kind prompts: columns passed to reward services as string "
        "metadata (e.g. the answer)."
    )
    shuffle: bool = Field(True, description="Visit the prompts in a new seeded order every epoch.")

    def _resolve(self) -> None:
        if self.kind != "prompts":
            if self.prompt_column != "prompt" or self.metadata_columns != ["answer"]:
                raise ValueError(f"prompt_column / metadata_columns are for kind: prompts, not {self.kind}; name the "
                                 "prompt column(s) in dataset.question and extra metadata in dataset.metadata (key: column)")
            super()._resolve()
            return
        loader_only = [name for name in _LOADER_ONLY if getattr(self, name) !=
                       DatasetSpec.model_fields[name].get_default(call_default_factory=True)]
        if self.format not in ("auto", "jsonl", "parquet"):
            loader_only.append("format")
        if loader_only:
            raise ValueError(f"{', '.join(loader_only)} need(s) the real-data loader: set dataset.kind to custom (or a "
                             "known dataset such as gsm8k), or drop them to read plain prompt rows")

    def spec(self) -> DatasetSpec:
        """The loader's view of this section (kind other than prompts)."""
        return DatasetSpec.model_validate(self.model_dump(include=set(DatasetSpec.model_fields)))


#: DatasetSpec fields that mean nothing to kind prompts (chat stays at auto: such rows are never templated).
_LOADER_ONLY = ("reader", "split", "question", "answer", "reference", "metadata", "template", "system_prompt",
                "bad_rows", "limit", "eval_size", "eval_path", "eval_seed")


#: Dataset fields the eval rows do not take from the run's dataset section (the eval set is every row loaded).
_NOT_INHERITED = ("limit", "eval_size", "eval_path", "eval_seed", "shuffle")


class CheckpointConfig(Strict):
    """Where and how often the run state is saved."""

    dir: str | None = Field(None, description="Checkpoint directory; default: <run_dir>/checkpoints.")
    interval: int = Field(0, ge=0, description="Save every N steps (0: only at the end of the run).")
    keep: int = Field(2, ge=1, description="Complete checkpoints of this run kept; its older ones are deleted (never the newest, never another run's).")
    value_interval: int = Field(
        1, ge=0, description="Save the critic (Value.Save, weights + optimizer) every N steps into one of two "
        "alternating slots, so a value service that restarts is reloaded having lost at most N-1 steps of training "
        "(1: nothing lost). Each save writes about 3x the critic's parameter bytes: cheap for a small critic, raise "
        "it for a large one. 0: only with the run checkpoints.",
    )


#: Experiment-tracking backends (orchestrator/run/reporting.py has one reporter per name), as TRL's report_to.
ReportTo = Literal["tensorboard", "wandb", "jsonl"]


class ProgressConfig(Strict):
    """How `quartet train` and `quartet demo` show progress: a bar on a terminal, plain log lines elsewhere."""

    mode: Literal["auto", "bar", "lines", "off"] = Field(
        "auto", description="auto: the rich bar when stdout is a terminal, else plain lines (nohup, CI, a container "
        "log) | bar | lines | off.",
    )
    every_steps: int = Field(10, ge=1, description="Lines mode: a line at least every N steps (and at the first "
                             "and the last step).")
    every_seconds: float = Field(60.0, gt=0, description="Lines mode: a line after any step that ends S seconds or "
                                 "more after the previous line, so slow steps are still seen.")


class EvalConfig(Strict):
    """Held-out evaluation inside `quartet train`: greedy pass@1 through the generator (it serves the policy),
    scored by the answer rule, written to run_dir/eval.jsonl (orchestrator/run/evaluation.py)."""

    every: int = Field(0, ge=0, description="Evaluate after every N-th step and after the last one (0: only at_start).")
    at_start: bool = Field(False, description="Also evaluate the starting policy, before step 1.")
    max_samples: int = Field(200, ge=0, description="Problems per evaluation: the first N eval rows (0 = all).")
    max_new_tokens: int | None = Field(None, ge=1, description="Most tokens per greedy answer; default: "
                                       "sampling.max_new_tokens.")
    dataset: dict[str, Any] | None = Field(
        None, description="The eval rows as changes to the run's dataset section (the rest, e.g. kind, template, "
        "system_prompt, is the run's), e.g. {path: data/gsm8k_test.jsonl}, or {split: test} for a save_to_disk "
        "directory; every row is used (the training rows themselves are refused). "
        "Unset: the run's held-out rows (dataset.eval_size / dataset.eval_path).")
    rule: Literal["auto", "math", "arithmetic"] = Field(
        "auto", description="Correctness rule (the reward service's): auto = the local reward's rule when it is math "
        "or arithmetic, else arithmetic for dataset kind prompts and math for the others.")
    extract: list[Literal["boxed", "answer_is", "hash", "last_number"]] | None = Field(
        None, description="Rule math: answer extraction order; default: the local reward's extract, else all four.")
    batch_size: int = Field(32, ge=1, description="Prompts per Generate call.")
    seed: int = Field(0, ge=0, description="Generate seed of the evaluation (greedy answers do not depend on it); "
                      "the run's own seeds and RNG streams are never used.")


class RolloutConfig(Strict):
    """When the samples of a step are drawn."""

    pipeline: bool = Field(
        False,
        description="Pipelined (one-step off-policy) rollouts: the generator samples step k+1 while the trainer "
        "scores and updates on step k, so a step trains on samples of the weights one version back, corrected "
        "by truncated importance sampling (algorithm.tis_cap). false: each step samples the weights it trains.",
    )
    max_staleness: int = Field(
        1, ge=1,
        description="Pipelined rollouts: samples drawn by weights more than this many versions behind the weights "
        "being trained are discarded and drawn again (e.g. after a generator restart); counted in the step log.",
    )


class RunConfig(Strict):
    """One RL run: models, services, algorithm, data, checkpoints."""

    models: ModelsConfig = Field(..., description="Checkpoints of the policy, reference and critic.")
    services: ServicesConfig = Field(default_factory=ServicesConfig, description="Where the four roles run.")
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig, description="Algorithm, advantage, KL and update settings.")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="Sampling parameters of the generator.")
    dataset: DatasetConfig = Field(..., description="The prompt set.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Checkpoint directory and interval.")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="Synchronous or pipelined rollouts.")
    prompts_per_step: int = Field(8, ge=1, description="Prompts per step.")
    samples_per_prompt: int = Field(8, ge=1, description="Samples per prompt G (>= 2 for group advantages).")
    steps: int = Field(100, ge=1, description="Steps (updates) in the run; a resumed run stops at the same total.")
    seed: int = Field(0, ge=0, description="Run seed: data order, sampling seeds, trainer RNG.")
    metrics_port: int | None = Field(0, ge=0, description="Orchestrator Prometheus port (0: a free port, null: off).")
    metrics_host: str = Field(
        "127.0.0.1", description="Address the orchestrator's Prometheus endpoint binds; 0.0.0.0 lets Prometheus in "
        "another container scrape it (the endpoint has no auth: bind beyond loopback only on a private network).",
    )
    run_dir: str = Field("runs/run", description="Directory for the step log, service logs, checkpoints and plots.")
    report_to: list[ReportTo] = Field(
        default_factory=list, description="Experiment logging, as in TRL: any of tensorboard (event files in run_dir/tensorboard; "
        "pip install 'quartet-rl[tensorboard]'), wandb (offline unless WANDB_MODE / WANDB_API_KEY say otherwise; "
        "pip install 'quartet-rl[wandb]'), jsonl (run_dir/metrics.jsonl). Metric names are the Prometheus ones, "
        "e.g. quartet_reward_mean. The step log steps.jsonl is written regardless.",
    )
    progress: ProgressConfig = Field(default_factory=ProgressConfig, description="Progress bar or log lines.")
    eval: EvalConfig | None = Field(None, description="Periodic held-out evaluation (unset: none).")

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to(cls, value: Any) -> Any:
        """As in TRL: one name alone, "none" (nothing) or "all" (every backend) are accepted too."""
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list) and value == ["none"]:
            return []
        if isinstance(value, list) and value == ["all"]:
            return list(typing.get_args(ReportTo))
        return value

    @model_validator(mode="after")
    def _combinations(self) -> RunConfig:
        algo, svc = self.algorithm, self.services
        if algo.advantage == "group_zscore" and self.samples_per_prompt < 2:
            raise ValueError(
                f"algorithm.advantage=group_zscore needs samples_per_prompt >= 2 (got {self.samples_per_prompt}): "
                "set samples_per_prompt to 2 or more, or use advantage: gae with a value service"
            )
        if not svc.local:
            if svc.generator is None:
                raise ValueError("services.generator is required: give its endpoint or set services.local: true")
            if not svc.rewards:
                raise ValueError("services.rewards is empty: list at least one reward endpoint or set services.local: true")
            if algo.advantage == "gae" and svc.value is None:
                raise ValueError(
                    "algorithm.advantage=gae needs a value service: set services.value, "
                    "or use advantage: group_zscore (with samples_per_prompt >= 2), or services.local: true"
                )
            if algo.kl_coef > 0 and svc.reference is None:
                raise ValueError(
                    f"algorithm.kl_coef={algo.kl_coef} needs a reference service: set services.reference, or kl_coef: 0"
                )
        elif svc.generator or svc.reference or svc.value or svc.rewards:
            raise ValueError(
                "services.local: true starts its own services: remove services.generator/reference/value/rewards, "
                "or set services.local: false to use them"
            )
        if self.rollout.pipeline and algo.tis_cap is None and algo.old_logprobs == "trainer":
            self.algorithm = algo.model_copy(update={"tis_cap": 2.0})  # the documented default of a pipelined run
        if sum(r.weight for r in svc.rewards) == 0 and svc.rewards:
            raise ValueError("services.rewards weights sum to 0: give at least one reward a non-zero weight")
        for local in svc.local_options.reward_services():
            reward = local.options
            if (svc.local and self.dataset.kind != "prompts" and reward.get("rule") in ("math", "arithmetic")
                    and reward.get("answer_key", "answer") != self.dataset.answer_key):
                raise ValueError(
                    f"dataset.answer_key={self.dataset.answer_key!r} but the local reward "
                    f"{local.name + ' ' if local.name else ''}reads "
                    f"answer_key={reward.get('answer_key', 'answer')!r}: set both to the same key"
                )
        if self.eval is not None:
            self._check_eval(self.eval)
        return self

    def _check_eval(self, ev: EvalConfig) -> None:
        if ev.dataset is not None:
            self.eval_dataset()
        elif self.dataset.kind == "prompts":
            raise ValueError("eval: dataset kind prompts has no held-out split; set eval.dataset.path to a file of "
                             "eval prompts")
        elif not (self.dataset.eval_size or self.dataset.eval_path):
            raise ValueError("eval reads the run's held-out rows but dataset.eval_size is 0 and dataset.eval_path is "
                             "unset: set one of them, or eval.dataset (e.g. {path: data/gsm8k_test.jsonl})")

    def eval_dataset(self) -> DatasetConfig | None:
        """The eval rows' dataset section: the run's with eval.dataset's changes, every row kept; None: the run's
        held-out rows. ValueError naming eval.dataset."""
        if self.eval is None or self.eval.dataset is None:
            return None
        base = self.dataset.model_dump(exclude_unset=True, exclude={*_NOT_INHERITED})
        if self.eval.dataset.get("kind", base.get("kind")) != base.get("kind"):
            for key in ("question", "answer", "reference"):  # the run's kind's columns mean nothing to another kind
                base.pop(key, None)
        try:
            data = DatasetConfig.model_validate({**base, **self.eval.dataset})
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'dataset'}: "
                                 f"{err['msg'].removeprefix('Value error, ')}" for err in e.errors())
            raise ValueError(f"eval.dataset: {problems}") from None
        # Evaluating on the training rows would pass silently for held-out accuracy: refuse it.
        if (data.path, data.split, data.format) == (self.dataset.path, self.dataset.split, self.dataset.format):
            raise ValueError(f"eval.dataset reads the training rows ({data.path}"
                             + (f", split {data.split}" if data.split else "") + "): set eval.dataset.path to the eval "
                             "file (or eval.dataset.split for a save_to_disk directory), or drop eval.dataset to use "
                             "the held-out rows (dataset.eval_size)")
        if data.split != self.dataset.split and data.reader != "datasets" and not Path(data.path).is_dir() \
                and data.format != "hf_disk":
            raise ValueError(f"eval.dataset.split={data.split!r} applies to a save_to_disk directory or reader: "
                             f"datasets, not to the file {data.path}; set eval.dataset.path to the eval file instead")
        return data

    @property
    def uses_value(self) -> bool:
        """Whether the run has a critic (GAE advantages)."""
        return self.algorithm.advantage == "gae"

    @property
    def uses_reference(self) -> bool:
        """Whether the run computes KL to a reference policy."""
        return self.algorithm.kl_coef > 0

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else Path(self.run_dir) / "checkpoints"

# --- loading ---------------------------------------------------------------------------------------


def build_config(data: dict[str, Any], overrides: list[str] | None = None) -> RunConfig:
    """Validate a config dict (after `--set` overrides) or raise ConfigError saying what to change.

    Runs read no environment variables: endpoints name theirs (token_env), resolved when used.
    """
    return load(RunConfig, data=data, sets=overrides or (), what="run config")


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config, apply `--set` overrides, validate."""
    return load(RunConfig, file=path, sets=overrides or (), what="run config")


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML (stored in every checkpoint and the run dir), without secrets.

    Inline tokens are `exclude=True` fields, so no dump of the config carries them; token_file /
    token_env (paths and variable names, not secrets) are kept so a resumed run finds its tokens again.
    """
    data = cfg.model_dump(mode="json")
    local = data["services"]["local_options"]
    if local["rewards"]:  # `reward` (one service) is then an unused default, and the two together are refused
        del local["reward"]
    return yaml.safe_dump(data, sort_keys=False)
