"""TLS on both network doors: a CA, a server and a client certificate made at run time; real
clients (ADBC, pyarrow.flight, httpx, the MCP SDK) connect with the CA, plain text is refused, and with
mutual TLS a client without a certificate is refused."""
from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import ssl
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import adbc_driver_flightsql.dbapi as flightsql
import anyio
import httpx
import httpx2
import pyarrow.flight as flight
import pytest
from adbc_driver_flightsql import DatabaseOptions
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client

from conftest import REPO, serving
from flight.cli import warn_plain_text_beyond_loopback
from flight.flightsql.server import pack
from flight.flightsql.proto import flight_sql_pb2 as sql_pb
from flightdeck.runtime_config import RuntimeConfig

QUERY = "SELECT sum(x) AS total FROM numbers"


@dataclass
class Pki:
    """PEM files of a test CA, a server certificate for localhost and 127.0.0.1, and a client's."""
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def pem(self, name: str) -> bytes:
        return getattr(self, name).read_bytes()

    def text(self, name: str) -> str:
        return getattr(self, name).read_text()


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _certificate(subject: str, key, issuer: x509.Name | None, issuer_key, *, ca: bool = False,
                 usage: x509.ObjectIdentifier | None = None) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
            decipher_only=False), critical=True)
        builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    else:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    if usage == ExtendedKeyUsageOID.SERVER_AUTH:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(folder: Path, name: str, certificate: x509.Certificate, key) -> tuple[Path, Path]:
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca_key = _key()
    ca = _certificate("flightdeck test CA", ca_key, None, ca_key, ca=True)
    ca_path, _ = _write(folder, "ca", ca, ca_key)
    server_key, client_key = _key(), _key()
    server_cert, server_key_path = _write(folder, "server", _certificate(
        "localhost", server_key, ca.subject, ca_key, usage=ExtendedKeyUsageOID.SERVER_AUTH), server_key)
    client_cert, client_key_path = _write(folder, "client", _certificate(
        "agent-1", client_key, ca.subject, ca_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH), client_key)
    return Pki(ca_path, server_cert, server_key_path, client_cert, client_key_path)


def _config(tmp_path: Path, tls: dict) -> dict:
    (tmp_path / "numbers.csv").write_text("x\n1\n2\n3\n")
    return {"datasets": [{"from": "file:numbers.csv", "name": "numbers"}], "runtime": {"tls": tls}}


