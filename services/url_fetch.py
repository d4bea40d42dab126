"""Downloading a URL that someone else chose (a user's image link, a backend's result URL): one policy for the bot
and the worker, so neither can be used to reach what only it can reach (server-side request forgery).

What a download may do (`FetchPolicy`):

- `http`/`https` only, no credentials in the URL, at most `max_redirects` redirects, each one checked like the
  first URL (by us: redirects are never followed blindly);
- the host name is resolved and every address it resolves to must be a public one: loopback, private, shared
  (CGNAT), link-local, multicast, reserved, unspecified and site-local addresses are refused, IPv4 and IPv6 alike,
  with IPv4-mapped, IPv4-compatible, 6to4 and NAT64 (64:ff9b::/96) addresses judged by the IPv4 address inside.
  Odd spellings (`127.1`, `0x7f000001`, `2130706433`, `[::ffff:127.0.0.1]`, …) are no way around it: the address
  judged is the one the system resolver turns the name into, the same one the connection then uses;
- the operator's `allow` list (host names, `*.suffix` wildcards, `host:port`, IP addresses and CIDR networks) is
  trusted: a listed name may resolve to any address, an address inside a listed network is accepted;
- `only_hosts`, when set, limits every URL of the download (redirects included) to those hosts: how the bot takes
  a backend's result images only from the backend's own origin and the hosts the operator lists (`result_policy`).

No DNS rebinding: the check happens where the connection is made. Each download has its own httpcore connection
pool whose network backend (`_CheckedBackend`) resolves the name, judges every address and connects the socket to
one of those very addresses; nothing else ever opens a connection, so no second lookup can answer differently.
TLS is untouched by this: the pool still knows the host by its name, so SNI and the certificate check use the name,
as they would for any client (no IP-in-the-URL tricks, no connection shared between names).

A download has one total deadline (`deadline_s`, from the first lookup to the last byte: a server that trickles
one byte a second fails at the deadline, not never) and a byte cap (the declared `Content-Length` and the bytes
actually read).

Errors: every failure is a `FetchError` whose `str()` is the precise cause, for the log (never with the URL's path
or query, which may carry tokens); what a user or a client is told is `PUBLIC_MESSAGE` whatever the cause, so an
answer can't tell an open port from a closed one or a refused address from a name that doesn't resolve. Only a
file over the cap (`FetchTooLarge`) is told apart: that can only happen on a server the policy allowed.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import re
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field

import httpcore
import httpx

log = logging.getLogger(__name__)

#: what a user (the bot) or a client (the worker's 422) is told, whatever went wrong
PUBLIC_MESSAGE = "That link could not be downloaded."
DEFAULT_MAX_REDIRECTS = 5
#: where hosted fal serves result files (https://docs.fal.ai/documentation/model-apis/fal-cdn: `fal.media`,
#: `v3.fal.media`, `v3b.fal.media`, …): the bot's default `RESULT_HOSTS`
FAL_CDN_HOSTS: tuple[str, ...] = ("fal.media", "*.fal.media")
_HOST_NAME = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)(\.(?!-)[a-z0-9_-]{1,63}(?<!-))*$")
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_HEADERS = [(b"Accept", b"image/*, */*;q=0.5"), (b"Accept-Encoding", b"identity"), (b"User-Agent", b"inpaint-bot")]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
#: (host, port) → the addresses it resolves to, as strings
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
#: not globally reachable (IANA's special-purpose registries) but not in Python 3.11's `is_private` either
_ALSO_NOT_GLOBAL: tuple[IPNetwork, ...] = tuple(ipaddress.ip_network(n) for n in (
    "192.0.0.0/24", "64:ff9b:1::/48", "3fff::/20", "5f00::/16"))


class FetchError(Exception):
    """A download that didn't happen. `str()` is the precise cause, for the log; `PUBLIC_MESSAGE` is what to say."""


class FetchTooLarge(FetchError):
    """The file is larger than the byte cap (declared or read)."""


