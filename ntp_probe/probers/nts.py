"""The NTS prober (RFC 8915): NTS-KE certificate health, then the polite burst, authenticated.

One probe does its own key exchange: TCP to the KE port, TLS 1.3 with ALPN ``ntske/1``, the
chain and the server's identity judged separately, one KE request; then the module's ``ntp:``
burst to the NTP server and port the KE negotiated. Every request carries a fresh Unique
Identifier and a cookie used once (placeholders ask for the cookies the rest of the burst
needs); a reply counts only when the NTP rules accept it (source, mode, origin), it echoes our
identifier and its authenticator verifies with the server-to-client key. The ``probe_ntp_*``
gauges are then the NTP prober's, computed from authenticated samples only.

Nothing goes past the TLS handshake to a server whose certificate did not verify: the
certificate gauges are still written (an expiring certificate is what operators alert on),
but no KE request is sent and no key is exported.

This module declares what the prober emits and reports; the key exchange and the burst
live in :mod:`ntp_probe.probers.nts_session`, which brings the TLS and AEAD stack
(pyOpenSSL, cryptography, service_identity: about 10 MB and a fifth of a second to
import). It is imported on the first NTS probe, so an exporter that never probes NTS
never loads it.
"""

from __future__ import annotations

import asyncio
import importlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ntp_probe.config.schema import Module
from ntp_probe.engine.context import ProbeContext
from ntp_probe.engine.result import Measurement, Perf, Reason
from ntp_probe.engine.targets import Target
from ntp_probe.exposition.families import Family
from ntp_probe.probers import ntp

SSL_EARLIEST_EXPIRY = Family(
    "probe_ssl_earliest_cert_expiry",
    "Earliest notAfter of the certificates the NTS-KE server sent, as a Unix time "
    "(blackbox_exporter's name).",
)
SSL_LAST_CHAIN_EXPIRY = Family(
    "probe_ssl_last_chain_expiry_timestamp_seconds",
    "Earliest notAfter within the verified chain (the presented chain when it did not "
    "verify), as a Unix time.",
)
SSL_LAST_CHAIN_INFO = Family(
    "probe_ssl_last_chain_info",
    "The NTS-KE server's leaf certificate: SHA-256 fingerprint, issuer, subject and DNS "
    "names, as blackbox_exporter writes them.",
    ("fingerprint_sha256", "issuer", "subject", "subjectalternative"),
)
TLS_VERSION = Family("probe_tls_version_info", "TLS version of the NTS-KE connection.",
                     ("version",))
TLS_CIPHER = Family("probe_tls_cipher_info", "Cipher suite of the NTS-KE connection.",
                    ("cipher",))
KE_DURATION = Family(
    "probe_nts_ke_duration_seconds",
    "Duration of each NTS-KE phase: TCP connect, TLS handshake, KE records, in seconds.",
    ("phase",),
)
CERT_VERIFIED = Family("probe_nts_cert_verified",
                       "Whether the NTS-KE server's certificate chain verified (1) or not (0).")
CERT_IDENTITY_VERIFIED = Family(
    "probe_nts_cert_identity_verified",
    "Whether the NTS-KE server's certificate names the server (1) or not (0).",
)
AEAD_ALGORITHM = Family("probe_nts_aead_algorithm",
                        "AEAD algorithm negotiated by NTS-KE (RFC 5116 registry id).")
COOKIES_RECEIVED = Family("probe_nts_cookies_received", "Cookies received in the NTS-KE response.")
NTP_SERVER_INFO = Family("probe_nts_ntp_server_info",
                         "The NTP server and port negotiated by NTS-KE.", ("server", "port"))
AUTHENTICATED = Family(
    "probe_nts_authenticated",
    "Whether at least one reply echoed our unique identifier and its authenticator "
    "verified (1) or not (0).",
)

_NTS_REASONS = (
    Reason.NTS_KE_CONNECT, Reason.NTS_KE_TLS, Reason.NTS_ALPN_MISMATCH,
    Reason.NTS_CERT_UNTRUSTED, Reason.NTS_CERT_EXPIRED, Reason.NTS_CERT_NAME_MISMATCH,
    Reason.NTS_KE_ERROR, Reason.NTS_KE_MALFORMED, Reason.NTS_NO_COMMON_AEAD,
    Reason.NTS_NO_COOKIES, Reason.NTS_NAK, Reason.NTS_AUTH_FAILED,
)
_ORDER = list(Reason)
REASONS = tuple(sorted({*ntp.REASONS, *_NTS_REASONS, Reason.LEAP_MISMATCH}, key=_ORDER.index))
DESCRIPTION = "NTS (RFC 8915): NTS-KE certificate health and an authenticated NTP burst"

