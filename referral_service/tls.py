"""TLS for both ports: the certificate, key and client-CA files, reloaded when they change.

Each port keeps a ``Reloading`` of what its TLS stack needs, built from the files: gRPC a
``grpc.ServerCertificateConfiguration`` handed to grpc's certificate fetcher, HTTP an
``ssl.SSLContext`` swapped in by the context's SNI callback. Both run at the start of every new
handshake, so the check is a ``stat`` of the files and nothing more (no polling thread, no
file read unless they changed). After a change the files are read and checked (the key must
match the certificate); a set that does not load, such as a rotation caught half-written, is
logged and skipped until the files change again, and the previous certificate keeps serving.
Connections already open keep the certificate they were made with.

Rotate by replacing the files, best by renaming new files into place (cert-manager,
Kubernetes secret volumes and ``mv`` all do): an in-place rewrite is noticed too, unless it
keeps the size and lands within the file system's timestamp granularity of the last change.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import grpc

log = logging.getLogger("referral_service.tls")

T = TypeVar("T")


class TlsError(RuntimeError):
    """The TLS files cannot be used; the message says which and why."""


@dataclass(frozen=True)
class TlsFiles:
    cert_file: Path
    key_file: Path
    #: Client certificates must chain to these CAs; None when no port asks for one.
    client_ca_file: Path | None = None

    @property
    def paths(self) -> tuple[Path, ...]:
        return (self.cert_file, self.key_file) + ((self.client_ca_file,) if self.client_ca_file else ())

    def signature(self) -> tuple[tuple[int, ...] | None, ...]:
        """What ``stat`` says of each file (a file being replaced may be missing for a moment)."""
        signature: list[tuple[int, ...] | None] = []
        for path in self.paths:
            try:
                st = os.stat(path)
            except OSError:
                signature.append(None)
            else:
                signature.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        return tuple(signature)

    def read(self) -> Material:
        try:
            material = Material(
                self.cert_file.read_bytes(),
                self.key_file.read_bytes(),
                self.client_ca_file.read_bytes() if self.client_ca_file else None,
            )
        except OSError as error:
            raise TlsError(f"cannot read {error.filename}: {error.strerror}") from None
        material.check(self)
        return material


@dataclass(frozen=True)
class Material:
    """The PEM contents of the files, checked to work together."""

    cert_chain: bytes
    private_key: bytes
    client_ca: bytes | None

    def check(self, files: TlsFiles) -> None:
        """What OpenSSL would refuse in every handshake is refused here: no certificate, a key
        that is not the certificate's (or is encrypted), a CA file without a certificate."""
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        try:
            leaf = x509.load_pem_x509_certificates(self.cert_chain)[0]
        except ValueError as error:
            raise TlsError(f"{files.cert_file} holds no PEM certificate: {error}") from None
        try:
            key = serialization.load_pem_private_key(self.private_key, password=None)
        except (ValueError, TypeError) as error:
            raise TlsError(f"{files.key_file} holds no unencrypted PEM private key: {error}") from None
        if key.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
            raise TlsError(f"{files.key_file} is not the private key of the certificate in {files.cert_file}")
        if self.client_ca is not None:
            try:
                x509.load_pem_x509_certificates(self.client_ca)
            except ValueError as error:
                raise TlsError(f"{files.client_ca_file} holds no PEM CA certificate: {error}") from None

    def describe(self) -> str:
        """The leaf certificate, for the logs: subject, serial and expiry."""
        from cryptography import x509

        leaf = x509.load_pem_x509_certificates(self.cert_chain)[0]
        return (
            f"{leaf.subject.rfc4514_string() or 'no subject'}, serial {leaf.serial_number:x}, "
            f"expires {leaf.not_valid_after_utc.isoformat()}"
        )


def server_context(files: TlsFiles, material: Material, verify_mode: ssl.VerifyMode) -> ssl.SSLContext:
    """A server-side context with the certificate and key (and the client CA when clients are
    asked for a certificate)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    try:
        # ssl loads a chain and key from files only; if they changed since ``material`` was
        # read, OpenSSL still checks that what it loads belongs together.
        context.load_cert_chain(files.cert_file, files.key_file)
        if verify_mode is not ssl.CERT_NONE:
            assert material.client_ca is not None
            context.load_verify_locations(cadata=material.client_ca.decode("ascii", "replace"))
            context.verify_mode = verify_mode
    except (OSError, ValueError) as error:  # ssl.SSLError is an OSError
        raise TlsError(f"cannot load the TLS files: {error}") from None
    return context


class Reloading(Generic[T]):
    """``build`` applied to the files as they are now; rebuilt on the first call after they
    change. Thread-safe (grpc calls from its own threads)."""

    def __init__(self, files: TlsFiles, build: Callable[[Material], T], port: str) -> None:
        """Reads and builds at once: raises ``TlsError`` when the files are not usable."""
        self._files = files
        self._build = build
        self._port = port
        self._lock = threading.Lock()
        self._signature = files.signature()
        material = files.read()
        self._current = build(material)
        self._failed: tuple[tuple[int, ...] | None, ...] | None = None
        log.info("%s TLS certificate: %s", port, material.describe())

    def current(self) -> T:
        self.changed()
        return self._current

    def changed(self) -> T | None:
        """The rebuilt value when the files changed since the last call, else None."""
        signature = self._files.signature()
        if signature == self._signature or signature == self._failed:
            return None
        with self._lock:
            if signature == self._signature or signature == self._failed:
                return None
            try:
                material = self._files.read()
                value = self._build(material)
            except TlsError as error:
                # Maybe caught half-way through a rotation: try again when the files change.
                self._failed = signature
                log.warning(
                    "%s TLS files changed but cannot be used (%s); serving the previous certificate",
                    self._port,
                    error,
                )
                return None
            self._current, self._signature, self._failed = value, signature, None
            log.info("%s TLS certificate reloaded: %s", self._port, material.describe())
            return value


# --- the two transports ----------------------------------------------------------------------------


def grpc_credentials(files: TlsFiles, require_client_certificate: bool) -> grpc.ServerCredentials:
    """Server credentials whose certificate (and client CA) follow the files. grpcio offers two
    client-certificate modes only: required and verified, or not asked for."""

    def configuration(material: Material) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(material.private_key, material.cert_chain)],
            root_certificates=material.client_ca if require_client_certificate else None,
        )

    reloading = Reloading(files, configuration, "gRPC")

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        # Called by grpc at the start of each handshake, on one of its threads; None keeps
        # the current configuration. Must not raise.
        try:
            return reloading.changed()
        except Exception:
            log.exception("checking the gRPC TLS files failed; serving the previous certificate")
            return None

    return grpc.dynamic_ssl_server_credentials(
        reloading.current(),
        fetch,  # type: ignore[arg-type]  # None is documented ("no change"); the stubs omit it
        require_client_authentication=require_client_certificate,
    )


def http_context(files: TlsFiles, verify_mode: ssl.VerifyMode) -> ssl.SSLContext:
    """The context the HTTP server listens with: its SNI callback (run at the start of each
    handshake, whatever the client's server name) switches the connection to a context built
    from the current files."""
    reloading = Reloading(files, lambda material: server_context(files, material, verify_mode), "HTTP")
    listening = reloading.current()

    def on_client_hello(connection: ssl.SSLObject, _server_name: str | None, context: ssl.SSLContext) -> None:
        try:
            current = reloading.current()
        except Exception:
            log.exception("checking the HTTP TLS files failed; serving the previous certificate")
            return
        if current is not context:
            connection.context = current

    listening.sni_callback = on_client_hello
    return listening