# --- host lists -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HostPattern:
    """A host name (IDNA, lower case, no trailing dot), optionally `*.` a wildcard for its subdomains (not the
    name itself), optionally with a port (any port when None)."""

    host: str
    wildcard: bool = False
    port: int | None = None

    def matches(self, host: str, port: int) -> bool:
        if self.port is not None and port != self.port:
            return False
        host = _normalise_host(host)
        return host.endswith("." + self.host) if self.wildcard else host == self.host


@dataclass(frozen=True)
class HostList:
    """Hosts (`HostPattern`) and networks: an operator's allow-list, or the hosts a download is limited to."""

    hosts: tuple[HostPattern, ...] = ()
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, entries: str | Iterable[str]) -> HostList:
        """Entries (a comma-separated string or an iterable): `example.com`, `*.example.com`, `example.com:8443`,
        `10.0.0.5`, `10.0.0.0/8`, `fd00::/8`, `[::1]:8000`. Raises ValueError naming a bad entry."""
        items = entries.split(",") if isinstance(entries, str) else entries
        hosts: list[HostPattern] = []
        networks: list[IPNetwork] = []
        for raw in items:
            entry = raw.strip()
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
                continue
            except ValueError:
                pass
            hosts.append(_host_pattern(entry))
        return cls(tuple(hosts), tuple(networks))

    @classmethod
    def origin(cls, url: str) -> HostList:
        """The host and port of `url` (its scheme's default port when it names none)."""
        parsed = httpx.URL(url)
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        return cls((HostPattern(_normalise_host(parsed.raw_host.decode("ascii")), port=port),))

    def __or__(self, other: HostList) -> HostList:
        return HostList(self.hosts + other.hosts, self.networks + other.networks)

    def __bool__(self) -> bool:
        return bool(self.hosts or self.networks)

    def has_host(self, host: str, port: int) -> bool:
        """Whether `host` (as a URL names it) is listed by name, or is an address literal inside a listed network."""
        if any(p.matches(host, port) for p in self.hosts):
            return True
        literal = _ip_literal(host)
        return literal is not None and self.has_address(literal)

    def has_address(self, ip: IPAddress) -> bool:
        return any(ip.version == net.version and ip in net for net in self.networks)


def host_list_setting(value: object) -> object:
    """A settings validator (mode "before") for a host-list setting such as FETCH_ALLOW: a comma-separated string
    becomes a list of entries, each of which must parse (`HostList.parse`), so a typo fails at start, not later."""
    entries = [e.strip() for e in value.split(",") if e.strip()] if isinstance(value, str) else value
    if isinstance(entries, (list, tuple)):
        HostList.parse(str(e) for e in entries)
    return entries


def _host_pattern(entry: str) -> HostPattern:
    wildcard = entry.startswith("*.")
    try:
        parsed = httpx.URL("http://" + entry.removeprefix("*.") + "/")
        host = _normalise_host(parsed.raw_host.decode("ascii"))
    except (httpx.InvalidURL, UnicodeError) as exc:
        raise ValueError(f"{entry!r} is not a host name, host:port, IP address or network") from exc
    if (parsed.userinfo or parsed.raw_path != b"/" or not (_HOST_NAME.match(host) or _ip_literal(host))
            or not 0 < (parsed.port or 80) < 65536):
        raise ValueError(f"{entry!r} is not a host name, host:port, IP address or network")
    return HostPattern(host, wildcard, parsed.port)


def _normalise_host(host: str) -> str:
    return host.lower().rstrip(".").strip("[]")


def _ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(_normalise_host(host))
    except ValueError:
        return None


# --- addresses ------------------------------------------------------------------------------------------

def address_problem(ip: IPAddress) -> str | None:
    """Why a download must not connect to `ip` (e.g. "loopback"), or None for a public address."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            ip = ipaddress.IPv6Address(str(ip).partition("%")[0])
        if ip.ipv4_mapped is not None:
            return _inner("IPv4-mapped", ip.ipv4_mapped)
        if ip in _NAT64:
            return _inner("NAT64", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if ip.sixtofour is not None:
            return _inner("6to4", ip.sixtofour)
        if ip in _IPV4_COMPATIBLE and not (ip.is_unspecified or ip.is_loopback):
            return "IPv4-compatible"
        if ip.is_site_local:
            return "site-local"
    for kind in ("unspecified", "loopback", "link_local", "multicast", "private", "reserved"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    if not ip.is_global or any(ip.version == net.version and ip in net for net in _ALSO_NOT_GLOBAL):
        return "non-global"
    return None


def _inner(kind: str, ip: ipaddress.IPv4Address) -> str | None:
    problem = address_problem(ip)
    return f"{kind} {problem}" if problem else None


async def system_resolver(host: str, port: int) -> list[str]:
    """The addresses the system resolver gives for `host` (also how odd IPv4 spellings become addresses)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


