"""TLS for the target listener: a throwaway CA and server certificate, and the
server's ``SSLContext`` from PEM files, with errors that name the file.

The throwaway certificate is made with trustme (imported only when one is made:
``eph listen`` given files of its own never loads it, nor cryptography under it).
Clients verify it with its CA file, e.g. ``ssl.create_default_context(cafile=...)``
or ``curl --cacert``. Never imports locust.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.endpoints import Endpoint
from harness.errors import ListenerError

__all__ = [
    "ThrowawayCert",
    "listener_certificate",
    "make_throwaway_certificate",
    "server_context",
]

# what every throwaway certificate names besides the endpoints: a wildcard endpoint
# (0.0.0.0, ::) is reached over loopback or by the machine's name
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
_WHO = "TLS"  # ListenerError's "endpoint": the files serve every endpoint


@dataclass(frozen=True)
class ThrowawayCert:
    """PEM files of a certificate made for one run."""

    ca_file: Path  # the CA that signed it: what clients verify with
    cert_file: Path  # the server's certificate chain (--tls-cert)
    key_file: Path  # its private key, mode 0600 (--tls-key)


def make_throwaway_certificate(directory: Path, hosts: Sequence[str]) -> ThrowawayCert:
    """A new CA, and a server certificate it signed for ``hosts`` (names and IP
    addresses alike), written under ``directory`` as ``ca.pem``, ``server.pem`` and
    ``server.key`` (0600). Each call makes a new CA."""
    import trustme

    names = list(dict.fromkeys(_bare(host) for host in hosts if host))
    if not names:
        raise ValueError("a certificate needs at least one host name or address")
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="eph throwaway CA")
    issued = ca.issue_cert(*names)
    cert = ThrowawayCert(
        ca_file=directory / "ca.pem",
        cert_file=directory / "server.pem",
        key_file=directory / "server.key",
    )
    _write(cert.key_file, issued.private_key_pem.bytes(), mode=0o600)
    _write(cert.cert_file, b"".join(pem.bytes() for pem in issued.cert_chain_pems))
    _write(cert.ca_file, ca.cert_pem.bytes())
    return cert


def listener_certificate(
    run_path: Path, endpoints: Iterable[Endpoint], names: Iterable[str] = ()
) -> ThrowawayCert:
    """The embedded listener's certificate for one run, under ``run_path / "tls"``:
    valid for each endpoint's host, for ``names`` (e.g. ``load.tls.server_name``) and
    for loopback. Pass it to :class:`harness.run.placement.ListenerChild` (``tls=``);
    clients verify with its ``ca_file``."""
    hosts = [*names, *(endpoint.host for endpoint in endpoints), *LOOPBACK_HOSTS]
    return make_throwaway_certificate(run_path / "tls", hosts)


def server_context(cert_file: Path | str, key_file: Path | str) -> ssl.SSLContext:
    """A TLS server context from PEM files: the certificate (chain) and its private key.

    Raises :class:`ListenerError` naming the file when one is missing, unreadable,
    not PEM, or when the key does not belong to the certificate.
    """
    cert_path, key_path = Path(cert_file), Path(key_file)
    _check_pem(cert_path, "certificate", b"CERTIFICATE", "the server's certificate as PEM")
    key = _check_pem(key_path, "private key", b"PRIVATE KEY", "the certificate's key as PEM")
    if b"ENCRYPTED" in key:
        raise ListenerError(
            _WHO, f"private key file {key_path} is encrypted (expected an unencrypted PEM key)"
        )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert_path, key_path)
    except ssl.SSLError as exc:
        raise ListenerError(
            _WHO,
            f"private key file {key_path} does not go with certificate file {cert_path},"
            f" or one of them is damaged ({exc.reason or exc})",
        ) from None
    return context


def _check_pem(path: Path, what: str, marker: bytes, expected: str) -> bytes:
    """The file's bytes, if it holds a PEM ``marker`` block; else a clear ListenerError."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        problem = "does not exist"
    except IsADirectoryError:
        problem = "is a directory"
    except PermissionError:
        problem = "cannot be read (permission denied)"
    except OSError as exc:
        problem = f"cannot be read ({exc.strerror or exc})"
    else:
        if b"-----BEGIN " in data and marker in data:
            return data
        problem = f"holds no PEM {what}"
    raise ListenerError(_WHO, f"{what} file {path} {problem} (expected {expected})")


def _bare(host: str) -> str:
    """``[::1]`` -> ``::1``: certificates name addresses without brackets."""
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` created with ``mode`` (a key is never readable to
    others, not even for a moment)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as out:
        os.fchmod(out.fileno(), mode)  # an existing file keeps its mode otherwise
        out.write(data)
