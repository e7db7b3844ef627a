"""A local certificate authority for the rehearsal's mTLS, made at start-up.

Istio's CA (istiod) signs each workload a short-lived certificate whose only subject
alternative name is its SPIFFE identity `spiffe://<trust domain>/ns/<namespace>/sa/<service
account>`; sidecars trust the mesh root and check the peer's SPIFFE URI. This CA does the same
for the local Envoys: one EC P-256 root per mesh, one leaf per service account, written as PEM
files under a directory only this user can read.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TRUST_DOMAIN = "cluster.local"
VALIDITY = datetime.timedelta(days=1)


def spiffe_id(namespace: str, service_account: str, trust_domain: str = TRUST_DOMAIN) -> str:
    """The SPIFFE identity Istio gives a workload running as `service_account`."""
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


@dataclass(frozen=True)
class Identity:
    """A workload's certificate and key (PEM files) and its SPIFFE id."""

    spiffe: str
    cert: Path
    key: Path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class LocalCA:
    """Root certificate at `root_cert`; `identity()` issues leaves signed by it."""

    def __init__(self, directory: Path, now: datetime.datetime):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o700)
        self._now = now
        self._key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "llmmesh local mesh CA")])
        self._name = name
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self._key, hashes.SHA256())
        )
        self.root_cert = directory / "root-cert.pem"
        self.root_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self._issued: dict[str, Identity] = {}

    def identity(self, namespace: str, service_account: str) -> Identity:
        """The leaf certificate of `service_account` (issued once per CA): URI SAN = its SPIFFE
        id, usable as TLS server and client."""
        spiffe = spiffe_id(namespace, service_account)
        if spiffe in self._issued:
            return self._issued[spiffe]
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self._name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self._now - datetime.timedelta(minutes=5))
            .not_valid_after(self._now + VALIDITY)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe)]),
                critical=True,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        stem = f"{namespace}.{service_account}"
        cert_path = self.directory / f"{stem}.cert.pem"
        key_path = self.directory / f"{stem}.key.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(_pem_key(key))
        key_path.chmod(0o600)
        ident = Identity(spiffe, cert_path, key_path)
        self._issued[spiffe] = ident
        return ident
