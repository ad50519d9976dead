"""Per-backend options and the TLS connection creator they describe."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from zope.interface import implementer


@dataclass(frozen=True)
class BackendLog:
    """``mcp.backend{..., log = {...}}``: which of the requests a V2 handle
    sends to this backend get a ``proxy_req`` log event (memcached 1.6.45's
    backend logging): those slower than ``deadline_us`` (0: none), one in
    ``rate`` (1: all, 0: none) and, with ``errors``, every failure; ``tag``
    is the event's detail."""

    deadline_us: int = 0
    rate: int = 0
    errors: bool = False
    tag: str = ""


@dataclass
class BackendOptions:
    """Per-backend settings; times in seconds, ``depth_limit`` 0 = unlimited.

    ``down`` forces the backend bad for good: it never connects and fails
    every request at once (``mcp.backend{..., down = true}``).

    ``tls``: connect with TLS. The server's certificate is verified against
    the CA certificates in the PEM file ``tls_ca`` (default: the system's
    trust store) for the name ``tls_hostname`` (default: the backend's
    host, also sent as SNI), unless ``tls_verify`` is false, which accepts
    any certificate (as memcached's proxy does: insecure).

    ``log``: the backend's request logging (BackendLog), or None.
    """

    connect_timeout: float = 5.0
    read_timeout: float = 3.0
    retry_timeout: float = 3.0
    failure_limit: int = 3
    keepalive: bool = False
    depth_limit: int = 0
    down: bool = False
    tls: bool = False
    tls_ca: str | None = None
    tls_verify: bool = True
    tls_hostname: str | None = None
    log: BackendLog | None = None


class TLSOptionError(ValueError):
    """A backend's TLS options cannot be used; the text says why."""


def client_tls(host: str, options: BackendOptions) -> Any:
    """The pyOpenSSL connection creator (for ``connectSSL``) of a TLS
    backend at ``host``; reads ``tls_ca`` now."""
    try:
        from twisted.internet import ssl
    except ImportError:
        raise TLSOptionError("TLS needs pyOpenSSL: pip install 'twisted[tls]'") from None
    name = options.tls_hostname or host
    if not options.tls_verify:
        return _UnverifiedTLS(ssl.CertificateOptions(), name)
    if options.tls_ca is None:
        return ssl.optionsForClientTLS(name, ssl.platformTrust())
    try:
        with open(options.tls_ca, "rb") as f:
            pem = f.read()
    except OSError as e:
        raise TLSOptionError(f"tls_ca {options.tls_ca}: {e.strerror}") from None
    begin = b"-----BEGIN CERTIFICATE-----"
    try:
        certificates = [ssl.Certificate.loadPEM(begin + part)
                        for part in pem.split(begin)[1:]]
    except Exception:
        certificates = []
    if not certificates:
        raise TLSOptionError(f"tls_ca {options.tls_ca}: no PEM certificate in it")
    return ssl.optionsForClientTLS(name, ssl.trustRootFromCertificates(certificates))


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedTLS:
    """TLS that accepts any server certificate (``tls_verify = false``);
    still sends ``name`` as SNI unless it is an IP address."""

    def __init__(self, options: Any, name: str) -> None:
        self._options = options
        self._sni = None if isIPAddress(name) or isIPv6Address(name) \
            else name.encode("idna")

    def clientConnectionForTLS(self, tls_protocol: Any) -> Any:
        from OpenSSL import SSL

        connection = SSL.Connection(self._options.getContext(), None)
        connection.set_app_data(tls_protocol)
        if self._sni is not None:
            connection.set_tlsext_host_name(self._sni)
        return connection
