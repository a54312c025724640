"""--web.config.file in Prometheus' exporter-toolkit format: TLS and basic auth.

```yaml
tls_server_config:
  cert_file: server.crt          # relative paths are relative to this file
  key_file: server.key
  client_auth_type: RequireAndVerifyClientCert   # optional, with client_ca_file
  client_ca_file: ca.crt
  min_version: TLS12             # TLS10..TLS13
  max_version: TLS13
http_server_config:
  headers: {X-Frame-Options: deny}
basic_auth_users:
  alice: $2y$10$...              # bcrypt hash (htpasswd -nBC 10 alice)
```
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
import logging
import os
import re
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from aiohttp import web
from cachetools import LRUCache

from ntp_probe.config.load import ca_file_problem, read_config_file, read_yaml
from ntp_probe.config.schema import ConfigError

_TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
_CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "RequestClientCert": ssl.CERT_OPTIONAL,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAnyClientCert": ssl.CERT_REQUIRED,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
# The headers exporter-toolkit lets a web config set, and the values it accepts for some.
_HEADERS = {h.lower(): h for h in ("Strict-Transport-Security", "X-Content-Type-Options",
                                   "X-Frame-Options", "X-XSS-Protection",
                                   "Content-Security-Policy")}
_HEADER_VALUES = {"X-Content-Type-Options": ("nosniff",),
                  "X-Frame-Options": ("deny", "sameorigin")}
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # tab is allowed in a field value
_TLS_KEYS = {"cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version",
             "max_version"}


@functools.cache
def _bcrypt() -> ModuleType:
    """bcrypt, imported only where basic auth is configured."""
    import bcrypt

    return bcrypt


# bcrypt reads at most 72 bytes of a password; longer ones are refused (bcrypt 5 raises, and
# Go's bcrypt, which exporter-toolkit uses, refuses them too).
MAX_PASSWORD_BYTES = 72
# Password checks wait their turn, as exporter-toolkit's do, unless the work queued in their
# lane (each check at the measured time of its hash's bcrypt cost) would make the answer
# come later than this: then 429 at once, so a flood of wrong passwords cannot delay checks
# without bound. Each configured user name is a lane, and every unknown (made-up) name
# together one more, with threads of its own: a flood naming one user (or made-up ones)
# leaves another user's login a place in the queue.
MAX_CHECK_WAIT = 5.0
MIN_PENDING_CHECKS = 8  # allowed whatever a check costs
_THREADS = {True: 2, False: 1}  # for configured user names, for unknown ones


class TooBusy(Exception):
    """Too many password checks are pending."""


logger = logging.getLogger("ntp_probe.web")

# How often new connections look at the certificate files: a rotation is picked up within
# this, at the cost of a few stat() calls a second at most.
_TLS_CHECK_INTERVAL = 1.0


def _signature(paths: tuple[str, ...]) -> tuple[tuple[int, int, int] | None, ...]:
    """What the files are now (through symlinks: a Kubernetes secret swaps a link)."""
    out: list[tuple[int, int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            out.append(None)
        else:
            out.append((st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(out)


@dataclass(slots=True)
class _TLSFiles:
    """A server's TLS context, the settings and files it was built from, and what the
    files were then."""

    context: ssl.SSLContext
    raw: dict[str, Any]  # tls_server_config as written
    base: Path  # the web config's directory (relative paths)
    cert: str
    key: str
    client_ca: str | None
    signature: tuple[tuple[int, int, int] | None, ...] = ()
    checked: float = 0.0

    def same_settings(self, other: _TLSFiles) -> bool:
        """Whether ``other`` comes from the same files with the same settings."""
        return (self.raw, self.paths) == (other.raw, other.paths)

    @property
    def paths(self) -> tuple[str, ...]:
        return (self.cert, self.key) + ((self.client_ca,) if self.client_ca else ())

    def refresh(self) -> ssl.SSLContext:
        """The context for a new connection: built afresh from the files when they
        changed (looked at no more than once a second), so that a renewed certificate of
        another key type replaces the old one and a client CA taken out of the bundle is
        no longer trusted; files that do not build one are logged, the old context kept."""
        now = time.monotonic()
        if now - self.checked < _TLS_CHECK_INTERVAL:
            return self.context
        self.checked = now
        signature = _signature(self.paths)
        if signature == self.signature:
            return self.context
        self.signature = signature  # a broken change is logged once, not per connection
        try:
            fresh = _tls(self.raw, self.base)
        except WebConfigError as exc:
            # A warning: a rotation written file by file passes through such states.
            logger.warning("TLS files changed but do not load, the previous ones stay in "
                           "use: %s", exc)
            return self.context
        assert fresh is not None  # built from a non-empty tls_server_config
        self.context = fresh.context
        logger.info("TLS files changed: new connections use them")
        return self.context


def _cost(hashed: bytes) -> int:
    return int(hashed.split(b"$")[2])


@dataclass(slots=True)
class _Check:
    """A password check waiting for (or on) a thread."""

    secret: bytes
    hashed: bytes
    cost: int
    done: asyncio.Future[bool]


class WebConfigError(ValueError):
    """A web configuration problem; the message names the key."""


@dataclass(slots=True)
class WebConfig:
    """TLS context, basic-auth users and extra response headers."""

    ssl_context: ssl.SSLContext | None = None
    users: Mapping[str, bytes] = field(default_factory=dict)
    # Where ssl_context's certificate, key and client CA come from (see refresh_tls).
    _tls_files: _TLSFiles | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    # Checks remembered: successes and failures apart, so that a flood of wrong passwords
    # cannot push a good login out (it would cost a bcrypt again, queued behind the flood).
    _verified: LRUCache[tuple[str, bytes, bytes], bool] = field(
        default_factory=lambda: LRUCache(maxsize=1024)
    )
    _refused: LRUCache[tuple[str, bytes, bytes], bool] = field(
        default_factory=lambda: LRUCache(maxsize=1024)
    )
    # Compared against when the user is unknown, at the configured hashes' cost, so that a
    # wrong user name costs what a wrong password costs: timing tells no user names apart.
    _dummy: bytes = b""
    # Per lane: a configured user's name, or None for every unknown name together.
    _pending: dict[str | None, int] = field(default_factory=dict)
    _executors: dict[bool, ThreadPoolExecutor] = field(default_factory=dict)  # known name?
    # Checks waiting for a thread, by lane, and the lanes in their turn: the threads take
    # one check from each lane in turn, so a lane full of a flood's checks delays another
    # lane's check by one check per lane, not by the whole flood.
    _waiting: dict[str | None, deque[_Check]] = field(default_factory=dict)
    _turns: dict[bool, deque[str | None]] = field(default_factory=dict)
    _running: dict[bool, int] = field(default_factory=dict)
    # One check's time by bcrypt cost, as last measured (the highest cost at load, then
    # every check), and the work queued in each lane, in seconds of it.
    cost_seconds: dict[int, float] = field(default_factory=dict)
    _queued: dict[str | None, float] = field(default_factory=dict)

    async def authorized(self, header: str | None) -> bool:
        """Check an Authorization header against basic_auth_users (True when none are set)."""
        if not self.users:
            return True
        scheme, _, token = (header or "").strip().partition(" ")
        if scheme.lower() != "basic":  # RFC 7235: the scheme is case-insensitive
            return False
        try:
            raw_user, sep, secret = base64.b64decode(token.strip(), validate=True).partition(b":")
        except binascii.Error:
            return False
        if not sep:
            return False
        # The password as bytes, as Go compares it: one in another encoding than UTF-8
        # (Latin-1 from an old client) still matches the bcrypt hash made of those bytes.
        user = raw_user.decode(errors="surrogateescape")
        stored = self.users.get(user)
        # bcrypt is deliberately slow: remember checks by a digest of the password, so
        # repeated scrapes with the same credentials cost one hash lookup; failed ones too,
        # as exporter-toolkit does (a Prometheus that missed a password rotation would
        # otherwise cost a bcrypt per target per scrape). Keyed by the hash checked against
        # too: a check that ends after a reload changed the password must not vouch for
        # the old one under the new hash, nor a user added since stay refused.
        key = (user, stored or b"", hashlib.sha256(secret).digest())
        if self._verified.get(key):
            return True
        if key in self._refused:
            return False
        if len(secret) > MAX_PASSWORD_BYTES:
            return False
        known = stored is not None
        lane = user if known else None
        hashed = stored or self._dummy
        cost = _cost(hashed)
        estimate = self.estimate(cost)
        pending, queued = self._pending.get(lane, 0), self._queued.get(lane, 0.0)
        # Served in turn with the other lanes with checks waiting: each of them slows it.
        lanes = len(self._turns.get(known, ())) + (lane not in self._waiting)
        wait = (queued + estimate) * lanes / _THREADS[known]
        if pending >= MIN_PENDING_CHECKS and wait > MAX_CHECK_WAIT:
            raise TooBusy
        self._pending[lane], self._queued[lane] = pending + 1, queued + estimate
        check = _Check(secret, hashed, cost, asyncio.get_running_loop().create_future())
        self._waiting.setdefault(lane, deque()).append(check)
        turns = self._turns.setdefault(known, deque())
        if lane not in turns:
            turns.append(lane)
        self._dispatch(known)
        try:
            ok = await check.done
        finally:
            if self._pending[lane] == 1:
                del self._pending[lane], self._queued[lane]
            else:
                self._pending[lane] -= 1
                self._queued[lane] = max(self._queued[lane] - estimate, 0.0)
        if ok and stored is not None:
            self._verified[key] = True
            return True
        self._refused[key] = False
        return False

    def _dispatch(self, known: bool) -> None:
        """Hand waiting checks to free threads, one lane after another."""
        turns = self._turns.get(known)
        while turns and self._running.get(known, 0) < _THREADS[known]:
            lane = turns.popleft()
            waiting = self._waiting[lane]
            check = waiting.popleft()
            if waiting:
                turns.append(lane)  # its next check waits for the other lanes' turns
            else:
                del self._waiting[lane]
            if check.done.done():  # its caller gave up waiting
                continue
            executor = self._executors.get(known)
            if executor is None:
                executor = self._executors[known] = ThreadPoolExecutor(
                    _THREADS[known], thread_name_prefix="ntp_probe-auth")
            self._running[known] = self._running.get(known, 0) + 1
            running = asyncio.wrap_future(executor.submit(
                self._timed_check, check.secret, check.hashed, check.cost))
            running.add_done_callback(functools.partial(self._checked, known, check))

    def _checked(self, known: bool, check: _Check, running: asyncio.Future[bool]) -> None:
        self._running[known] -= 1
        if not check.done.done():
            exc = running.exception()
            if exc is None:
                check.done.set_result(running.result())
            else:
                check.done.set_exception(exc)
        elif not running.cancelled():
            running.exception()  # retrieved: its caller gave up
        self._dispatch(known)

    def estimate(self, cost: int) -> float:
        """Seconds one check of a hash of bcrypt ``cost`` takes here: as measured for that
        cost, else from another cost's measurement (each step doubles the work)."""
        known = self.cost_seconds.get(cost)
        if known is not None:
            return known
        if self.cost_seconds:
            other, seconds = max(self.cost_seconds.items())
            return seconds * 2.0 ** (cost - other)
        return 0.05 * 2.0 ** (cost - 10)  # about this machine's, until one is measured

    def _timed_check(self, secret: bytes, hashed: bytes, cost: int) -> bool:
        started = time.perf_counter()
        ok: bool = _bcrypt().checkpw(secret, hashed)
        self.cost_seconds[cost] = time.perf_counter() - started
        return ok

    def middleware(self) -> Callable[..., Awaitable[web.StreamResponse]] | None:
        """aiohttp middleware enforcing basic auth; None without users (nothing to do on
        every request). The configured headers go on every response through
        :meth:`add_headers`, the router's 404s and 405s included."""
        if not self.users:
            return None

        @web.middleware
        async def mw(
            request: web.Request,
            handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
        ) -> web.StreamResponse:
            try:
                allowed = await self.authorized(request.headers.get("Authorization"))
            except TooBusy:
                return web.Response(status=429, text="too many password checks pending\n",
                                    headers={"Retry-After": "1"})
            if not allowed:
                return web.Response(status=401, text="Unauthorized\n",
                                    headers={"WWW-Authenticate": 'Basic realm="ntp_probe"'})
            return await handler(request)

        return mw

    def restart_needed(self, new: WebConfig) -> list[str]:
        """What in ``new`` cannot be taken without a restart: turning basic auth, the
        headers or TLS on or off (the server is set up for them at start), other TLS
        settings."""
        later = []
        if bool(new.users) != bool(self.users):
            later.append("turning basic auth on or off")
        if bool(new.headers) != bool(self.headers):
            later.append("adding the first header or removing the last")
        old_tls, new_tls = self._tls_files, new._tls_files
        if (old_tls is None) != (new_tls is None) or (
                old_tls is not None and new_tls is not None and not old_tls.same_settings(
                    new_tls)):
            later.append("TLS settings (the files' contents are read again by themselves)")
        return later

    def adopt(self, new: WebConfig) -> None:
        """Take ``new``'s users and headers (a reload that :meth:`restart_needed` found
        nothing in), as exporter-toolkit reads them for each request."""
        if new.users != self.users:
            self.users, self._dummy = new.users, new._dummy
            self.cost_seconds = new.cost_seconds
            self._verified.clear()  # a removed user or a changed password logs in no more
            self._refused.clear()  # and a user added since is not refused from memory
        self.headers = new.headers

    def refresh_tls(self) -> ssl.SSLContext | None:
        """The TLS context for a new connection (None without TLS): certificate, key and
        client CA files that changed are read again, as exporter-toolkit reads them for
        each connection (a renewed certificate needs no restart)."""
        if self._tls_files is None:
            return self.ssl_context
        self.ssl_context = self._tls_files.refresh()
        return self.ssl_context

    async def add_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        """The configured headers, as a response signal: on every response, errors
        included, as exporter-toolkit sets them before any handler runs."""
        for name, value in self.headers.items():
            response.headers[name] = value