_SESSION = "ntp_probe.probers.nts_session"


@dataclass(frozen=True, slots=True)
class NTSReport:
    """The key exchange and the authenticated burst, as the CLI shows them."""

    ke_server: str
    ke_port: int
    server_name: str
    tls_version: str | None
    cipher: str | None
    cert_verified: bool | None
    identity_verified: bool | None
    earliest_expiry: float | None
    aead: int | None
    cookies_received: int
    ntp_server: str | None
    ntp_port: int | None
    authenticated: int
    offset: float | None = None
    samples: tuple[tuple[int, float, float, bool], ...] = field(default=())

    @property
    def title(self) -> str:
        """Section name."""
        return "nts"

    def rows(self) -> list[tuple[str, str]]:
        """Human-readable lines."""
        rows = [("NTS-KE server", f"{self.ke_server} port {self.ke_port} (name "
                                  f"{self.server_name})")]
        if self.tls_version is not None:
            rows.append(("TLS", f"{self.tls_version} {self.cipher}"))
        if self.cert_verified is not None:
            rows.append(("certificate chain", "verified" if self.cert_verified else "NOT verified"))
            rows.append(("certificate identity",
                         "verified" if self.identity_verified else "NOT verified"))
        if self.earliest_expiry is not None:
            left = (self.earliest_expiry - time.time()) / 86400
            rows.append(("earliest expiry", time.strftime(
                "%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.earliest_expiry)) + f" ({left:.1f} days)"))
        if self.aead is not None:
            rows.append(("AEAD", f"{self.aead}, {self.cookies_received} cookies"))
        if self.ntp_server is not None:
            rows.append(("NTP server", f"{self.ntp_server} port {self.ntp_port}"))
        rows.append(("authenticated samples", str(self.authenticated)))
        if self.offset is not None:
            rows.append(("offset", f"{self.offset:+.9f} s"))
        return rows

    @property
    def check_offset(self) -> float | None:
        """The offset from authenticated samples only."""
        return self.offset

    def perfdata(self) -> list[Perf]:
        """Authenticated offset, days to the earliest certificate expiry, cookies."""
        out = []
        if self.offset is not None:
            out.append(Perf("nts_offset", self.offset, "s", checked=True))
        if self.earliest_expiry is not None:
            out.append(Perf("cert_days_left", (self.earliest_expiry - time.time()) / 86400))
        out.append(Perf("authenticated_samples", float(self.authenticated)))
        return out

    def to_json(self) -> dict[str, Any]:
        """JSON-ready data."""
        return {
            "ke_server": self.ke_server, "ke_port": self.ke_port,
            "server_name": self.server_name, "tls_version": self.tls_version,
            "cipher": self.cipher, "cert_verified": self.cert_verified,
            "identity_verified": self.identity_verified,
            "earliest_cert_expiry": self.earliest_expiry, "aead": self.aead,
            "cookies_received": self.cookies_received, "ntp_server": self.ntp_server,
            "ntp_port": self.ntp_port, "authenticated_samples": self.authenticated,
            "offset_seconds": self.offset,
            "samples": [{"sample": i, "offset_seconds": o, "rtt_seconds": r, "selected": s}
                        for i, o, r, s in self.samples],
        }


_session_probe: Callable[[Target, Module, ProbeContext], Awaitable[Measurement]] | None = None


async def probe(target: Target, module: Module, ctx: ProbeContext) -> Measurement:
    """Probe one NTS server: KE and certificates, then the authenticated burst."""
    global _session_probe
    if _session_probe is None:
        # In a thread: the event loop keeps serving the other probes meanwhile. The import
        # counts against this probe's own deadline, once per process. Not sys.modules: it
        # holds a module while it is still being imported; concurrent first probes each
        # wait here on the import's lock until the module is whole.
        session = await asyncio.to_thread(importlib.import_module, _SESSION)
        _session_probe = session.probe
    return await _session_probe(target, module, ctx)
