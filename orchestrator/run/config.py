"""The run config: one typed file (YAML) plus `--set key=value` overrides.

Every field carries its own description (docs/config-reference.md is generated from them by
`cli.config_docs`). Errors name the field and say what to change: a misspelt key gets the list
of valid keys and the closest match, an impossible combination says which side to change.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from orchestrator.run.algo_config import AlgorithmConfig


class ConfigError(ValueError):
    """A run config that cannot be used; the message says what to change."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelsConfig(_Strict):
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


class Endpoint(_Strict):
    """Where a running service listens, and how to reach it.

    Tokens are secrets: they come inline, from a file (`token_file`) or from an environment variable
    (`token_env`), are never written by `dump_config` (run dir, checkpoints) and print as `**********`.
    """

    # Assignments are validated so a token set after loading (docker/entrypoint.py) is still a SecretStr.
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), validate_assignment=True)

    address: str = Field(..., description="host:port of the service, e.g. 127.0.0.1:50051.")
    token: SecretStr | None = Field(
        None, exclude=True,
        description="Call-scope bearer token inline (never written to config dumps); prefer token_file or token_env. "
        "None with no token_file / token_env: auth off.",
    )
    token_file: str | None = Field(None, description="File holding the call-scope token (used when `token` is not set).")
    token_env: str | None = Field(
        None, description="Environment variable holding the call-scope token, e.g. QUARTET_TOKEN "
        "(used when neither `token` nor `token_file` is set).",
    )
    admin_token: SecretStr | None = Field(
        None, exclude=True,
        description="Admin-scope token inline for UpdateWeights / TrainStep / Save / Load (never written to config "
        "dumps); default: the call token.",
    )
    admin_token_file: str | None = Field(None, description="File holding the admin-scope token (used when `admin_token` is not set).")
    admin_token_env: str | None = Field(
        None, description="Environment variable holding the admin-scope token, e.g. QUARTET_ADMIN_TOKEN "
        "(used when neither `admin_token` nor `admin_token_file` is set).",
    )
    tls_ca: str | None = Field(None, description="PEM file of the CA that signed the server's certificate (None: plaintext).")
    tls_client_cert: str | None = Field(
        None, description="PEM client certificate presented to a service that requires mutual TLS (with tls_client_key "
        "and tls_ca).",
    )
    tls_client_key: str | None = Field(None, description="PEM private key of tls_client_cert.")

    @model_validator(mode="after")
    def _tls_pair(self) -> Endpoint:
        if (self.tls_client_cert is None) != (self.tls_client_key is None):
            raise ValueError(f"endpoint {self.address}: tls_client_cert and tls_client_key go together: set both, or neither")
        if self.tls_client_cert is not None and self.tls_ca is None:
            raise ValueError(f"endpoint {self.address}: tls_client_cert needs tls_ca (mutual TLS runs over TLS)")
        return self

    def call_token(self) -> str | None:
        """The call-scope token: inline, else from token_file, else from token_env; None = auth off."""
        return _resolve_secret(self.token, self.token_file, self.token_env, field="token", address=self.address)

    def admin_call_token(self) -> str | None:
        """The admin-scope token (inline, file, env), falling back to the call token."""
        admin = _resolve_secret(self.admin_token, self.admin_token_file, self.admin_token_env,
                                field="admin_token", address=self.address)
        return admin or self.call_token()


def _resolve_secret(
    inline: SecretStr | str | None, file: str | None, env: str | None, *, field: str, address: str
) -> str | None:
    """A secret from the first source that is set; errors name the source, never the value."""
    if inline is not None:
        value = inline.get_secret_value() if isinstance(inline, SecretStr) else str(inline)
        return value or None
    if file:
        path = Path(file)
        if not path.is_file():
            raise ConfigError(f"endpoint {address}: {field}_file {file!r} does not exist; fix the path or give {field} another way")
        text = path.read_text(encoding="utf-8").strip()
        if not text:
            raise ConfigError(f"endpoint {address}: {field}_file {file!r} is empty; write the token into it")
        return text
    if env:
        value = os.environ.get(env, "").strip()
        if not value:
            raise ConfigError(f"endpoint {address}: {field}_env names {env}, which is unset or empty; export it or remove {field}_env")
        return value
    return None