def _mapping(raw: object, key: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise WebConfigError(f"{key}: expected a mapping")
    return raw


def _path(base: Path, raw: object, key: str) -> str:
    if not isinstance(raw, str) or not raw:
        raise WebConfigError(f"{key}: expected a file name")
    path = Path(raw) if Path(raw).is_absolute() else base / raw
    if not path.is_file():
        raise WebConfigError(f"{key}: no such file {str(path)!r}")
    return str(path)


def _tls(raw: dict[str, Any], base: Path) -> _TLSFiles | None:
    if not raw:
        return None
    for key in raw:
        if key not in _TLS_KEYS:
            raise WebConfigError(f"tls_server_config.{key}: unknown or unsupported key")
    if not any(raw.get(k) for k in ("cert_file", "key_file", "client_ca_file",
                                    "client_auth_type")):
        # As exporter-toolkit: no certificate, key or client check named is no TLS at all
        # (a template that leaves the paths empty serves plain HTTP), whatever else is set.
        return None
    if "cert_file" not in raw or "key_file" not in raw:
        raise WebConfigError("tls_server_config: cert_file and key_file are both required")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # TLS 1.2 with Go's AEAD suites only (exporter-toolkit's defaults): Python's own list
    # also offers ECDHE CBC suites with SHA-256/384 and DHE, which Go refuses, and
    # cipher_suites cannot take them out (refused by name, as documented).
    ctx.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL")
    cert = _path(base, raw["cert_file"], "tls_server_config.cert_file")
    key = _path(base, raw["key_file"], "tls_server_config.key_file")
    try:
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise WebConfigError(f"tls_server_config: cannot load cert/key: {exc}") from None
    for name, attr in (("min_version", "minimum_version"), ("max_version", "maximum_version")):
        if name in raw:
            if raw[name] not in _TLS_VERSIONS:
                raise WebConfigError(
                    f"tls_server_config.{name}: expected one of {', '.join(_TLS_VERSIONS)}"
                )
            version = _TLS_VERSIONS[raw[name]]
            # OpenSSL 3 offers TLS below 1.2 only at security level 0.
            unoffered = version < ssl.TLSVersion.TLSv1_2 and ctx.security_level >= 1
            if name == "max_version" and unoffered:
                raise WebConfigError(
                    f"tls_server_config.max_version {raw[name]}: this OpenSSL refuses TLS "
                    f"below 1.2 at its security level ({ctx.security_level}): no handshake "
                    "could succeed")
            if name == "min_version" and unoffered:
                # Level 0 would let weak ciphers in for every client: said, not done.
                logger.warning("tls_server_config.min_version %s: this OpenSSL refuses TLS "
                               "below 1.2 at its security level (%d); TLS 1.2 is the minimum "
                               "in effect", raw[name], ctx.security_level)
                continue
            setattr(ctx, attr, version)
    if ("min_version" in raw and "max_version" in raw
            and ctx.minimum_version > ctx.maximum_version):  # no handshake could succeed
        raise WebConfigError(
            f"tls_server_config: min_version {raw['min_version']} is above max_version "
            f"{raw['max_version']}")
    auth = raw.get("client_auth_type") or "NoClientCert"  # "" too, as exporter-toolkit
    if auth not in _CLIENT_AUTH:
        raise WebConfigError(
            f"tls_server_config.client_auth_type: expected one of {', '.join(_CLIENT_AUTH)}"
        )
    if _CLIENT_AUTH[auth] == ssl.CERT_NONE and raw.get("client_ca_file"):
        # As exporter-toolkit: a CA file alone turns on no client check, and an operator
        # who set one believes it does.
        raise WebConfigError("tls_server_config.client_ca_file: set without a client_auth_type "
                             "that checks client certificates (e.g. RequireAndVerifyClientCert)")
    ca_file = None
    if _CLIENT_AUTH[auth] != ssl.CERT_NONE:
        if raw.get("client_ca_file"):
            ca_file = _path(base, raw["client_ca_file"], "tls_server_config.client_ca_file")
            why = ca_file_problem(ca_file)  # as the NTS ca_file: a CRL alone trusts nothing
            if why is not None:
                raise WebConfigError(f"tls_server_config.client_ca_file: {why}")
            ctx.load_verify_locations(ca_file)
        else:
            # As Go's TLS server with no ClientCAs: client certificates are checked
            # against the system's trusted roots.
            ctx.load_default_certs(ssl.Purpose.CLIENT_AUTH)
        ctx.verify_mode = _CLIENT_AUTH[auth]
    files = _TLSFiles(ctx, dict(raw), base, cert, key, ca_file)
    files.signature = _signature(files.paths)
    return files


def load_web_config(path: str | None) -> WebConfig:
    """Load and validate a web config file (None: plain HTTP, no auth)."""
    if path is None:
        return WebConfig()
    file = Path(path)
    try:
        # As the modules file is read: a FIFO is an error at once, not a start that hangs;
        # a user named "yes" stays "yes" (YAML 1.1 would make it True), as in Go.
        raw = read_yaml(read_config_file(path), path)
    except ConfigError as exc:
        raise WebConfigError(str(exc)) from None
    top = _mapping(raw, "(top level)")
    for key in top:
        if key not in ("tls_server_config", "basic_auth_users", "http_server_config"):
            raise WebConfigError(f"{key}: unknown key")
    users: dict[str, bytes] = {}
    for user, hashed in _mapping(top.get("basic_auth_users"), "basic_auth_users").items():
        if ":" in str(user):  # basic auth splits at the first colon: it could never log in
            raise WebConfigError(f"basic_auth_users.{user}: a user name cannot contain ':'")
        if not isinstance(hashed, str) or not hashed.startswith(("$2a$", "$2b$", "$2y$")):
            raise WebConfigError(f"basic_auth_users.{user}: expected a bcrypt hash ($2y$...)")
        try:  # a malformed hash must fail here, not as a 500 at every request
            _bcrypt().checkpw(b"", hashed.encode())
        except ValueError:
            raise WebConfigError(f"basic_auth_users.{user}: not a valid bcrypt hash") from None
        users[str(user)] = hashed.encode()
    http = _mapping(top.get("http_server_config"), "http_server_config")
    for key in http:
        if key not in ("headers", "http2"):
            raise WebConfigError(f"http_server_config.{key}: unknown or unsupported key")
    if http.get("http2", False) is not False:
        # Accepting it would promise what the server cannot do: aiohttp speaks HTTP/1.1 only.
        raise WebConfigError("http_server_config.http2: HTTP/2 is not supported; "
                             "remove the key or set it to false")
    headers: dict[str, str] = {}
    for name, value in _mapping(http.get("headers"), "headers").items():
        # exporter-toolkit's rules: a few security headers only (Content-Length or
        # Transfer-Encoding set here would corrupt every response), some values fixed.
        # Exactly as exporter-toolkit spells them (names and values): a web config that
        # works here must work for the Go exporters beside it, and the other way round.
        canonical = _HEADERS.get(str(name).lower())
        if canonical is None or canonical != name:
            hint = f": did you mean {canonical!r}?" if canonical is not None else ""
            raise WebConfigError(f"http_server_config.headers: {name!r} cannot be configured "
                                 f"(one of {', '.join(_HEADERS.values())}){hint}")
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 9:
            value = str(value)  # X-XSS-Protection: 0, as Go's YAML reads it into text
        if not isinstance(value, str):  # YAML read off as 90 for 1:30, False for off
            raise WebConfigError(f"http_server_config.headers.{name}: expected text, got "
                                 f"{value!r}: quote the value")
        allowed = _HEADER_VALUES.get(canonical)
        if allowed is not None and value not in allowed:
            raise WebConfigError(f"http_server_config.headers.{name}: expected one of "
                                 f"{', '.join(allowed)}, got {value!r}")
        if _CONTROL.search(value):
            raise WebConfigError(
                f"http_server_config.headers.{name}: a value cannot hold control characters")
        headers[canonical] = value
    tls = _tls(_mapping(top.get("tls_server_config"), "tls_server_config"), file.parent)
    dummy = b""
    cost_seconds: dict[int, float] = {}
    if users:
        cost = max(_cost(h) for h in users.values())
        started = time.perf_counter()  # a hash costs what a check costs: the first estimate
        dummy = _bcrypt().hashpw(b"ntp_probe-dummy", _bcrypt().gensalt(rounds=cost))
        cost_seconds[cost] = time.perf_counter() - started
    return WebConfig(ssl_context=None if tls is None else tls.context, users=users,
                     headers=headers, _tls_files=tls, _dummy=dummy, cost_seconds=cost_seconds)
