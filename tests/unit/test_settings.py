"""The one config loader (services.common.settings) as services and runs use it: layers, --set, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict, Field

import orchestrator.run.config as run_config
import services.common.config as service_config
from orchestrator.run.config import build_config, load_config
from services.common.config import ENV, ServerConfig, load_service_config
from services.common.settings import ConfigError, apply_sets, env_layer, load, parse_set, read_yaml


class Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")

    depth: int = Field(1, ge=0)
    width: int = 2


class Outer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    a: str = "default"
    b: str = "default"
    c: str = "default"
    d: str = "default"
    e: str = "default"
    inner: Inner = Field(default_factory=Inner)
    items: list[Inner] = Field(default_factory=list)


def test_each_layer_beats_the_ones_below(tmp_path: Path) -> None:
    # a: default only; b: file; c: file < env; d: env < flag; e: flag < --set.
    path = tmp_path / "c.yaml"
    path.write_text("b: file\nc: file\nd: file\ne: file\n")
    env = {"X_C": "c", "X_D": "d", "X_E": "e"}
    environ = {"X_C": "env", "X_D": "env", "X_E": "env"}
    cfg = load(Outer, file=path, env=env, environ=environ, flags={"d": "flag", "e": "flag", "a": None},
               sets=["e=set"])
    assert (cfg.a, cfg.b, cfg.c, cfg.d, cfg.e) == ("default", "file", "env", "flag", "set")


def test_a_layer_merges_into_sections_instead_of_replacing_them() -> None:
    cfg = load(Outer, data={"inner": {"depth": 5, "width": 7}}, flags={"inner.depth": 6})
    assert cfg.inner == Inner(depth=6, width=7)


def test_no_environment_is_read_without_a_table() -> None:
    assert load(Outer, environ={"A": "env"}).a == "default"
    assert load(Outer, env={"A": "a"}).a == "default"  # a table but no environ


def test_load_does_not_change_the_callers_data() -> None:
    data = {"items": [{"depth": 1}]}
    assert load(Outer, data=data, sets=["items.0.depth=3"]).items[0].depth == 3
    assert data == {"items": [{"depth": 1}]}


# ---- --set ----------------------------------------------------------------------------------------

def test_set_values_are_yaml() -> None:
    assert parse_set(["a.b=5000", "a.c=true", "d=[1, 2]", "e=null", "f=word", "g=", "h=0.5", "i='007'"]) == {
        "a": {"b": 5000, "c": True}, "d": [1, 2], "e": None, "f": "word", "g": "", "h": 0.5, "i": "007"}


def test_set_indexes_lists_and_replaces_scalars_with_sections() -> None:
    data = {"items": [{"depth": 1}, {"depth": 2}], "a": "x"}
    apply_sets(data, ["items.1.width=9", "a.b=1"])
    assert data == {"items": [{"depth": 1}, {"depth": 2, "width": 9}], "a": {"b": 1}}


@pytest.mark.parametrize(("item", "message"), [
    ("noequals", "expected key=value with a dotted key"),
    (".a=1", "expected key=value"),
    ("a..b=1", "expected key=value"),
    ("items.5.depth=1", "items has only 1 items"),
    ("items.depth=1", "items is a list; index it, e.g. items.0.depth"),
    ("a=[1,", "the value is not valid YAML"),
])
def test_malformed_set_says_how(item: str, message: str) -> None:
    with pytest.raises(ConfigError, match=r"^--set ") as e:
        apply_sets({"items": [{}]}, [item])
    assert message in str(e.value)


# ---- environment ----------------------------------------------------------------------------------

def test_env_layer_reads_only_set_non_empty_variables() -> None:
    table = {"X_PORT": "server.port", "X_HOST": "server.host", "X_TOKEN": "server.token"}
    assert env_layer(table, {"X_PORT": "5000", "X_HOST": "", "OTHER": "1"}) == {"server": {"port": "5000"}}


def test_service_environment_names_are_the_documented_ones() -> None:
    # Used by docker/compose.yaml, scripts/container_test.sh and the README; renaming one breaks a deployment.
    expected = {
        "QUARTET_MODEL": "model.path", "QUARTET_DTYPE": "model.dtype", "QUARTET_DEVICE": "model.device",
        "QUARTET_HOST": "server.host", "QUARTET_PORT": "server.port", "QUARTET_METRICS_PORT": "server.metrics_port",
        "QUARTET_MAX_MESSAGE_BYTES": "server.max_message_bytes", "QUARTET_TOKEN": "server.token",
        "QUARTET_TOKEN_FILE": "server.token_file", "QUARTET_ADMIN_TOKEN": "server.admin_token",
        "QUARTET_ADMIN_TOKEN_FILE": "server.admin_token_file", "QUARTET_TLS_CERT": "server.tls_cert",
        "QUARTET_TLS_KEY": "server.tls_key", "QUARTET_TLS_CLIENT_CA": "server.tls_client_ca",
        "QUARTET_WORKERS": "server.workers", "QUARTET_GRACE": "server.grace_seconds",
        "QUARTET_READY_FILE": "ready_file", "QUARTET_CHECKPOINT_DIR": "checkpoint_dir",
    }
    assert expected.items() <= ENV.items()
    assert {f"server.{name}" for name in ServerConfig.model_fields} <= set(ENV.values())


def test_service_layers(tmp_path: Path) -> None:
    path = tmp_path / "svc.yaml"
    path.write_text("role: reward\nmodel: {path: file, device: cpu}\nserver: {port: 1, grace_seconds: 5, workers: 3}\n"
                    "options: {kind: rule}\n")
    environ = {"QUARTET_MODEL": "env", "QUARTET_PORT": "2", "QUARTET_GRACE": "6", "QUARTET_METRICS_PORT": "-1",
               "QUARTET_TOKEN": ""}
    cfg = load_service_config(file=path, environ=environ, flags={"server.grace_seconds": 7, "server.port": 3},
                              sets=["server.port=4", "options.rule=math"])
    assert cfg.role == "reward" and cfg.model.device == "cpu" and cfg.server.workers == 3  # file
    assert cfg.model.path == "env" and cfg.server.metrics_port is None                     # env (-1: off)
    assert cfg.server.grace_seconds == 7                                                   # flag
    assert cfg.server.port == 4                                                            # --set
    assert cfg.server.host == "127.0.0.1" and cfg.server.token is None                     # defaults
    assert cfg.options == {"kind": "rule", "rule": "math"}


def test_service_env_values_are_validated_like_any_other() -> None:
    with pytest.raises(ConfigError, match=r"^server\.port: Input should be a valid integer.*\(got 'http'\)"):
        load_service_config(environ={"QUARTET_PORT": "http"})


def test_run_layers_file_then_set_and_no_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("models: {policy: ckpt}\ndataset: {path: d.jsonl}\nservices: {local: true}\nsteps: 5\nseed: 2\n")
    for var in ("QUARTET_STEPS", "QUARTET_SEED", "QUARTET_PORT", "QUARTET_METRICS_PORT"):
        monkeypatch.setenv(var, "9")  # the run config reads no variables (endpoints name theirs: token_env)
    cfg = load_config(path, ["steps=3"])
    assert (cfg.steps, cfg.seed, cfg.prompts_per_step, cfg.metrics_port) == (3, 2, 8, 0)


# ---- errors ---------------------------------------------------------------------------------------

def test_one_config_error_class() -> None:
    assert run_config.ConfigError is service_config.ConfigError is ConfigError


def test_unknown_key_names_the_path_and_suggests_the_closest_field() -> None:
    with pytest.raises(ConfigError) as e:
        load_service_config(sets=["server.metrics_prot=1"])
    assert str(e.value).startswith("server.metrics_prot: unknown field; did you mean 'metrics_port'? Valid fields "
                                   "here: admin_token, admin_token_file,")
    with pytest.raises(ConfigError) as e:
        build_config({"models": {"policy": "p"}, "dataset": {"path": "d"},
                      "services": {"generator": {"address": "h:1"}, "rewards": [{"address": "h:2", "wieght": 2}]}})
    assert "services.rewards.0.wieght: unknown field; did you mean 'weight'?" in str(e.value)
    with pytest.raises(ConfigError, match=r"^zzz: unknown field\. Valid fields here: a, b, .* Remove or rename it\.$"):
        load(Outer, data={"zzz": 1})


def test_every_problem_gets_its_own_line_naming_its_field() -> None:
    with pytest.raises(ConfigError) as e:
        load(Outer, data={"inner": {"depth": -1}, "items": [{"width": "w"}]})
    assert str(e.value).splitlines() == [
        "inner.depth: Input should be greater than or equal to 0 (got -1)",
        "items.0.width: Input should be a valid integer, unable to parse string as an integer (got 'w')",
    ]


def test_a_model_validator_naming_its_field_is_reported_at_that_field() -> None:
    with pytest.raises(ConfigError, match=r"^server\.token_file: cannot read '/nonexistent/t'"):
        load_service_config(flags={"server.token_file": "/nonexistent/t"})
    with pytest.raises(ConfigError, match=r"^server: tls_cert and tls_key must be given together$"):
        load_service_config(flags={"server.tls_cert": "c.pem"})


def test_secrets_are_not_echoed_in_errors() -> None:
    with pytest.raises(ConfigError) as e:
        load_service_config(sets=["server.token=[s3cret]"])
    assert "server.token: Input should be a valid string" in str(e.value) and "s3cret" not in str(e.value)


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^run config file '.*nope.yaml' does not exist"):
        read_yaml(tmp_path / "nope.yaml", what="run config")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_service_config(file=bad)
    (tmp_path / "empty.yaml").write_text("")
    assert load_service_config(file=tmp_path / "empty.yaml").role is None