class RewardEndpoint(Endpoint):
    """A reward service and the weight of its score in the total reward."""

    weight: float = Field(1.0, description="Weight of this service's reward in the weighted sum over reward services.")


class LocalTls(_Strict):
    """PEM files that put the local services behind TLS (mutual TLS with a client certificate)."""

    cert: str = Field(..., description="Server certificate every local service presents; it must name 127.0.0.1 "
                      "(an IP subjectAltName), the address the orchestrator dials.")
    key: str = Field(..., description="Private key of cert.")
    ca: str = Field(..., description="CA certificate that signed cert; the orchestrator trusts only it.")
    client_cert: str | None = Field(
        None, description="Client certificate the orchestrator presents (with client_key): turns on mutual TLS, "
        "and the services then refuse clients without a certificate signed by client_ca.",
    )
    client_key: str | None = Field(None, description="Private key of client_cert.")
    client_ca: str | None = Field(None, description="CA the services accept client certificates from (mTLS); default: ca.")

    @model_validator(mode="after")
    def _files(self) -> LocalTls:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client_cert and client_key go together: set both for mutual TLS, or neither")
        if self.client_ca is not None and self.client_cert is None:
            raise ValueError("client_ca is used only with mutual TLS: set client_cert and client_key, or remove client_ca")
        for name in ("cert", "key", "ca", "client_cert", "client_key", "client_ca"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"tls.{name}: file {path!r} does not exist; give the path of a PEM file")
        return self


class LocalServices(_Strict):
    """Options of the services that `local: true` starts as child processes."""

    reward: dict[str, Any] = Field(
        default_factory=lambda: {"kind": "rule", "rule": "arithmetic"},
        description="Options of the local reward service (the reward role's Options, e.g. kind: rule, rule: arithmetic).",
    )
    generator: dict[str, Any] = Field(default_factory=dict, description="Options of the local generator role.")
    reference: dict[str, Any] = Field(default_factory=dict, description="Options of the local reference role.")
    value: dict[str, Any] = Field(default_factory=dict, description="Options of the local value role (e.g. its learning rate).")
    startup_timeout_s: float = Field(180.0, gt=0, description="Seconds to wait for every local service to report SERVING.")
    max_restarts: int = Field(
        5, ge=0, description="Restarts of one local service that exited on its own, over the whole run (0: never "
        "restart). A service that used them all is left stopped, and the run fails when its retry budget runs out.",
    )
    restart_backoff_s: float = Field(
        0.5, gt=0, description="Delay before a crashed local service's first restart; it doubles with each further "
        "restart of that service, up to restart_backoff_max_s. The service comes back on the same port and tokens.",
    )
    restart_backoff_max_s: float = Field(10.0, gt=0, description="Largest delay before restarting a local service.")
    tls: LocalTls | None = Field(
        None, description="TLS between the orchestrator and the local services (null: plaintext on loopback); "
        "with client_cert and client_key, mutual TLS.",
    )

    @model_validator(mode="after")
    def _restart_order(self) -> LocalServices:
        if self.restart_backoff_max_s < self.restart_backoff_s:
            raise ValueError(
                f"restart_backoff_max_s={self.restart_backoff_max_s} is below restart_backoff_s={self.restart_backoff_s}: "
                "raise restart_backoff_max_s or lower restart_backoff_s"
            )
        return self


class Deadlines(_Strict):
    """Per-call deadlines in seconds."""

    generate_s: float = Field(120.0, gt=0, description="Generator.Generate deadline.")
    score_s: float = Field(60.0, gt=0, description="Reward.Score deadline.")
    logprobs_s: float = Field(60.0, gt=0, description="Reference.LogProbs deadline.")
    values_s: float = Field(60.0, gt=0, description="Value.Values deadline.")
    train_step_s: float = Field(300.0, gt=0, description="Value.TrainStep deadline.")
    weights_s: float = Field(300.0, gt=0, description="Generator.UpdateWeights deadline (the whole stream).")
    checkpoint_s: float = Field(300.0, gt=0, description="Value.Save / Value.Load deadline.")
    info_s: float = Field(10.0, gt=0, description="GetInfo deadline.")


