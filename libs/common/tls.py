"""TLS material for gRPC: read the PEM files named in the settings and build credentials.

Why a module of its own: a wrong path, a key that does not belong to its
certificate or an expired certificate otherwise surfaces deep inside gRPC's C
core as a handshake failure with no file name in it (or as a port that "could
not bind"). Everything here is checked in Python first, so the process stops at
start-up with a message naming the env var and the file.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes


class TLSConfigError(ValueError):
    """The TLS files named in the configuration cannot be used; the message says which and why."""


def read_pem(path: str, env: str) -> bytes:
    """The bytes of a PEM file, or a TLSConfigError naming ``env`` and the file."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TLSConfigError(f"{env}={path}: cannot read: {exc.strerror or exc}") from exc
    if b"-----BEGIN " not in data:
        raise TLSConfigError(f"{env}={path}: not a PEM file (no -----BEGIN line)")
    return data


def load_certificates(pem: bytes, env: str, path: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise TLSConfigError(f"{env}={path}: no valid PEM certificate: {exc}") from exc
    return certs


def _load_key(pem: bytes, env: str, path: str) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise TLSConfigError(f"{env}={path}: not an unencrypted PEM private key: {exc}") from exc


def _public_der(cert_or_key: x509.Certificate | PrivateKeyTypes) -> bytes:
    public = cert_or_key.public_key()
    return public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass(frozen=True)
class KeyPair:
    """A certificate chain and its private key, checked to belong together and to be in date."""

    cert_pem: bytes
    key_pem: bytes
    leaf: x509.Certificate

    @classmethod
    def load(cls, cert_file: str, key_file: str) -> KeyPair:
        cert_pem = read_pem(cert_file, "STYLEREC_TLS_CERT_FILE")
        key_pem = read_pem(key_file, "STYLEREC_TLS_KEY_FILE")
        leaf = load_certificates(cert_pem, "STYLEREC_TLS_CERT_FILE", cert_file)[0]
        key = _load_key(key_pem, "STYLEREC_TLS_KEY_FILE", key_file)
        if _public_der(leaf) != _public_der(key):
            raise TLSConfigError(
                f"STYLEREC_TLS_KEY_FILE={key_file} is not the private key of STYLEREC_TLS_CERT_FILE={cert_file}"
            )
        now = datetime.datetime.now(datetime.UTC)
        if leaf.not_valid_after_utc < now:
            raise TLSConfigError(
                f"STYLEREC_TLS_CERT_FILE={cert_file}: certificate expired at {leaf.not_valid_after_utc.isoformat()}"
            )
        if leaf.not_valid_before_utc > now:
            raise TLSConfigError(
                f"STYLEREC_TLS_CERT_FILE={cert_file}: certificate not valid before "
                f"{leaf.not_valid_before_utc.isoformat()}"
            )
        return cls(cert_pem, key_pem, leaf)

    def names(self) -> list[str]:
        """DNS names and IP addresses of the certificate's subjectAltName, in order."""
        try:
            san = self.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return []
        out: list[str] = list(san.get_values_for_type(x509.DNSName))
        out += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
        return out


def read_ca(ca_file: str) -> bytes:
    pem = read_pem(ca_file, "STYLEREC_TLS_CA_FILE")
    load_certificates(pem, "STYLEREC_TLS_CA_FILE", ca_file)
    return pem


def server_credentials(
    cert_file: str, key_file: str, ca_file: str = "", require_client_auth: bool = False
) -> grpc.ServerCredentials:
    """Credentials for ``add_secure_port``; with ``require_client_auth`` only clients whose cert
    chains to ``ca_file`` complete the handshake (mTLS)."""
    pair = KeyPair.load(cert_file, key_file)
    if require_client_auth and not ca_file:
        raise TLSConfigError("STYLEREC_TLS_CLIENT_AUTH=true needs STYLEREC_TLS_CA_FILE")
    roots = read_ca(ca_file) if ca_file else None
    return grpc.ssl_server_credentials(
        [(pair.key_pem, pair.cert_pem)], root_certificates=roots, require_client_auth=require_client_auth
    )


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True
