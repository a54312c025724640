"""Name resolution with blackbox_exporter's preferred_ip_protocol + fallback semantics.

getaddrinfo blocks, so it runs in threads; but a resolver that never answers keeps its
thread for as long as the C library waits. The lookups therefore get small pools of their
own, one per address family (never the event loop's default executor, which other work
needs), identical
lookups in flight share one thread, and both answers and failures are cached briefly so
that repeated scrapes of a black-holed name do not pile up. Names in the hosts file are
answered in-process first (where the system consults that file first), so no flood of
lookups of dead names can make them fail.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any, TypeVar

from cachetools import TTLCache

from ntp_probe.proto.address import ip_address

FAMILIES = {"ip4": socket.AF_INET, "ip6": socket.AF_INET6}
# getaddrinfo reports no TTL; a short fixed one keeps repeated scrapes off the resolver
# while still following DNS changes within a minute.
_CACHE_TTL = 60.0
# Failures are kept briefly: long enough to stop a storm of lookups of a dead name, short
# enough that a fixed record is seen at the next scrape or two.
_NEGATIVE_TTL = 5.0
# How long the preferred family's answer is waited for before the other family is asked
# too (RFC 8305's resolution delay is 50 ms for the other order; a recursive lookup with
# nothing cached often takes longer than that).
OTHER_FAMILY_AFTER = 0.25
# With every address asked for: how much longer the other family's answer is waited for
# once one family has answered (a lost query must not cost the answered addresses).
OTHER_FAMILY_GRACE = 1.0
# Threads for lookups, for each family: each stuck lookup of a distinct name and family
# holds one.
MAX_LOOKUP_THREADS = 16

# getaddrinfo's answers that there is no address (no such name, none of the family): not
# failures of the resolver.
_NO_ADDRESS_ERRORS = frozenset(
    code for code in (getattr(socket, "EAI_NONAME", None), getattr(socket, "EAI_NODATA", None))
    if code is not None)

_Key = tuple[str, int | None]  # (host, family); None: every family
_Addresses = tuple[tuple[int, str], ...]  # (family, address) pairs
_A = TypeVar("_A")
T = TypeVar("T")


class DaemonPool(Executor):
    """A fixed pool of daemon threads. concurrent.futures' own threads are joined when the
    interpreter exits, so one lookup stuck in the C library for minutes would hold up the
    exporter's exit after SIGTERM; daemon threads do not."""

    def __init__(self, threads: int, name: str) -> None:
        self._queue: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]]
        self._queue = queue.SimpleQueue()
        for i in range(threads):
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True).start()

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """Run ``fn(*args)`` on a pool thread."""
        future: Future[T] = Future()
        self._queue.put((future, functools.partial(fn, **kwargs), args))
        return future

    def _work(self) -> None:
        while True:
            future, fn, args = self._queue.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # handed to the waiting coroutine, not lost
                future.set_exception(exc)


class ResolveError(Exception):
    """The host has no usable address; the message says why. ``no_address``: the
    resolver answered that there is none (of that family), rather than failing."""

    def __init__(self, message: str, *, no_address: bool = False) -> None:
        super().__init__(message)
        self.no_address = no_address


@dataclass(frozen=True, slots=True)
class Resolved:
    """An address to probe and whether it came from the cache."""

    address: str
    family: int
    cached: bool

    @property
    def ip_protocol(self) -> int:
        """4 or 6, as in blackbox's probe_ip_protocol."""
        return 6 if self.family == socket.AF_INET6 else 4


def _describe(exc: BaseException) -> str:
    if isinstance(exc, socket.gaierror):
        return exc.strerror or str(exc)
    if isinstance(exc, UnicodeError):
        return f"not a valid name ({exc})"
    return str(exc) or type(exc).__name__