class RetryConfig(_Strict):
    """Retries of calls that failed with UNAVAILABLE / DEADLINE_EXCEEDED / RESOURCE_EXHAUSTED."""

    max_attempts: int = Field(
        100, ge=1, description="Most attempts of one call, the first included (1: no retries). High by default so "
        "that budget_s is what ends the retries: a restarting service refuses connections at once, and 8 "
        "attempts (about 18 s of sleeps on average) can run out before a SIGKILLed local service is back on a busy 2-core box."
    )
    initial_backoff_s: float = Field(
        0.5, gt=0, description="Backoff cap before the first retry; each retry sleeps a uniform random time in "
        "[0, cap] (full jitter) and the cap doubles per retry."
    )
    max_backoff_s: float = Field(10.0, gt=0, description="Largest backoff cap between two attempts.")
    budget_s: float = Field(
        120.0, gt=0, description="Seconds one call may spend retrying (attempts and sleeps, counted from the first "
        "attempt); when it runs out the run stops with an error naming the service, the call and the last status."
    )

    @model_validator(mode="after")
    def _order(self) -> RetryConfig:
        if self.max_backoff_s < self.initial_backoff_s:
            raise ValueError(
                f"max_backoff_s={self.max_backoff_s} is below initial_backoff_s={self.initial_backoff_s}: "
                "raise max_backoff_s or lower initial_backoff_s"
            )
        return self


class ServicesConfig(_Strict):
    """The four roles: endpoints of running services, or `local: true` to start them here."""

    local: bool = Field(False, description="Start all services as child processes on free loopback ports with fresh tokens.")
    generator: Endpoint | None = Field(None, description="Generator endpoint (required unless local).")
    reference: Endpoint | None = Field(None, description="Reference endpoint (required unless local, when the KL coefficient > 0).")
    value: Endpoint | None = Field(None, description="Value endpoint (required unless local, when the advantage is gae).")
    rewards: list[RewardEndpoint] = Field(default_factory=list, description="Reward endpoints; the reward is their weighted sum.")
    local_options: LocalServices = Field(default_factory=LocalServices, description="Options of the local services.")
    deadlines: Deadlines = Field(default_factory=Deadlines, description="Per-call deadlines.")
    retry: RetryConfig = Field(
        default_factory=RetryConfig,
        description="Retries with exponential backoff and full jitter: idempotent calls (Generate with its seed, Score, "
        "LogProbs, Values, GetInfo), TrainStep with its step id, UpdateWeights as a whole stream with its version.",
    )


class SamplingConfig(_Strict):
    """How the generator samples (the trainer always uses the raw policy's logprobs)."""

    temperature: float = Field(1.0, gt=0, description="Sampling temperature (> 0).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus mass in (0, 1]; 1 = off.")
    top_k: int = Field(0, ge=0, description="Keep the k most likely tokens; 0 = off.")
    max_new_tokens: int = Field(6, ge=1, description="Most tokens generated per sample.")
    stop_token_ids: list[int] = Field(default_factory=list, description="Extra stop tokens (EOS always stops).")


class DatasetConfig(_Strict):
    """The prompts: a local jsonl or parquet file."""

    path: str = Field(..., description="Local .jsonl or .parquet file, one prompt per row.")
    format: Literal["auto", "jsonl", "parquet"] = Field("auto", description="File format; auto: from the suffix.")
    prompt_column: str = Field("prompt", description="Column holding the prompt text.")
    metadata_columns: list[str] = Field(
        default_factory=lambda: ["answer"], description="Columns passed to reward services as string metadata (e.g. the answer)."
    )
    shuffle: bool = Field(True, description="Visit the prompts in a new seeded order every epoch.")


