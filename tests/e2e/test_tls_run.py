"""End to end over TLS and mutual TLS: a 2-step GRPO run through the embedded stack with
`services.local_options.tls`, certificates made in the test (a CA, a server certificate for
127.0.0.1 / localhost, a client certificate).

Every child serves TLS (the launcher's own ready checks included), the session's clients trust the
CA and, for mTLS, present the client certificate; a plaintext client, and under mTLS a TLS client
without a certificate, is refused by the running stack.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import yaml

from services.common.channel import open_channel
from tests.e2e.test_run import e2e_config, task  # noqa: F401 (task is a fixture used by name)
from tests.integration.test_auth_tls import Pki, _info, _make_pki_cryptography


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    pytest.importorskip("cryptography")
    tmp = tmp_path_factory.mktemp("pki")
    made = _make_pki_cryptography(tmp)
    (tmp / "client.pem").write_bytes(made.client_cert)
    (tmp / "client.key").write_bytes(made.client_key)
    return made


def _get_info(address: str, token: str, **tls: object) -> grpc.StatusCode:
    return _info(open_channel(address, token=token, **tls))  # type: ignore[arg-type]


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mtls"])
def test_grpo_run_over_tls(mutual: bool, pki: Pki, tiny_checkpoint: Path, task: dict[str, Path],  # noqa: F811
                           tmp_path: Path) -> None:
    from orchestrator.run.session import Session

    tls = {"cert": str(pki.server_cert), "key": str(pki.server_key), "ca": str(pki.ca_file)}
    if mutual:
        tls |= {"client_cert": str(pki.ca_file.parent / "client.pem"), "client_key": str(pki.ca_file.parent / "client.key")}
    sets = [f"services.local_options.tls.{k}={v}" for k, v in tls.items()]
    cfg = e2e_config("grpo", tiny_checkpoint, task, tmp_path / "run", "steps=2", *sets)
    with Session(cfg) as session:
        gen = session.stack.services["generator"]
        results = session.orchestrator.run()
        assert _get_info(gen.address, gen.token) == grpc.StatusCode.UNAVAILABLE  # plaintext: no handshake
        with_ca = {"root_cert": pki.ca}
        client = {"client_cert": pki.client_cert, "client_key": pki.client_key}
        if mutual:
            assert _get_info(gen.address, gen.token, **with_ca) == grpc.StatusCode.UNAVAILABLE  # no client cert
            rogue = {"client_cert": pki.rogue_cert, "client_key": pki.rogue_key}
            assert _get_info(gen.address, gen.token, **with_ca, **rogue) == grpc.StatusCode.UNAVAILABLE
            assert _get_info(gen.address, gen.token, **with_ca, **client) == grpc.StatusCode.OK
        else:
            assert _get_info(gen.address, gen.token, **with_ca) == grpc.StatusCode.OK
        services = session.stack.dir
    assert [r.step for r in results] == [1, 2]
    for label in ("generator", "reward", "reference"):
        server = yaml.safe_load((services / f"{label}.yaml").read_text())["server"]
        assert server["tls_cert"] == str(pki.server_cert)
        assert server.get("tls_client_ca") == (str(pki.ca_file) if mutual else None)
        assert "(tls=on" in (services / f"{label}.log").read_text()


def test_tls_config_errors_name_the_field(pki: Pki, tiny_checkpoint: Path, task: dict[str, Path],  # noqa: F811
                                          tmp_path: Path) -> None:
    from orchestrator.run.config import ConfigError

    base = [f"services.local_options.tls.cert={pki.server_cert}", f"services.local_options.tls.key={pki.server_key}"]
    cases = {
        "tls.ca: file '/nonexistent/ca.pem' does not exist": ["services.local_options.tls.ca=/nonexistent/ca.pem"],
        "client_cert and client_key go together": [f"services.local_options.tls.ca={pki.ca_file}",
                                                   f"services.local_options.tls.client_cert={pki.ca_file}"],
        "services.local_options.tls.ca: required field is missing": [],
    }
    for message, extra in cases.items():
        with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
            e2e_config("grpo", tiny_checkpoint, task, tmp_path / "run", *base, *extra)


def test_endpoint_client_certificate_settings_name_what_to_change() -> None:
    from pydantic import ValidationError

    from orchestrator.run.config import Endpoint

    with pytest.raises(ValidationError, match="tls_client_cert needs tls_ca"):
        Endpoint(address="h:1", tls_client_cert="c.pem", tls_client_key="c.key")
    with pytest.raises(ValidationError, match="tls_client_cert and tls_client_key go together"):
        Endpoint(address="h:1", tls_ca="ca.pem", tls_client_cert="c.pem")
    assert Endpoint(address="h:1", tls_ca="ca.pem", tls_client_cert="c.pem", tls_client_key="c.key").tls_client_key
