"""The `services:` section of the run config: endpoints, local services, deadlines, retries, TLS.

Part of the run config (orchestrator.run.config), in its own file to keep both short. Every field
carries its own description (docs/config-reference.md is generated from them).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from services.common.settings import ConfigError


class Strict(BaseModel):
    """A config section that rejects unknown keys (the error names the closest valid one)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class Endpoint(Strict):
    """Where a running service listens, and how to reach it.

    Tokens are secrets: they come inline, from a file (`token_file`) or from an environment variable
    (`token_env`), are never written by `dump_config` (run dir, checkpoints) and print as `**********`.
    """

    # Assignments are validated so a token set after loading (docker/entrypoint.py) is still a SecretStr.
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), validate_assignment=True)

    address: str | list[str] = Field(
        ..., description="host:port of the service, e.g. 127.0.0.1:50051; or a list of host:port, the replicas of "
        "this role (generator, reward, reference: batches are split across them, a failed replica is taken out "
        "and its share redone on the others); or, with discovery: dns, one name:port that resolves to every replica.",
    )
    discovery: Literal["static", "dns"] = Field(
        "static", description="'static': address is the replica list. 'dns': address is one name:port whose every "
        "A/AAAA record is a replica (a Kubernetes headless Service), looked up at start and again every "
        "services.replica_probe_interval_s, so replicas that come and go are followed.",
    )
    tls_server_name: str | None = Field(
        None, description="Name the server certificate must carry, when it is not the host of the address "
        "(default with discovery: dns and tls_ca: the DNS name, since replicas are dialled by IP).",
    )
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
    def _replicas(self) -> Endpoint:
        addresses = self.replica_addresses()
        if not addresses or any(not a.strip() for a in addresses):
            raise ValueError(f"address {self.address!r}: give host:port, or a non-empty list of host:port")
        if len(set(addresses)) != len(addresses):
            dup = next(a for a in addresses if addresses.count(a) > 1)
            raise ValueError(f"address lists {dup} twice: each replica once")
        if self.discovery == "dns":
            host, _, port = addresses[0].rpartition(":")
            if len(addresses) != 1 or not host or not port.isdigit():
                raise ValueError(f"discovery: dns needs one name:port in address (e.g. quartet-generator-replicas:50051), "
                                 f"got {self.address!r}")
        return self

    def replica_addresses(self) -> list[str]:
        """The configured address(es) as a list (with discovery: dns, the one name to resolve)."""
        return [self.address] if isinstance(self.address, str) else list(self.address)

    @property
    def replicated(self) -> bool:
        """True when this endpoint names a replica set (several addresses, or a DNS name)."""
        return self.discovery == "dns" or len(self.replica_addresses()) > 1

    def for_replica(self, address: str) -> Endpoint:
        """This endpoint's settings (tokens, TLS) for one replica's address."""
        server_name = self.tls_server_name
        if server_name is None and self.discovery == "dns" and self.tls_ca:
            server_name = self.replica_addresses()[0].rpartition(":")[0]
        return self.model_copy(update={"address": address, "discovery": "static", "tls_server_name": server_name})

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


class GeneratorEndpoint(Endpoint):
    """The generator's endpoint, and how new weights reach it."""

    weights_transport: Literal["auto", "grpc", "shm"] = Field(
        "auto", description="How weights are sent after every update. 'auto': through shared memory when the "
        "generator's address is on this host (loopback, localhost, this host's name or a unix socket) and a probe "
        "shows it can open this process's segment (same host, same user, same process namespace), else the gRPC "
        "stream; a refusal is logged once and the stream is used from then on. 'grpc': always the UpdateWeights "
        "chunk stream (the cross-host path). 'shm': always shared memory, failing the update instead of falling back.",
    )


class RewardEndpoint(Endpoint):
    """A reward service and the weight of its score in the total reward."""

    weight: float = Field(1.0, description="Weight of this service's reward in the weighted sum over reward services.")
    name: str | None = Field(
        None, description="Name of this reward in the step log (reward_services, reward_components) and Prometheus "
        "(the identity label); default: the identity the service reports (e.g. rule:math). Give two services of "
        "the same kind different names, or their entries merge.")


class LocalTls(Strict):
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


class LocalReward(Strict):
    """One of several local reward services: its own process, options, name and weight (each swappable alone)."""

    name: str = Field(..., pattern=r"^[a-z0-9][a-z0-9_-]{0,39}$", description="Name of the reward in the step log "
                      "(reward_components), Prometheus (identity label) and its log file services/reward-NAME.log.")
    weight: float = Field(1.0, description="Weight of its reward in the weighted sum over the rewards.")
    options: dict[str, Any] = Field(..., description="The reward role's Options (e.g. kind: rule, rule: math).")


