"""A throwaway certificate authority for the TLS tests, made at run time with ``cryptography``.

Why made here and not checked in: a private key in the repository would be a key anyone may use, and
certificates expire; these live for one test session in a temporary folder. EC P-256 keys are quick to
make (milliseconds), so every session gets fresh ones.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_DAY = datetime.timedelta(days=1)


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, as PEM files."""

    cert: str
    key: str


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> str:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return str(path)


class CertificateAuthority:
    """A self-signed CA in ``folder`` (``<name>-ca.pem``) that issues server and client certificates."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder, self.name = folder, name
        folder.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        self._cert = (x509.CertificateBuilder().subject_name(_name(f"{name} test CA")).issuer_name(_name(f"{name} test CA"))
                      .public_key(self._key.public_key()).serial_number(x509.random_serial_number())
                      .not_valid_before(now - _DAY).not_valid_after(now + _DAY)
                      .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                      .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                   content_commitment=False, key_encipherment=False,
                                                   data_encipherment=False, key_agreement=False,
                                                   encipher_only=False, decipher_only=False), critical=True)
                      .sign(self._key, hashes.SHA256()))
        self.ca_file = str(folder / f"{name}-ca.pem")
        Path(self.ca_file).write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, common_name: str, server: bool = True, client: bool = False,
              hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> Issued:
        """A leaf certificate for ``hosts`` (IP or DNS names), usable as a server's and/or a client's."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + ([ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])
        cert = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(self._cert.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - _DAY).not_valid_after(now + _DAY)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.SubjectAlternativeName(names), critical=False)
                .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
                .sign(self._key, hashes.SHA256()))
        stem = self.folder / f"{self.name}-{common_name}"
        cert_file = Path(f"{stem}.pem")
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return Issued(str(cert_file), _write_key(key, Path(f"{stem}-key.pem")))


@dataclass(frozen=True)
class Pki:
    """Everything the security tests use: the mesh's CA and its certificates, and a stranger's CA."""

    ca: str                  # the mesh's CA (trusted by clients and by the stages)
    gateway: Issued          # the gateway's public server certificate
    stage: Issued            # every stage's server certificate
    gateway_client: Issued   # the gateway's client certificate toward the stages
    rogue_ca: str            # a CA nobody in the mesh trusts
    rogue_client: Issued     # a client certificate from it


def make_pki(folder: Path) -> Pki:
    mesh, rogue = CertificateAuthority(folder, "mesh"), CertificateAuthority(folder, "rogue")
    return Pki(ca=mesh.ca_file, gateway=mesh.issue("gateway"), stage=mesh.issue("stage"),
               gateway_client=mesh.issue("gateway-client", server=False, client=True),
               rogue_ca=rogue.ca_file, rogue_client=rogue.issue("intruder", server=False, client=True))