class HostsFile:
    """Names from the hosts file, answered in-process as the C library's "files" source
    would: no thread, so a flood of lookups that never answer cannot delay them."""

    _RECHECK = 1.0  # seconds between two looks at the file's modification time

    def __init__(self, path: str = "/etc/hosts") -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._checked = -self._RECHECK
        self._names: dict[str, _Addresses] = {}

    def lookup_all(self, host: str) -> _Addresses:
        """Every (family, address) the file gives ``host``, in file order."""
        now = time.monotonic()
        if now - self._checked >= self._RECHECK:
            self._checked = now
            self._reload()
        return self._names.get(host.lower().rstrip("."), ())

    def _reload(self) -> None:
        try:
            info = os.stat(self.path)
        except OSError:
            self._stamp, self._names = None, {}
            return
        stamp = (info.st_mtime_ns, info.st_size)
        if stamp == self._stamp or info.st_size > 1024 * 1024:
            return
        names: dict[str, list[tuple[int, str]]] = {}
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                lines = f.readlines()
        except OSError:
            return
        for line in lines:
            fields = line.split("#", 1)[0].split()
            if len(fields) < 2:
                continue
            if "%" in fields[0]:  # the C library's files source reads no zone either
                continue
            try:
                ip = ipaddress.ip_address(fields[0])
            except ValueError:
                continue
            if ip.version == 6 and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped  # IPv4 carried as IPv6 is IPv4, as for a literal target
            fam = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
            for name in fields[1:]:
                names.setdefault(name.lower().rstrip("."), []).append((fam, str(ip)))
        self._stamp = stamp
        self._names = {name: tuple(found) for name, found in names.items()}


# RFC 6724's default policy table: (prefix, precedence, label), IPv4 as IPv4-mapped IPv6.
_POLICY = tuple((ipaddress.IPv6Network(net), precedence, label) for net, precedence, label in (
    ("::1/128", 50, 0), ("::ffff:0:0/96", 35, 4), ("2002::/16", 30, 2), ("2001::/32", 5, 5),
    ("fc00::/7", 3, 13), ("::/96", 1, 3), ("fec0::/10", 1, 11), ("3ffe::/16", 1, 12),
    ("::/0", 40, 1)))
_POLICY = tuple(sorted(_POLICY, key=lambda entry: -entry[0].prefixlen))  # longest match first
_LINK_SCOPE, _SITE_SCOPE, _GLOBAL_SCOPE = 2, 5, 14


def _as_ipv6(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv6Address:
    if isinstance(ip, ipaddress.IPv4Address):
        return ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + ip.packed)
    return ip


