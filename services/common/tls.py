"""TLS for every socket the mesh opens: one place that reads certificates and keys and turns them
into gRPC credentials (servers, the gateway's channels to the stages, ``t2v generate``) and into the
paths uvicorn wants (the gateway's HTTP API).

Why one module: the rules (which settings go together, what a missing file says) must be the same
on every server and client, and a bad setting must stop a process at start with one sentence that
names the flag, never a traceback from deep inside gRPC or OpenSSL. Every file is read and checked
with Python's ``ssl`` module when the settings are loaded (``load_*``), so a key that does not
match its certificate, or a CA file that holds no certificate, is caught then, not at the first
handshake.

Settings (``ServerConfig``): ``tls_cert`` + ``tls_key`` turn TLS on for a server; ``tls_client_ca``
also requires every client to present a certificate signed by that CA (mutual TLS). The gateway's
client side toward the stages: ``stage_tls_ca`` turns TLS on, ``stage_tls_cert`` + ``stage_tls_key``
add its client certificate.
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import grpc


class TlsConfigError(ValueError):
    """The TLS settings cannot work; the message is one sentence that says what to fix."""


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')} (T2V_{name.upper()})"


def _read(path: str, setting: str) -> bytes:
    file = Path(path).expanduser()
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise TlsConfigError(f"cannot read {file} given as {_flag(setting)}: {exc.strerror or exc}") from None
    if b"-----BEGIN" not in data:
        raise TlsConfigError(f"{file} given as {_flag(setting)} is not a PEM file (no '-----BEGIN' line)")
    return data


def _check_pair(cert: str, key: str, cert_setting: str, key_setting: str) -> tuple[bytes, bytes]:
    """Both files read, and the key proven to belong to the certificate (OpenSSL checks it)."""
    if bool(cert) != bool(key):
        given, missing = (cert_setting, key_setting) if cert else (key_setting, cert_setting)
        raise TlsConfigError(f"{_flag(given)} is set but {_flag(missing)} is not; TLS needs the certificate "
                             "and its private key together")
    cert_pem, key_pem = _read(cert, cert_setting), _read(key, key_setting)
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except (ssl.SSLError, ValueError) as exc:
        raise TlsConfigError(f"the key {key} ({_flag(key_setting)}) does not go with the certificate {cert} "
                             f"({_flag(cert_setting)}), or one of them is not valid PEM: {exc}") from None
    return cert_pem, key_pem


def _check_ca(path: str, setting: str) -> bytes:
    data = _read(path, setting)
    try:
        ssl.create_default_context(cafile=path)
    except (ssl.SSLError, ValueError) as exc:
        raise TlsConfigError(f"{path} given as {_flag(setting)} holds no usable CA certificate: {exc}") from None
    return data


@dataclass(frozen=True)
class ServerTls:
    """A server's certificate and key, and the CA its clients' certificates must chain to (mTLS)."""

    cert_file: str
    key_file: str
    client_ca_file: str = ""
    cert: bytes = b""
    key: bytes = b""
    client_ca: bytes = b""

    @property
    def mutual(self) -> bool:
        return bool(self.client_ca)

    def grpc_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.client_ca or None,
                                           require_client_auth=self.mutual)

    def uvicorn_options(self) -> dict[str, object]:
        """The keyword arguments of ``uvicorn.Config`` for the same certificate (and client CA)."""
        options: dict[str, object] = {"ssl_certfile": self.cert_file, "ssl_keyfile": self.key_file}
        if self.mutual:
            options.update(ssl_ca_certs=self.client_ca_file, ssl_cert_reqs=ssl.CERT_REQUIRED)
        return options


def load_server_tls(cert: str, key: str, client_ca: str = "",
                    names: Sequence[str] = ("tls_cert", "tls_key", "tls_client_ca")) -> ServerTls | None:
    """The server side from its settings; None (plaintext) when none is set. ``names`` are the settings'
    names, for the error messages."""
    if not (cert or key or client_ca):
        return None
    if client_ca and not cert:
        raise TlsConfigError(f"{_flag(names[2])} needs {_flag(names[0])} and {_flag(names[1])}: a server "
                             "checks client certificates only over TLS")
    cert_pem, key_pem = _check_pair(cert, key, names[0], names[1])
    ca_pem = _check_ca(client_ca, names[2]) if client_ca else b""
    return ServerTls(cert, key, client_ca, cert_pem, key_pem, ca_pem)


@dataclass(frozen=True)
class ClientTls:
    """What a client trusts (``ca``; empty = the system's roots) and its own certificate, for mTLS."""

    ca: bytes = b""
    cert: bytes = b""
    key: bytes = b""

    def grpc_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca or None, private_key=self.key or None,
                                            certificate_chain=self.cert or None)


def load_client_tls(ca: str, cert: str = "", key: str = "", enabled: bool = False,
                    names: Sequence[str] = ("ca", "cert", "key")) -> ClientTls | None:
    """The client side: TLS when ``ca`` is set (or ``enabled``, trusting the system's roots); a client
    certificate needs TLS to be on. None = plaintext."""
    if not (ca or enabled):
        if cert or key:
            raise TlsConfigError(f"{_flag(names[1] if cert else names[2])} is set but {_flag(names[0])} is not; "
                                 "a client certificate is sent only over TLS, so name the CA that signed the "
                                 "server's certificate")
        return None
    cert_pem, key_pem = _check_pair(cert, key, names[1], names[2]) if (cert or key) else (b"", b"")
    return ClientTls(_check_ca(ca, names[0]) if ca else b"", cert_pem, key_pem)


def channel(target: str, tls: ClientTls | None, options: Sequence[tuple[str, object]] = ()) -> grpc.Channel:
    """A channel to ``target``: over TLS with ``tls``, plaintext without."""
    if tls is None:
        return grpc.insecure_channel(target, options=list(options))
    return grpc.secure_channel(target, tls.grpc_credentials(), options=list(options))


def is_loopback(host: str) -> bool:
    """``host`` (as --host takes it) reaches this machine only: 127.0.0.0/8, ::1 or localhost."""
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_stage_exposure(host: str, mutual_tls: bool, trusted_network: bool, service: str) -> None:
    """A stage answers whoever reaches it, with no key: off loopback it must demand a client certificate
    (mutual TLS), unless the operator says the network itself lets only the gateway in."""
    if is_loopback(host) or mutual_tls or trusted_network:
        return
    raise TlsConfigError(
        f"the {service} stage would listen on {host} without mutual TLS, and anyone who reaches that address "
        "could use it (stages take no API key); set --tls-cert, --tls-key and --tls-client-ca, or listen on "
        "127.0.0.1, or pass --trusted-network (T2V_TRUSTED_NETWORK=true) where a NetworkPolicy or firewall "
        "lets only the gateway in")