class LocalServices(Strict):
    """Options of the services that `local: true` starts as child processes."""

    reward: dict[str, Any] = Field(
        default_factory=lambda: {"kind": "rule", "rule": "arithmetic"},
        description="Options of the local reward service (the reward role's Options, e.g. kind: rule, rule: arithmetic).",
    )
    rewards: list[LocalReward] = Field(
        default_factory=list, description="Several local reward services combined with weights, instead of reward: "
        "e.g. [{name: correct, weight: 1, options: {kind: rule, rule: math}}, {name: format, weight: 0.2, options: "
        "{kind: rule, rule: final_answer}}]. The total reward is the weighted sum; each one's mean is logged.",
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
    def _rewards(self) -> LocalServices:
        if self.rewards and "reward" in self.model_fields_set:
            raise ValueError("local_options has both reward and rewards: keep rewards (several, with names and "
                             "weights) or reward (one), not both")
        names = [r.name for r in self.rewards]
        if len(set(names)) != len(names):
            raise ValueError(f"local_options.rewards names {names} repeat: give each reward its own name")
        if self.rewards and sum(r.weight for r in self.rewards) == 0:
            raise ValueError("local_options.rewards weights sum to 0: give at least one reward a non-zero weight")
        return self

    def reward_services(self) -> list[LocalReward]:
        """The local reward services: rewards, or the one reward (unnamed: its identity names it) with weight 1."""
        return list(self.rewards) or [LocalReward.model_construct(name="", weight=1.0, options=self.reward)]

    @model_validator(mode="after")
    def _restart_order(self) -> LocalServices:
        if self.restart_backoff_max_s < self.restart_backoff_s:
            raise ValueError(
                f"restart_backoff_max_s={self.restart_backoff_max_s} is below restart_backoff_s={self.restart_backoff_s}: "
                "raise restart_backoff_max_s or lower restart_backoff_s"
            )
        return self


class Deadlines(Strict):
    """Per-call deadlines in seconds."""

    generate_s: float = Field(120.0, gt=0, description="Generator.Generate deadline.")
    score_s: float = Field(60.0, gt=0, description="Reward.Score deadline.")
    logprobs_s: float = Field(60.0, gt=0, description="Reference.LogProbs deadline.")
    values_s: float = Field(60.0, gt=0, description="Value.Values deadline.")
    train_step_s: float = Field(300.0, gt=0, description="Value.TrainStep deadline.")
    weights_s: float = Field(300.0, gt=0, description="Generator.UpdateWeights deadline (the whole stream).")
    checkpoint_s: float = Field(300.0, gt=0, description="Value.Save / Value.Load deadline.")
    info_s: float = Field(10.0, gt=0, description="GetInfo deadline.")


class RetryConfig(Strict):
    """Retries of calls that failed with UNAVAILABLE / DEADLINE_EXCEEDED / RESOURCE_EXHAUSTED / CANCELLED (a stopping server)."""

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


class ServicesConfig(Strict):
    """The four roles: endpoints of running services, or `local: true` to start them here."""

    local: bool = Field(False, description="Start all services as child processes on free loopback ports with fresh tokens.")
    generator: GeneratorEndpoint | None = Field(None, description="Generator endpoint (required unless local).")
    reference: Endpoint | None = Field(None, description="Reference endpoint (required unless local, when the KL coefficient > 0).")
    value: Endpoint | None = Field(None, description="Value endpoint (required unless local, when the advantage is gae).")
    rewards: list[RewardEndpoint] = Field(default_factory=list, description="Reward endpoints; the reward is their weighted sum.")
    local_options: LocalServices = Field(default_factory=LocalServices, description="Options of the local services.")
    deadlines: Deadlines = Field(default_factory=Deadlines, description="Per-call deadlines.")
    replica_probe_interval_s: float = Field(
        5.0, gt=0, description="How often (seconds, at most) replicas taken out after a failure are asked GetInfo "
        "again and DNS names (discovery: dns) looked up again; a reward or reference replica that answers is "
        "re-admitted, a generator replica once it serves the current weights (pushed at the next update).",
    )
    retry: RetryConfig = Field(
        default_factory=RetryConfig,
        description="Retries with exponential backoff and full jitter: idempotent calls (Generate with its seed, Score, "
        "LogProbs, Values, GetInfo), TrainStep with its step id, UpdateWeights as a whole stream with its version.",
    )

    @model_validator(mode="after")
    def _single_value(self) -> ServicesConfig:
        if self.value is not None and self.value.replicated:
            raise ValueError(
                f"value: {self.value.address!r} names several replicas, but the value role takes one address: its "
                "critic trains on every TrainStep and must stay one writer (replicas would each train on part of the "
                "data and drift apart). Give the address of one value service; scale the generator, reward and "
                "reference roles instead")
        return self