def _policy(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> tuple[int, int]:
    """(precedence, label) of an address in RFC 6724's default policy table."""
    mapped = _as_ipv6(ip)
    return next((p, label) for net, p, label in _POLICY if mapped in net)


def _scope(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> int:
    """An address's scope (RFC 6724 section 3.1): IPv4 loopback and link-local
    addresses are link scope, as Go and the C library read them."""
    if isinstance(ip, ipaddress.IPv4Address):
        return _LINK_SCOPE if ip.is_loopback or ip.is_link_local else _GLOBAL_SCOPE
    if ip.is_multicast:
        return ip.packed[1] & 0x0F
    if ip.is_loopback or ip.is_link_local:
        return _LINK_SCOPE
    if ip.is_site_local:
        return _SITE_SCOPE
    return _GLOBAL_SCOPE


def _source(family: int, address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The source address this host would send to ``address`` from, or None when it has
    no route there. A connected UDP socket sends nothing: connect() only asks the
    routing table."""
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((address, 9))
            return ip_address(str(probe.getsockname()[0]).split("%", 1)[0])
        except (OSError, ValueError):
            return None


def _common_prefix(a: ipaddress.IPv6Address, b: ipaddress.IPv6Address) -> int:
    """Leading bits two IPv6 addresses share, up to the 64 of a prefix (as Go counts)."""
    differ = (int(a) ^ int(b)) >> 64
    return 64 - differ.bit_length()


def _rfc6724_sorted(found: _Addresses) -> _Addresses:
    """A name's addresses of one family in the order Go's resolver (blackbox's) gives
    them: RFC 6724's destination rules 1 (no route last), 2 (matching scope), 5
    (matching label), 6 (higher precedence), 8 (smaller scope) and, for IPv6 only as Go
    applies it, 9 (longest prefix shared with the source); the order found where they
    tie (the rules about the source's state, 3, 4 and 7, tell nothing apart here)."""
    if len(found) < 2:
        return found

    def key(entry: tuple[int, str]) -> tuple[int, ...]:
        fam, address = entry
        dest = ip_address(address.split("%", 1)[0])
        source = _source(fam, address)
        if source is None:
            return (1,)
        precedence, label = _policy(dest)
        prefix = (_common_prefix(dest, source) if isinstance(dest, ipaddress.IPv6Address)
                  and isinstance(source, ipaddress.IPv6Address) else 0)
        return (0, _scope(dest) != _scope(source), label != _policy(source)[1], -precedence,
                _scope(dest), -prefix)
    try:
        return tuple(sorted(found, key=key))
    except OSError:  # no socket to ask the routing table with (out of descriptors)
        return found


def _files_first(nsswitch: str = "/etc/nsswitch.conf") -> bool:
    """Whether the C library consults the hosts file before anything else."""
    try:
        with open(nsswitch, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, sources = line.split("#", 1)[0].partition(":")
                if key.strip() == "hosts":
                    return sources.split()[:1] == ["files"]
    except OSError:
        pass
    return True  # glibc's default when the file or the line is missing: files first


@dataclass(slots=True)
class _Lookup:
    """One lookup in flight: as the callers await it, as the pool queued it, and how many
    callers wait for it."""

    future: asyncio.Future[Any]
    queued: Future[Any]
    waiting: int = 0


class Resolver:
    """Bounded, coalescing, caching lookups of the addresses of a name, one getaddrinfo per
    family (a lost query of one family cannot fail the other's), on threads of each
    family's own."""

    def __init__(self, threads: int = MAX_LOOKUP_THREADS,
                 getaddrinfo: Callable[[str, int], str] | None = None,
                 hosts: HostsFile | None = None) -> None:
        # ``getaddrinfo`` (host, family) -> address is replaceable so that tests never
        # send a made-up name to the machine's resolver.
        self._getaddrinfo_all: Callable[[str, int], _Addresses] = (
            _getaddrinfo_all if getaddrinfo is None
            else functools.partial(_one_address, getaddrinfo))
        if hosts is None and getaddrinfo is None and _files_first():
            hosts = HostsFile()
        self._hosts = hosts
        # Threads of their own for each family: a resolver that drops one query type (AAAA,
        # typically) fills only that family's, so names answered in the other still resolve.
        self._executors: dict[int, DaemonPool] = {
            socket.AF_INET6: DaemonPool(threads, "ntp_probe-resolve6"),
            socket.AF_INET: DaemonPool(threads, "ntp_probe-resolve4")}
        self._all: TTLCache[_Key, _Addresses] = TTLCache(maxsize=4096, ttl=_CACHE_TTL)
        self._failures: TTLCache[_Key, ResolveError] = TTLCache(maxsize=4096,
                                                                  ttl=_NEGATIVE_TTL)
        self._in_flight: dict[_Key, _Lookup] = {}

    async def lookup_all(self, host: str, family: int) -> tuple[_Addresses, bool]:
        """Every (family, address) of ``host`` in ``family``, in the resolver's order, and
        whether they came from the cache; :class:`ResolveError` says why there are none.
        One query type per lookup: the other family's, slow or lost, cannot hold it up.
        A name the hosts file lists is answered from it alone (nothing is asked of DNS,
        so no flood of lookups can delay it)."""
        if self._hosts is not None:
            listed = self._hosts.lookup_all(host)
            if listed:
                local = tuple(found for found in listed if found[0] == family)
                if not local:
                    raise ResolveError("the hosts file lists no address of that family",
                                       no_address=True)
                return _rfc6724_sorted(local), False
        key = (host, family)
        hit = self._all.get(key)
        if hit is not None:
            return hit, True
        return await self._shared(key, self._all, self._getaddrinfo_all, host, family), False

    async def _shared(self, key: _Key, answers: TTLCache[_Key, _A],
                      lookup: Callable[..., _A], *args: Any) -> _A:
        """``lookup(*args)`` in the pool, once for every caller of ``key`` at a time; the
        answer is cached in ``answers``, a failure (with its reason) briefly."""
        failure = self._failures.get(key)
        if failure is not None:
            raise ResolveError(str(failure), no_address=failure.no_address)
        flight = self._in_flight.get(key)
        if flight is None:
            family = key[1] if key[1] in self._executors else socket.AF_INET
            queued = self._executors[family].submit(lookup, *args)
            flight = self._in_flight[key] = _Lookup(asyncio.wrap_future(queued), queued)
            flight.future.add_done_callback(functools.partial(self._done, key, answers))
        flight.waiting += 1
        try:
            # Shielded: a probe that gives up must not cancel a lookup others share.
            result: _A = await asyncio.shield(flight.future)
        except ResolveError as exc:
            # The lookup's exception is every waiter's: passing through here, it took this
            # frame into its traceback, and the frame holds the lookup that holds the
            # exception, a cycle only a full collection frees (a flood of names that do not
            # resolve grew the exporter by kilobytes a name). Cut it; raise one of our own.
            exc.__traceback__ = None
            raise ResolveError(str(exc), no_address=exc.no_address) from None
        finally:
            flight.waiting -= 1
            # Nobody waits any more: a lookup still queued behind stuck ones is dropped
            # before it takes a thread (one already running goes on, and is cached). It is
            # forgotten at once, so a caller arriving now starts a new one, not a cancelled one.
            if not flight.waiting and flight.queued.cancel() and \
                    self._in_flight.get(key) is flight:
                del self._in_flight[key]
        return result

    def _done(self, key: _Key, answers: TTLCache[_Key, Any],
              future: asyncio.Future[Any]) -> None:
        flight = self._in_flight.get(key)
        if flight is not None and flight.future is future:
            del self._in_flight[key]
        if future.cancelled():
            return
        exc = future.exception()
        if exc is None:
            answers[key] = future.result()
        else:  # kept without the worker's traceback (its frames): the reason is enough
            self._failures[key] = ResolveError(str(exc), no_address=getattr(
                exc, "no_address", False))



def _one_address(getaddrinfo: Callable[[str, int], str], host: str,
                 family: int) -> _Addresses:
    """The address of ``host`` in ``family`` as a one-address lookup tells (the tests'
    stand-in for getaddrinfo)."""
    return ((family, getaddrinfo(host, family)),)


def _getaddrinfo_all(host: str, family: int) -> _Addresses:
    try:
        infos = socket.getaddrinfo(host, None, family=family, type=socket.SOCK_DGRAM)
    except (OSError, UnicodeError) as exc:
        raise ResolveError(_describe(exc), no_address=isinstance(exc, socket.gaierror) and (
            exc.errno in _NO_ADDRESS_ERRORS)) from None
    out: list[tuple[int, str]] = []
    for fam, _, _, _, sockaddr in infos:
        if fam in (socket.AF_INET, socket.AF_INET6) and (fam, str(sockaddr[0])) not in out:
            out.append((fam, str(sockaddr[0])))
    if not out:
        raise ResolveError("no address", no_address=True)
    # The C library sorted them by RFC 3484's table (a unique local address before a
    # global one, IPv4 by shared prefix); Go's order, which blackbox probes, is RFC 6724's.
    return _rfc6724_sorted(tuple(out))


async def _of_family(resolver: Resolver, host: str, family: int) -> list[Resolved]:
    """The addresses of one family (IPv4-mapped ones as IPv4); ResolveError says why none."""
    found, cached = await resolver.lookup_all(host, family)
    out: list[Resolved] = []
    for fam, address in found:
        resolved = _unmapped(Resolved(address, fam, cached=cached))
        if resolved not in out:
            out.append(resolved)
    return out


def _has_family(lookup: asyncio.Future[list[Resolved]], family: int) -> bool:
    """Whether ``lookup`` is done with an address of ``family``."""
    return (lookup.done() and not lookup.cancelled() and lookup.exception() is None
            and any(r.family == family for r in lookup.result()))


def _families(first: int) -> tuple[int, int]:
    return first, socket.AF_INET if first == socket.AF_INET6 else socket.AF_INET6


async def resolve_all(host: str, resolver: Resolver | None = None,
                      family: int | None = None,
                      log: Callable[[str], None] | None = None) -> list[Resolved]:
    """Every address of ``host``: of ``family`` only when given, else of both, IPv6 first,
    each family asked in its own query at the same time (as Go's resolver asks): an answer
    for one family is kept when the other's query goes unanswered (getaddrinfo asked for
    both at once fails as a whole then), which is waited for OTHER_FAMILY_GRACE more at
    most once one family has answered. A family left out is said to ``log``. An IP
    literal is its only address."""
    resolved = literal(host)
    if resolved is not None:
        return [resolved]
    resolver = resolver or default_resolver()
    families = (family,) if family is not None else _families(socket.AF_INET6)
    lookups = {f: asyncio.ensure_future(_of_family(resolver, host, f)) for f in families}
    try:
        pending: set[asyncio.Future[list[Resolved]]] = set(lookups.values())
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if pending and any(not d.exception() and d.result() for d in done):
                _, pending = await asyncio.wait(pending, timeout=OTHER_FAMILY_GRACE)
                break
        out: list[Resolved] = []
        reasons: list[str] = []
        left_out: list[str] = []  # families that may have addresses, not had
        for fam, lookup in lookups.items():
            name = "ip6" if fam == socket.AF_INET6 else "ip4"
            if lookup in pending:
                reasons.append(f"{name}: no answer {OTHER_FAMILY_GRACE:g}s after the other "
                               "family's")
                left_out.append(reasons[-1])
                continue
            exc = lookup.exception()
            if isinstance(exc, ResolveError):
                reasons.append(f"{name}: {exc}")
                if not exc.no_address:
                    left_out.append(reasons[-1])
            elif exc is not None:
                raise exc
            else:
                out += [r for r in lookup.result() if r not in out]  # a mapped AAAA beside A
    finally:
        for lookup in lookups.values():
            if lookup.done() and not lookup.cancelled():
                lookup.exception()  # retrieved: one left out must not be reported unretrieved
            lookup.cancel()  # the lookup itself is shared: it goes on, and is cached
    if not out:
        raise ResolveError(f"no address for {host!r} ({'; '.join(reasons)})")
    if left_out and log is not None:
        log(f"resolve {host}: {'; '.join(left_out)}: any such addresses are not probed")
    return out


def _unmapped(resolved: Resolved) -> Resolved:
    """IPv4 carried as IPv6 (an AAAA record of ::ffff:a.b.c.d) is IPv4, as for a literal
    target: replies come from the IPv4 address, and a group counts the server once."""
    if resolved.family != socket.AF_INET6:
        return resolved
    try:
        ip = ip_address(resolved.address.split("%", 1)[0])
    except ValueError:
        return resolved
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return resolved if mapped is None else Resolved(str(mapped), socket.AF_INET, resolved.cached)


@functools.lru_cache(maxsize=4096)
def literal(host: str) -> Resolved | None:
    """An IP literal as a :class:`Resolved` (an IPv4-mapped one as its IPv4 address), else
    None. Cached: scrapes repeat the same targets, and parsing an address is not free."""
    try:
        ip = ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        # IPv4 carried as IPv6 is IPv4, as Go (blackbox) reads it: probe_ip_protocol 4, and
        # a module without fallback to IPv4 does not probe it.
        return Resolved(str(ip.ipv4_mapped), socket.AF_INET, cached=False)
    return Resolved(host, socket.AF_INET6 if ip.version == 6 else socket.AF_INET, cached=False)


def literal_of(host: str, preferred: str, fallback: bool) -> Resolved | None:
    """:func:`literal` under a module's family: an address of the other family without
    fallback is no address (:class:`ResolveError`), as blackbox ("unable to find ip; no
    fallback")."""
    resolved = literal(host)
    if resolved is not None and not fallback and resolved.family != FAMILIES[preferred]:
        raise ResolveError(f"{host} is not an {preferred} address, and ip_protocol_fallback "
                           "is off (the module probes that family only)", no_address=True)
    return resolved


_default: Resolver | None = None


def default_resolver() -> Resolver:
    """The process-wide resolver (created on first use)."""
    global _default
    if _default is None:
        _default = Resolver()
    return _default


async def resolve(host: str, preferred: str = "ip6", fallback: bool = True,
                  resolver: Resolver | None = None) -> Resolved:
    """Resolve ``host`` to one address, as blackbox's chooseProtocol picks it: the first of
    the preferred family, else (with fallback) the last of the other. An IPv4-mapped IPv6
    address is IPv4 (replies come from the IPv4 address), so a module that wants IPv6
    only never probes one.

    IP literals are used as given, but one of the other family without fallback (as in
    blackbox). Raises :class:`ResolveError` with the resolver's own words for why.
    """
    resolved = literal_of(host, preferred, fallback)
    if resolved is not None:
        return resolved
    resolver = resolver or default_resolver()
    family, other = _families(FAMILIES[preferred])
    # Without fallback only the preferred family is asked for, as blackbox asks. With it,
    # the other family too, unless the preferred one answers with an address first (from
    # the cache at once, else within OTHER_FAMILY_AFTER): a name whose other family's
    # query is lost then costs no resolver thread held for the C library's timeout. Once
    # the other family has answered, the preferred one gets OTHER_FAMILY_GRACE more: a
    # preferred query that is slow or lost does not hide the other family's answer.
    preferred_lookup = asyncio.ensure_future(_of_family(resolver, host, family))
    lookups = {family: preferred_lookup}
    try:
        if fallback:
            await asyncio.wait((preferred_lookup,), timeout=OTHER_FAMILY_AFTER)
            if not _has_family(preferred_lookup, family):
                other_lookup = lookups[other] = asyncio.ensure_future(
                    _of_family(resolver, host, other))
                await asyncio.wait((preferred_lookup, other_lookup),
                                   return_when=asyncio.FIRST_COMPLETED)
                if not preferred_lookup.done():
                    # The other family came first: with an address, the preferred one gets
                    # OTHER_FAMILY_GRACE more; without, it is the only hope, waited for.
                    grace = OTHER_FAMILY_GRACE if _has_family(other_lookup, other) else None
                    await asyncio.wait((preferred_lookup,), timeout=grace)
                if not _has_family(preferred_lookup, family):
                    await asyncio.wait((other_lookup,))  # the preferred one has none
        else:
            await asyncio.wait((preferred_lookup,))
        reasons, addresses = [], []
        for fam, lookup in lookups.items():
            name = "ip6" if fam == socket.AF_INET6 else "ip4"
            if not lookup.done():
                reasons.append(f"{name}: no answer {OTHER_FAMILY_GRACE:g}s after the other "
                               "family's")
                continue
            exc = lookup.exception()
            if isinstance(exc, ResolveError):
                reasons.append(f"{name}: {exc}")
                continue
            if exc is not None:
                raise exc
            found = lookup.result()
            chosen = next((r for r in found if r.family == family), None)
            if chosen is not None:
                return chosen
            addresses += found
    finally:
        for lookup in lookups.values():
            if lookup.done() and not lookup.cancelled():
                lookup.exception()  # taken: one not needed must not be reported unretrieved
            lookup.cancel()  # the lookup itself is shared: it goes on, and is cached
    if not addresses:
        raise ResolveError(f"no address for {host!r} ({'; '.join(reasons)})")
    if not fallback:
        raise ResolveError(f"no {preferred} address for {host!r} (ip_protocol_fallback is "
                           f"off; {len(addresses)} of the other family)")
    return addresses[-1]
