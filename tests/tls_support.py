"""Throwaway PKI (a CA, server and client certificates, a second unrelated CA) and nkeys for the TLS tests,
generated once per test session with `cryptography` and `nkeys`; the fixtures are made global in conftest.py."""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

import nkeys
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID




# ---- throwaway PKI and nkeys ---------------------------------------------------------------------------
@dataclass
class Pki:
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    other_ca: str  # an unrelated CA: verifies neither the server nor the client
    other_client_cert: str
    other_client_key: str


def _pem_key(key, path: Path, password: bytes | None = None) -> str:
    enc = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc))
    return str(path)


def _pem_cert(cert, path: Path) -> str:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(path)


def _ca(d: Path, name: str):
    now = datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"marketprism test {name}")])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    _pem_cert(cert, d / f"{name}.pem")
    return key, cert


def _leaf(d: Path, ca_key, ca_cert, name: str, server: bool) -> tuple[str, str]:
    now = datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                     else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    file = name.replace(" ", "-")
    return _pem_cert(builder.sign(ca_key, hashes.SHA256()), d / f"{file}.pem"), _pem_key(key, d / f"{file}.key")


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca_key, ca_cert = _ca(d, "ca")
    other_key, other_cert = _ca(d, "other-ca")
    server = _leaf(d, ca_key, ca_cert, "test server", server=True)
    client = _leaf(d, ca_key, ca_cert, "test client", server=False)
    other_client = _leaf(d, other_key, other_cert, "other client", server=False)
    return Pki(str(d / "ca.pem"), *server, *client, str(d / "other-ca.pem"), *other_client)


@dataclass
class Nkey:
    seed_file: str
    seed: str  # the secret: must never reach an output
    public: str
    wrong_seed_file: str  # a valid user seed the server does not know


@pytest.fixture(scope="session")
def nkey(tmp_path_factory) -> Nkey:
    d = tmp_path_factory.mktemp("nkeys")
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    (d / "user.nk").write_bytes(seed + b"\n")
    (d / "wrong.nk").write_bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER))
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    return Nkey(str(d / "user.nk"), seed.decode(), public, str(d / "wrong.nk"))