@pytest.fixture(scope="module")
def tls_server(pki, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    with serving(_config(folder, {"cert": str(pki.server_cert), "key": str(pki.server_key)}), folder) as running:
        yield running


@pytest.fixture(scope="module")
def mtls_server(pki, tmp_path_factory):
    folder = tmp_path_factory.mktemp("mtls")
    tls = {"cert": str(pki.server_cert), "key": str(pki.server_key), "client_ca": str(pki.ca)}
    with serving(_config(folder, tls), folder) as running:
        yield running


def adbc_total(url: str, **options: str) -> int:
    with flightsql.connect(url, autocommit=True, db_kwargs=options) as conn, conn.cursor() as cursor:
        cursor.execute(QUERY)
        return cursor.fetchone()[0]


def flight_total(client: flight.FlightClient) -> int:
    descriptor = flight.FlightDescriptor.for_command(pack(sql_pb.CommandStatementQuery(query=QUERY)))
    info = client.get_flight_info(descriptor)
    return client.do_get(info.endpoints[0].ticket).read_all().column("total")[0].as_py()


def http_total(url: str, verify: ssl.SSLContext | bool) -> int:
    with httpx.Client(base_url=url, verify=verify, timeout=30) as client:
        response = client.post("/v1/sql", content=QUERY, headers={"Content-Type": "text/plain"})
        response.raise_for_status()
        return response.json()[0]["total"]


def mcp_total(url: str, verify: ssl.SSLContext) -> int:
    """The MCP SDK's client over streamable HTTP at /v1/mcp, calling the sql tool."""
    async def main() -> int:
        async with httpx2.AsyncClient(verify=verify, timeout=30) as http:
            async with Client(streamable_http_client(f"{url}/v1/mcp", http_client=http)) as client:
                result = await client.call_tool("sql", {"query": QUERY})
        assert not result.is_error, result.content[0].text
        return result.structured_content["rows"][0]["total"]
    return anyio.run(main)


def trusting(pki: Pki, with_certificate: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if with_certificate:
        context.load_cert_chain(pki.client_cert, pki.client_key)
    return context


def test_urls_name_tls(tls_server):
    assert tls_server.flight_url.startswith("grpc+tls://")
    assert tls_server.http_url.startswith("https://")


def test_adbc_over_tls_with_the_test_ca(tls_server, pki):
    assert adbc_total(tls_server.flight_url, **{DatabaseOptions.TLS_ROOT_CERTS.value: pki.text("ca")}) == 6


def test_pyarrow_flight_over_tls_with_the_test_ca(tls_server, pki):
    client = flight.FlightClient(tls_server.flight_url, tls_root_certs=pki.pem("ca"))
    try:
        assert flight_total(client) == 6
    finally:
        client.close()


def test_httpx_over_tls_with_the_test_ca(tls_server, pki):
    assert http_total(tls_server.http_url, trusting(pki)) == 6


def test_mcp_client_over_tls_with_the_test_ca(tls_server, pki):
    assert mcp_total(tls_server.http_url, trusting(pki)) == 6


def test_the_command_line_client_with_the_test_ca(tls_server, pki):
    run = subprocess.run([sys.executable, "-m", "flight.cli", "sql", "--url", tls_server.flight_url,
                          "--tls-ca", str(pki.ca), "-e", QUERY, "--format", "json"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == '{"total": 6}'


def test_a_client_that_does_not_trust_the_ca_is_refused(tls_server):
    with pytest.raises(flightsql.OperationalError, match="certificate signed by unknown authority"):
        adbc_total(tls_server.flight_url)
    with pytest.raises(httpx.ConnectError, match="(?i)certificate"):
        http_total(tls_server.http_url, True)


def test_plain_text_is_refused_when_tls_is_on(tls_server, pki):
    plain_flight = tls_server.flight_url.replace("grpc+tls://", "grpc://")
    with pytest.raises(flightsql.OperationalError, match="Unavailable"):
        adbc_total(plain_flight)
    client = flight.FlightClient(plain_flight)
    try:
        with pytest.raises(flight.FlightUnavailableError):
            flight_total(client)
    finally:
        client.close()
    with pytest.raises(httpx.TransportError):
        http_total(tls_server.http_url.replace("https://", "http://"), False)


def test_mutual_tls_accepts_a_client_certificate(mtls_server, pki):
    options = {DatabaseOptions.TLS_ROOT_CERTS.value: pki.text("ca"),
               DatabaseOptions.MTLS_CERT_CHAIN.value: pki.text("client_cert"),
               DatabaseOptions.MTLS_PRIVATE_KEY.value: pki.text("client_key")}
    assert adbc_total(mtls_server.flight_url, **options) == 6
    client = flight.FlightClient(mtls_server.flight_url, tls_root_certs=pki.pem("ca"),
                                 cert_chain=pki.pem("client_cert"), private_key=pki.pem("client_key"))
    try:
        assert flight_total(client) == 6
    finally:
        client.close()
    assert http_total(mtls_server.http_url, trusting(pki, with_certificate=True)) == 6
    assert mcp_total(mtls_server.http_url, trusting(pki, with_certificate=True)) == 6


def test_mutual_tls_refuses_a_client_without_a_certificate(mtls_server, pki):
    with pytest.raises(flightsql.OperationalError, match="Unavailable"):
        adbc_total(mtls_server.flight_url, **{DatabaseOptions.TLS_ROOT_CERTS.value: pki.text("ca")})
    client = flight.FlightClient(mtls_server.flight_url, tls_root_certs=pki.pem("ca"))
    try:
        with pytest.raises(flight.FlightUnavailableError):
            flight_total(client)
    finally:
        client.close()
    with pytest.raises(httpx.TransportError):
        http_total(mtls_server.http_url, trusting(pki))
    with pytest.raises(ExceptionGroup) as refused:  # the SDK's task group carries the transport's error
        mcp_total(mtls_server.http_url, trusting(pki))
    assert refused.group_contains(httpx2.TransportError)


def test_an_unreadable_tls_file_stops_the_start_with_its_setting(tmp_path, pki):
    config = _config(tmp_path, {"cert": "missing.crt", "key": str(pki.server_key)})
    with pytest.raises(ValueError, match=r"runtime\.tls\.cert: cannot read missing\.crt"):
        with serving(config, tmp_path):
            pass


def test_plain_text_beyond_loopback_is_said_out_loud(caplog, pki):
    keyed = {"auth": {"api_keys": ["k"]}, "http": {"host": "0.0.0.0", "port": 8090}}
    with caplog.at_level(logging.WARNING, logger="flightdeck"):
        warn_plain_text_beyond_loopback(RuntimeConfig.model_validate(keyed))
    assert "runtime.http listens on 0.0.0.0 without TLS" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flightdeck"):
        warn_plain_text_beyond_loopback(RuntimeConfig.model_validate(
            {**keyed, "tls": {"cert": str(pki.server_cert), "key": str(pki.server_key)}}))
    assert caplog.text == ""