# --- the policy -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FetchPolicy:
    """What a download may reach (see the module's docstring). The default is the strict one: public addresses
    only, any host."""

    allow: HostList = field(default_factory=HostList)
    only_hosts: HostList | None = None
    max_redirects: int = DEFAULT_MAX_REDIRECTS
    resolver: Resolver = system_resolver

    def check_url(self, url: httpx.URL) -> None:
        """Refuse a URL by its form: scheme, credentials, and the hosts the download is limited to."""
        if url.scheme not in ("http", "https"):
            raise FetchError(f"scheme {url.scheme!r} is not http(s)")
        if url.userinfo:
            raise FetchError("credentials in the URL")
        host = url.raw_host.decode("ascii")
        if not host:
            raise FetchError("no host")
        if self.only_hosts is not None and not self.only_hosts.has_host(host, _port(url)):
            raise FetchError(f"host {host!r} is not one this download may use")

    async def addresses(self, host: str, port: int) -> list[str]:
        """The addresses to connect to for `host`: all it resolves to, each one allowed, else `FetchError`."""
        try:
            resolved = list(dict.fromkeys(await self.resolver(host, port)))
        except (OSError, UnicodeError) as exc:
            raise FetchError(f"{host!r} does not resolve ({type(exc).__name__}: {exc})") from exc
        if not resolved:
            raise FetchError(f"{host!r} resolves to nothing")
        if self.allow.has_host(host, port):
            return resolved
        for text in resolved:
            try:
                ip = ipaddress.ip_address(text)
            except ValueError as exc:
                raise FetchError(f"{host!r} resolved to {text!r}, not an address") from exc
            problem = None if self.allow.has_address(ip) else address_problem(ip)
            if problem:
                raise FetchError(f"{host!r} resolves to a {problem} address ({ip})")
        return resolved


#: public addresses only, any host, nothing trusted
STRICT = FetchPolicy()


def fetch_policy(allow: str | Iterable[str] = (), *, resolver: Resolver = system_resolver) -> FetchPolicy:
    """The policy for fetching what users send (image links): public addresses, plus what the operator allows."""
    return FetchPolicy(allow=HostList.parse(allow), resolver=resolver)


def result_policy(backend_url: str, *, result_hosts: str | Iterable[str] = FAL_CDN_HOSTS,
                  allow: str | Iterable[str] = (), resolver: Resolver = system_resolver) -> FetchPolicy:
    """The policy for downloading a backend's result images: only from the backend's own origin (scheme's host
    and port, trusted at any address: the operator configured it, a worker is often on a private network or
    loopback) or a host in `result_hosts` (by default hosted fal's CDN, `FAL_CDN_HOSTS`), those at public
    addresses unless the operator's `allow` list trusts them too."""
    own = HostList.origin(backend_url)
    trusted = HostList.parse(allow)
    return FetchPolicy(allow=trusted | own, only_hosts=own | HostList.parse(result_hosts), resolver=resolver)


# --- the download ---------------------------------------------------------------------------------------

async def fetch_url(url: str, *, policy: FetchPolicy = STRICT, max_bytes: int, deadline_s: float) -> bytes:
    """The body of `url` (status 200), following at most `policy.max_redirects` redirects, each checked.

    Raises `FetchTooLarge` past `max_bytes`, `FetchError` for anything else (refused, unreachable, an HTTP error,
    past `deadline_s` in all); the cause is logged here, without the URL's path or query.
    """
    where = _origin_for_log(url)
    try:
        async with asyncio.timeout(deadline_s):
            return await _fetch(url, policy, max_bytes, deadline_s)
    except TimeoutError:
        cause: FetchError = FetchError(f"not done within the {deadline_s:g} s deadline")
    except FetchError as exc:
        cause = exc
    except (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol,
            OSError, ssl.SSLError, ValueError) as exc:  # ValueError: what the HTTP parser refuses (h11, httpcore)
        cause = FetchError(f"{type(exc).__name__}: {exc}")
    log.info("download from %s failed: %s", where, cause)
    raise cause


