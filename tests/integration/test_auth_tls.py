"""Auth scopes and TLS / mTLS over real gRPC on 127.0.0.1, with certificates made in the test."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from quartet.v1 import common_pb2, generator_pb2_grpc
from services.common.auth import AuthPolicy, bearer_token
from services.common.channel import health_status, open_channel
from services.common.config import ServerConfig
from services.common.server import RunningServer, start_server
from tests.integration.echo_role import ROLE, weight_chunks

WRONG = "wrong-token-that-must-not-be-echoed"


@pytest.fixture(scope="module")
def auth_server() -> Iterator[RunningServer]:
    from tests.conftest import ADMIN_TOKEN, CALL_TOKEN

    srv = start_server(ROLE, server=ServerConfig(token=CALL_TOKEN, admin_token=ADMIN_TOKEN, metrics_port=None))
    yield srv
    srv.stop(grace=0)


def _call(address: str, token: str | None, method: str) -> grpc.StatusCode:
    channel = open_channel(address, token=token)
    stub = generator_pb2_grpc.GeneratorStub(channel)
    try:
        if method == "GetInfo":
            stub.GetInfo(common_pb2.GetInfoRequest(), timeout=5)
        else:  # UpdateWeights: a client stream in the admin scope
            stub.UpdateWeights(iter(weight_chunks(7)), timeout=5)
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        assert WRONG not in (e.details() or "")
        for secret in ("test-call-token", "test-admin-token"):
            assert secret not in (e.details() or "")
        return e.code()
    finally:
        channel.close()


@pytest.mark.parametrize(
    ("who", "method", "expected"),
    [
        ("none", "GetInfo", grpc.StatusCode.UNAUTHENTICATED),
        ("wrong", "GetInfo", grpc.StatusCode.UNAUTHENTICATED),
        ("call", "GetInfo", grpc.StatusCode.OK),
        ("admin", "GetInfo", grpc.StatusCode.OK),
        ("none", "UpdateWeights", grpc.StatusCode.UNAUTHENTICATED),
        ("wrong", "UpdateWeights", grpc.StatusCode.UNAUTHENTICATED),
        ("call", "UpdateWeights", grpc.StatusCode.PERMISSION_DENIED),
        ("admin", "UpdateWeights", grpc.StatusCode.OK),
    ],
)
def test_auth_matrix(auth_server: RunningServer, tokens: dict[str, str], who: str, method: str,
                     expected: grpc.StatusCode, caplog: pytest.LogCaptureFixture) -> None:
    token = {"none": None, "wrong": WRONG, "call": tokens["token"], "admin": tokens["admin_token"]}[who]
    with caplog.at_level(logging.DEBUG):
        assert _call(auth_server.address, token, method) == expected
    for secret in (WRONG, tokens["token"], tokens["admin_token"]):
        assert secret not in caplog.text


def test_health_and_reflection_need_no_token(auth_server: RunningServer) -> None:
    channel = open_channel(auth_server.address)
    assert health_status(channel) == "SERVING"
    assert health_status(channel, "quartet.v1.Generator") == "SERVING"
    channel.close()


def test_token_without_bearer_prefix_is_rejected(auth_server: RunningServer, tokens: dict[str, str]) -> None:
    channel = grpc.insecure_channel(auth_server.address)
    stub = generator_pb2_grpc.GeneratorStub(channel)
    with pytest.raises(grpc.RpcError) as err:
        stub.GetInfo(common_pb2.GetInfoRequest(), metadata=[("authorization", tokens["token"])], timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert stub.GetInfo(common_pb2.GetInfoRequest(), metadata=[("authorization", f"bearer {tokens['token']}")],
                        timeout=5).backend == "echo"
    channel.close()


@pytest.mark.parametrize(
    ("token", "admin", "presented", "method", "expected"),
    [
        (None, None, None, "UpdateWeights", None),                        # auth off
        ("c", None, "c", "UpdateWeights", None),                          # one token covers both scopes
        ("c", None, None, "UpdateWeights", grpc.StatusCode.UNAUTHENTICATED),
        (None, "a", None, "Generate", None),                              # only state changes protected
        (None, "a", None, "UpdateWeights", grpc.StatusCode.UNAUTHENTICATED),
        (None, "a", "a", "UpdateWeights", None),
        ("c", "a", "a", "Generate", None),                                # admin token works everywhere
        ("c", "a", "c", "UpdateWeights", grpc.StatusCode.PERMISSION_DENIED),
        ("c", "a", "cc", "Generate", grpc.StatusCode.UNAUTHENTICATED),    # prefix/length mismatch
        ("c", "a", "", "Generate", grpc.StatusCode.UNAUTHENTICATED),
    ],
)
def test_auth_policy_modes(token: str | None, admin: str | None, presented: str | None, method: str,
                           expected: grpc.StatusCode | None) -> None:
    policy = AuthPolicy(token, admin, frozenset({"UpdateWeights"}))
    rejection = policy.check(f"/quartet.v1.Generator/{method}", presented)
    assert (rejection.code if rejection else None) == expected


def test_bearer_token_parsing() -> None:
    assert bearer_token([("authorization", "Bearer abc")]) == "abc"
    assert bearer_token([("x", "y"), ("authorization", "BEARER  abc ")]) == "abc"
    assert bearer_token([("authorization", "Basic abc")]) is None
    assert bearer_token(()) is None


# ---- TLS ----

@dataclass(frozen=True)
class Pki:
    ca: bytes
    server_cert: Path
    server_key: Path
    client_cert: bytes
    client_key: bytes
    rogue_cert: bytes      # a client certificate signed by a different, untrusted CA
    rogue_key: bytes
    ca_file: Path


def _make_pki_cryptography(tmp: Path) -> Pki:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def cert(cn: str, key, issuer_cn: str, issuer_key, *, ca: bool, sans=()):  # type: ignore[no-untyped-def]
        b = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(name(issuer_cn))
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        return b.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    def key_pem(key) -> bytes:  # type: ignore[no-untyped-def]
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    ca_key, rogue_ca_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    server_key, client_key, rogue_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = cert("quartet-test-ca", ca_key, "quartet-test-ca", ca_key, ca=True)
    sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    (tmp / "server.pem").write_bytes(cert("localhost", server_key, "quartet-test-ca", ca_key, ca=False, sans=sans))
    (tmp / "server.key").write_bytes(key_pem(server_key))
    (tmp / "ca.pem").write_bytes(ca)
    return Pki(
        ca=ca, server_cert=tmp / "server.pem", server_key=tmp / "server.key",
        client_cert=cert("client", client_key, "quartet-test-ca", ca_key, ca=False), client_key=key_pem(client_key),
        rogue_cert=cert("rogue", rogue_key, "rogue-ca", rogue_ca_key, ca=False), rogue_key=key_pem(rogue_key),
        ca_file=tmp / "ca.pem",
    )


def _make_pki_openssl(tmp: Path) -> Pki:
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=tmp)

    def leaf(name: str, ca: str, ext: str) -> None:
        (tmp / f"{name}.ext").write_text(ext)
        run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
            f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
            "-days", "1", "-out", f"{name}.pem", "-extfile", f"{name}.ext")

    for ca in ("ca", "rogue-ca"):
        run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
            f"{ca}.key", "-out", f"{ca}.pem", "-days", "1", "-subj", f"/CN=quartet-test-{ca}")
    leaf("server", "ca", "basicConstraints=CA:FALSE\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n")
    leaf("client", "ca", "basicConstraints=CA:FALSE\n")
    leaf("rogue", "rogue-ca", "basicConstraints=CA:FALSE\n")
    read = lambda f: (tmp / f).read_bytes()  # noqa: E731
    return Pki(ca=read("ca.pem"), server_cert=tmp / "server.pem", server_key=tmp / "server.key",
               client_cert=read("client.pem"), client_key=read("client.key"), rogue_cert=read("rogue.pem"),
               rogue_key=read("rogue.key"), ca_file=tmp / "ca.pem")


@pytest.fixture(scope="module", params=["cryptography", "openssl"])
def pki(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """CA, server and client certificates, made with the cryptography package or the openssl CLI."""
    tmp = tmp_path_factory.mktemp(f"pki-{request.param}")
    if request.param == "cryptography":
        pytest.importorskip("cryptography")
        return _make_pki_cryptography(tmp)
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is not available")
    return _make_pki_openssl(tmp)


def _info(channel: grpc.Channel) -> grpc.StatusCode:
    try:
        generator_pb2_grpc.GeneratorStub(channel).GetInfo(common_pb2.GetInfoRequest(), timeout=5)
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return e.code()
    finally:
        channel.close()


def test_tls_client_succeeds_plaintext_client_fails(pki: Pki) -> None:
    srv = start_server(ROLE, server=ServerConfig(tls_cert=pki.server_cert, tls_key=pki.server_key, metrics_port=None))
    try:
        assert _info(open_channel(srv.address, root_cert=pki.ca)) == grpc.StatusCode.OK
        assert _info(open_channel(f"localhost:{srv.port}", root_cert=pki.ca_file)) == grpc.StatusCode.OK
        assert _info(open_channel(srv.address)) == grpc.StatusCode.UNAVAILABLE
        # A client that does not trust the server's CA refuses the connection.
        assert _info(open_channel(srv.address, root_cert=pki.rogue_cert)) == grpc.StatusCode.UNAVAILABLE
    finally:
        srv.stop(grace=0)


def test_mtls_rejects_clients_without_a_trusted_certificate(pki: Pki, tokens: dict[str, str]) -> None:
    cfg = ServerConfig(tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca_file,
                       token=tokens["token"], metrics_port=None)
    srv = start_server(ROLE, server=cfg)
    try:
        good = open_channel(srv.address, token=tokens["token"], root_cert=pki.ca, client_cert=pki.client_cert,
                            client_key=pki.client_key)
        assert _info(good) == grpc.StatusCode.OK
        assert _info(open_channel(srv.address, token=tokens["token"], root_cert=pki.ca)) == grpc.StatusCode.UNAVAILABLE
        rogue = open_channel(srv.address, token=tokens["token"], root_cert=pki.ca, client_cert=pki.rogue_cert,
                             client_key=pki.rogue_key)
        assert _info(rogue) == grpc.StatusCode.UNAVAILABLE
        # TLS and tokens are independent layers: a trusted certificate without a token is still refused.
        no_token = open_channel(srv.address, root_cert=pki.ca, client_cert=pki.client_cert, client_key=pki.client_key)
        assert _info(no_token) == grpc.StatusCode.UNAUTHENTICATED
    finally:
        srv.stop(grace=0)