class CheckpointConfig(_Strict):
    """Where and how often the run state is saved."""

    dir: str | None = Field(None, description="Checkpoint directory; default: <run_dir>/checkpoints.")
    interval: int = Field(0, ge=0, description="Save every N steps (0: only at the end of the run).")
    keep: int = Field(2, ge=1, description="Complete checkpoints kept; older ones are deleted.")
    value_interval: int = Field(
        1, ge=0, description="Save the critic (Value.Save, weights + optimizer) every N steps into one of two "
        "alternating slots, so a value service that restarts is reloaded having lost at most N-1 steps of training "
        "(1: nothing lost). Each save writes about 3x the critic's parameter bytes: cheap for a small critic, raise "
        "it for a large one. 0: only with the run checkpoints.",
    )


class RunConfig(_Strict):
    """One RL run: models, services, algorithm, data, checkpoints."""

    models: ModelsConfig = Field(..., description="Checkpoints of the policy, reference and critic.")
    services: ServicesConfig = Field(default_factory=ServicesConfig, description="Where the four roles run.")
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig, description="Algorithm, advantage, KL and update settings.")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="Sampling parameters of the generator.")
    dataset: DatasetConfig = Field(..., description="The prompt set.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Checkpoint directory and interval.")
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
        if sum(r.weight for r in svc.rewards) == 0 and svc.rewards:
            raise ValueError("services.rewards weights sum to 0: give at least one reward a non-zero weight")
        return self

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


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class that holds the field at `loc[:-1]` (for listing valid keys)."""
    cls: Any = model
    for part in loc[:-1]:
        if isinstance(part, int) or cls is None:
            continue
        field = cls.model_fields.get(part)
        if field is None:
            return None
        ann = field.annotation
        cls = None
        for cand in (ann, *getattr(ann, "__args__", ())):
            for inner in (cand, *getattr(cand, "__args__", ())):
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    cls = inner
    return cls


def explain(err: ValidationError, model: type[BaseModel] = RunConfig) -> str:
    """One line per problem, each naming the field and saying what to change."""
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and "[" in p))
        name = ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden":
            holder = _model_at(model, loc)
            valid = sorted(holder.model_fields) if holder else []
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else "."
            lines.append(f"{name}: unknown field{hint} Valid fields here: {', '.join(valid)}. Remove or rename it.")
        elif e["type"] == "missing":
            lines.append(f"{name}: required field is missing; add it to the config or pass --set {name}=...")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = e.get("input")
            shown = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
            lines.append(f"{name}: {msg}{shown}" if name else f"{msg}{shown}")
    return "invalid run config:\n  " + "\n  ".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value parsed as YAML: numbers, booleans, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set algorithm.lr=1e-5")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not all(parts):
        raise ConfigError(f"--set {text!r}: the key {key!r} has an empty part; use dotted names like algorithm.lr")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({e}); quote it") from e
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each `a.b=c` into the nested dict (list items by index: services.rewards.0.weight=2)."""
    for text in overrides:
        parts, value = parse_override(text)
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            key: Any = int(part) if isinstance(node, list) else part
            if isinstance(node, list):
                if key >= len(node):
                    raise ConfigError(f"--set {text!r}: {'.'.join(parts[: i + 1])} has only {len(node)} items")
                node = node[key]
                continue
            if not isinstance(node.get(key), dict | list):
                node[key] = {}
            node = node[key]
        last = parts[-1]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return data


def build_config(data: dict[str, Any], overrides: list[str] | None = None) -> RunConfig:
    """Validate a config dict (after overrides) or raise ConfigError saying what to change."""
    data = apply_overrides(dict(data), list(overrides or []))
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(explain(e)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config, apply `--set` overrides, validate."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist; pass the path of a YAML run config (see examples/)")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of fields (models:, dataset:, ...)")
    return build_config(data, overrides)


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML (stored in every checkpoint and the run dir), without secrets.

    Inline tokens are `exclude=True` fields, so no dump of the config carries them; token_file /
    token_env (paths and variable names, not secrets) are kept so a resumed run finds its tokens again.
    """
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