async def _fetch(url: str, policy: FetchPolicy, max_bytes: int, deadline_s: float) -> bytes:
    try:
        current = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, UnicodeError) as exc:
        raise FetchError(f"not a valid URL ({exc})") from exc
    timeouts = {"connect": deadline_s, "read": deadline_s, "write": deadline_s, "pool": deadline_s}
    async with httpcore.AsyncConnectionPool(ssl_context=_ssl_context(), network_backend=_CheckedBackend(policy),
                                            max_connections=1) as pool:
        for _ in range(policy.max_redirects + 1):
            policy.check_url(current)
            target = httpcore.URL(scheme=current.raw_scheme, host=current.raw_host, port=current.port,
                                  target=current.raw_path)
            async with pool.stream("GET", target, headers=_HEADERS, extensions={"timeout": timeouts}) as resp:
                if resp.status in _REDIRECTS:
                    current = _redirect_target(current, resp.headers)
                    continue
                if resp.status != 200:
                    raise FetchError(f"HTTP {resp.status}")
                return await _read_body(resp, max_bytes)
    raise FetchError(f"more than {policy.max_redirects} redirects")


def _redirect_target(current: httpx.URL, headers: list[tuple[bytes, bytes]]) -> httpx.URL:
    location = _header(headers, b"location")
    if location is None:
        raise FetchError("a redirect without a Location")
    try:
        return current.join(location.decode("latin-1"))
    except (httpx.InvalidURL, UnicodeError) as exc:
        raise FetchError(f"a redirect to an invalid URL ({exc})") from exc


async def _read_body(resp: httpcore.Response, max_bytes: int) -> bytes:
    encoding = _header(resp.headers, b"content-encoding")
    if encoding is not None and encoding.strip().lower() not in (b"", b"identity"):
        raise FetchError(f"an encoded body ({encoding.decode('latin-1')!r}) although identity was asked for")
    declared = _header(resp.headers, b"content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > max_bytes:
        raise FetchTooLarge(f"Content-Length {int(declared)} is over the cap of {max_bytes} bytes")
    chunks: list[bytes] = []
    total = 0
    async for chunk in resp.aiter_stream():
        total += len(chunk)
        if total > max_bytes:
            raise FetchTooLarge(f"more than the cap of {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    return next((value for key, value in headers if key.lower() == name), None)


def _port(url: httpx.URL) -> int:
    return url.port or (443 if url.scheme == "https" else 80)


def _origin_for_log(url: str) -> str:
    """`scheme://host:port` of a URL, or a placeholder: never its credentials, path or query."""
    try:
        parsed = httpx.URL(url)
        return f"{parsed.scheme}://{parsed.host}:{_port(parsed)}" if parsed.host else "(a URL without a host)"
    except (httpx.InvalidURL, TypeError, UnicodeError):
        return "(an invalid URL)"


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    """httpx's default TLS context (certifi's roots, or SSL_CERT_FILE): built once, as it costs ~50 ms, and never
    changed afterwards."""
    return httpx.create_ssl_context()


class _CheckedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend with the policy in front: every TCP connection is made to an address the policy
    has just approved for that host name (tried in the resolver's order)."""

    def __init__(self, policy: FetchPolicy) -> None:
        self._policy = policy
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,  # noqa: ASYNC109
                          local_address: str | None = None,
                          socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
                          ) -> httpcore.AsyncNetworkStream:
        failure: Exception | None = None
        for address in await self._policy.addresses(host, port):
            try:
                return await self._inner.connect_tcp(address, port, timeout=timeout, local_address=local_address,
                                                     socket_options=socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None
        raise failure

    async def connect_unix_socket(self, path: str, timeout: float | None = None,  # noqa: ASYNC109
                                  socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
                                  ) -> httpcore.AsyncNetworkStream:
        raise FetchError("unix sockets are never used for downloads")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)
