"""The URL fetching policy (`services.url_fetch`) over real loopback servers: addresses refused in every spelling
before any connection, redirects checked hop by hop, the address connected to is the one checked, the total
deadline and the byte cap, the allow-list and the "only these hosts" mode, one public error text."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import AsyncIterator, Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.images import ImageInputError, IntakeLimits, fetch_source
from services.url_fetch import (
    FAL_CDN_HOSTS,
    PUBLIC_MESSAGE,
    STRICT,
    FetchError,
    FetchPolicy,
    FetchTooLarge,
    HostList,
    Resolver,
    address_problem,
    fetch_policy,
    fetch_url,
    result_policy,
)
from tests.helpers.raw_http import RawServer, body_answer, head, redirect_answer

BODY = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
CAP = 64 * 1024


@pytest.fixture
async def target() -> AsyncIterator[RawServer]:
    """A server that must never be reached when a download is refused."""
    async with RawServer(body_answer(BODY)) as server:
        yield server


def _trusting(server: RawServer) -> FetchPolicy:
    """A policy that trusts only this one server (host and port), as an operator's FETCH_ALLOW would."""
    return fetch_policy([f"127.0.0.1:{server.port}"])


def _resolver(table: dict[str, Sequence[str]]) -> tuple[list[str], Resolver]:
    """A resolver answering from `table` (an address literal as itself; gaierror for other names), recording each
    name it was asked: no test asks the real DNS."""
    asked: list[str] = []

    async def resolve(host: str, port: int) -> list[str]:
        asked.append(host)
        if host in table:
            return list(table[host])
        try:
            return [str(ipaddress.ip_address(host))]
        except ValueError:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known") from None
    return asked, resolve


# --- addresses --------------------------------------------------------------------------------------------

LOOPBACK_SPELLINGS = ["127.0.0.1", "127.1", "127.0.1", "0x7f000001", "0x7f.1", "2130706433", "017700000001",
                      "0177.0.0.1", "0.0.0.0", "0", "localhost", "[::1]", "[::]", "[::ffff:127.0.0.1]",
                      "[0:0:0:0:0:ffff:7f00:1]", "[::ffff:7f00:1]", "[::127.0.0.1]", "[64:ff9b::7f00:1]",
                      "[2002:7f00:1::1]", "127。0。0。1", "127.0.0.1.", "LOCALHOST"]


@pytest.mark.parametrize("host", LOOPBACK_SPELLINGS)
async def test_loopback_in_every_spelling_is_refused_before_connecting(target: RawServer, host: str) -> None:
    with pytest.raises(FetchError) as info:
        await fetch_url(f"http://{host}:{target.port}/x.png", max_bytes=CAP, deadline_s=5)
    assert not isinstance(info.value, FetchTooLarge)
    assert target.connections == 0 and target.requests == []


@pytest.mark.parametrize("address", [
    "10.0.0.1", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "192.0.0.8", "192.0.2.1",
    "198.18.0.1", "224.0.0.1", "239.255.255.250", "240.0.0.1", "255.255.255.255", "0.0.0.0", "::", "::1",
    "fe80::1", "fe80::1%1", "fc00::1", "fd12:3456::1", "fec0::1", "ff02::1", "2001:db8::1", "2001::1", "::7f00:1",
    "::ffff:10.0.0.1", "::ffff:169.254.169.254", "64:ff9b::a00:1", "2002:c0a8:101::1", "100::1"])
def test_non_public_addresses_are_refused(address: str) -> None:
    assert address_problem(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize("address", ["1.1.1.1", "93.184.216.34", "2606:4700::1111", "::ffff:1.1.1.1",
                                     "64:ff9b::101:101", "2002:101:101::1"])
def test_public_addresses_are_accepted(address: str) -> None:
    assert address_problem(ipaddress.ip_address(address)) is None


async def test_a_name_resolving_to_loopback_or_to_one_bad_address_among_good_ones_is_refused(
        target: RawServer) -> None:
    asked, resolve = _resolver({"evil.test": ["127.0.0.1"], "mixed.test": ["93.184.216.34", "10.1.2.3"]})
    policy = FetchPolicy(resolver=resolve)
    for name in ("evil.test", "mixed.test"):
        with pytest.raises(FetchError, match="address"):
            await fetch_url(f"http://{name}:{target.port}/x.png", policy=policy, max_bytes=CAP, deadline_s=5)
    assert asked == ["evil.test", "mixed.test"] and target.connections == 0


async def test_the_connection_goes_to_the_address_that_was_checked(target: RawServer) -> None:
    """A rebinding name answers an allowed address first and loopback after: only the first lookup is made, and
    its address is the one connected to (nothing listens on 127.0.0.2, so the download fails), never loopback."""
    answers = iter([["127.0.0.2"], ["127.0.0.1"]])
    asked: list[str] = []

    async def rebinding(host: str, port: int) -> list[str]:
        asked.append(host)
        return next(answers)

    policy = FetchPolicy(allow=HostList.parse("127.0.0.2"), resolver=rebinding)
    with pytest.raises(FetchError):
        await fetch_url(f"http://rebind.test:{target.port}/x.png", policy=policy, max_bytes=CAP, deadline_s=5)
    assert asked == ["rebind.test"] and target.connections == 0


# --- the allow-list and the only-these-hosts mode ---------------------------------------------------------

async def test_the_operator_allow_list_trusts_names_networks_and_ports(target: RawServer) -> None:
    url = f"{target.base_url}/x.png"
    assert await fetch_url(url, policy=fetch_policy("127.0.0.0/8"), max_bytes=CAP, deadline_s=5) == BODY
    assert await fetch_url(url, policy=_trusting(target), max_bytes=CAP, deadline_s=5) == BODY
    _, resolve = _resolver({"images.internal": ["127.0.0.1"]})
    by_name = fetch_policy("*.internal, other.example", resolver=resolve)
    assert await fetch_url(f"http://images.internal:{target.port}/x.png", policy=by_name, max_bytes=CAP,
                           deadline_s=5) == BODY
    with pytest.raises(FetchError):  # the right host, another port
        await fetch_url(f"http://127.0.0.1:{target.port + 1 if target.port < 65535 else 1}/",
                        policy=_trusting(target), max_bytes=CAP, deadline_s=5)
    with pytest.raises(FetchError):  # the default policy trusts nothing
        await fetch_url(url, max_bytes=CAP, deadline_s=5)
    assert len(target.requests) == 3


@pytest.mark.parametrize("entry", ["http://x.example/", "a b", "10.0.0.0/33", "user@host", "host/path", "*.", "-a.b",
                                   "a..b", "host:99999", "[::1"])
def test_a_bad_allow_list_entry_is_an_error(entry: str) -> None:
    with pytest.raises(ValueError, match="not a host name"):
        HostList.parse(entry)


def test_host_patterns() -> None:
    cdn = HostList.parse(FAL_CDN_HOSTS)
    assert all(cdn.has_host(h, 443) for h in ("fal.media", "v3.fal.media", "V3B.FAL.MEDIA", "v3.fal.media."))
    assert not any(cdn.has_host(h, 443) for h in ("evilfal.media", "fal.media.evil.test", "fal.run"))
    wildcard_only = HostList.parse("*.example.com")
    assert wildcard_only.has_host("a.b.example.com", 80) and not wildcard_only.has_host("example.com", 80)
    with_port = HostList.parse("worker:8000, [::1]:9000")
    assert with_port.has_host("worker", 8000) and not with_port.has_host("worker", 8001)
    assert with_port.has_host("::1", 9000) and not with_port.has_host("::1", 80)


async def test_results_come_only_from_the_backend_and_the_listed_hosts(target: RawServer) -> None:
    async with RawServer(body_answer(b"result")) as backend, \
            RawServer(redirect_answer(f"{target.base_url}/x.png")) as bouncing_backend:
        policy = result_policy(backend.base_url, result_hosts=())
        assert await fetch_url(f"{backend.base_url}/files/r/0.png", policy=policy, max_bytes=CAP,
                               deadline_s=5) == b"result"
        with pytest.raises(FetchError, match="not one this download may use"):  # another origin, same address
            await fetch_url(f"{target.base_url}/x.png", policy=policy, max_bytes=CAP, deadline_s=5)
        bounce = result_policy(bouncing_backend.base_url, result_hosts=())
        with pytest.raises(FetchError, match="not one this download may use"):  # nor by a redirect
            await fetch_url(f"{bouncing_backend.base_url}/files/r/0.png", policy=bounce, max_bytes=CAP,
                            deadline_s=5)
        # a listed result host is still held to public addresses, unless FETCH_ALLOW trusts it too
        _, resolve = _resolver({"cdn.test": ["127.0.0.1"]})
        listed = result_policy(backend.base_url, result_hosts="cdn.test", resolver=resolve)
        with pytest.raises(FetchError, match="loopback"):
            await fetch_url(f"http://cdn.test:{target.port}/x.png", policy=listed, max_bytes=CAP, deadline_s=5)
        trusted = result_policy(backend.base_url, result_hosts="cdn.test", allow="cdn.test",
                                resolver=resolve)
        assert await fetch_url(f"http://cdn.test:{target.port}/x.png", policy=trusted, max_bytes=CAP,
                               deadline_s=5) == BODY
    assert target.requests == ["GET /x.png HTTP/1.1"]


# --- redirects ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("location", ["http://127.0.0.1:{port}/x.png", "http://2130706433:{port}/x.png",
                                      "http://[::ffff:127.0.0.1]:{port}/x.png", "http://localhost:{port}/x.png",
                                      "//127.1:{port}/x.png", "ftp://127.0.0.1:{port}/x.png",
                                      "file:///etc/passwd", "http://user:pw@example.com/"])
async def test_every_redirect_is_checked(target: RawServer, location: str) -> None:
    async with RawServer(redirect_answer(location.format(port=target.port))) as bouncer:
        with pytest.raises(FetchError):
            await fetch_url(f"{bouncer.base_url}/a", policy=_trusting(bouncer), max_bytes=CAP, deadline_s=5)
        assert bouncer.requests == ["GET /a HTTP/1.1"]
    assert target.connections == 0


async def test_redirects_are_followed_up_to_the_limit() -> None:
    async def hops(path: str, writer: asyncio.StreamWriter) -> None:
        n = int(path.strip("/"))
        if n == 0:
            writer.write(head("200 OK", {"Content-Length": "4"}) + b"done")
        else:
            writer.write(head("307 Temporary Redirect", {"Location": f"/{n - 1}", "Content-Length": "0"}))

    async with RawServer(hops) as server:
        policy = _trusting(server)
        assert await fetch_url(f"{server.base_url}/5", policy=policy, max_bytes=CAP, deadline_s=5) == b"done"
        with pytest.raises(FetchError, match="redirects"):
            await fetch_url(f"{server.base_url}/6", policy=policy, max_bytes=CAP, deadline_s=5)
        assert len(server.requests) == 6 + 6


# --- deadline and size ------------------------------------------------------------------------------------

async def test_a_trickling_server_fails_at_the_total_deadline() -> None:
    """One byte every 50 ms of a declared 1000: each read is quick, the whole would take 50 s. A per-read timeout
    would wait it out and succeed; the total deadline ends it at 0.5 s."""
    async def trickle(path: str, writer: asyncio.StreamWriter) -> None:
        writer.write(head("200 OK", {"Content-Length": "1000"}))
        for _ in range(1000):
            writer.write(b"x")
            await writer.drain()
            await asyncio.sleep(0.05)

    async with RawServer(trickle) as server:
        with pytest.raises(FetchError, match="deadline"):
            await fetch_url(f"{server.base_url}/slow", policy=_trusting(server), max_bytes=CAP, deadline_s=0.5)


async def test_a_server_that_never_answers_fails_at_the_deadline() -> None:
    async def silent(path: str, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(3600)

    async with RawServer(silent) as server:
        with pytest.raises(FetchError, match="deadline"):
            await fetch_url(f"{server.base_url}/", policy=_trusting(server), max_bytes=CAP, deadline_s=0.3)


async def test_the_byte_cap_holds_whatever_the_server_declares() -> None:
    sent: list[int] = []

    async def huge_declared(path: str, writer: asyncio.StreamWriter) -> None:
        writer.write(head("200 OK", {"Content-Length": str(10**12)}))
        for _ in range(100):
            writer.write(b"\0" * 65536)
            await writer.drain()
            sent.append(65536)

    async def undeclared(path: str, writer: asyncio.StreamWriter) -> None:  # read until close, no length
        writer.write(head("200 OK", {}))
        for _ in range(100):
            writer.write(b"\0" * 65536)
            await writer.drain()

    async def chunked(path: str, writer: asyncio.StreamWriter) -> None:
        writer.write(head("200 OK", {"Transfer-Encoding": "chunked"}))
        for _ in range(100):
            writer.write(b"10000\r\n" + b"\0" * 65536 + b"\r\n")
            await writer.drain()
        writer.write(b"0\r\n\r\n")

    for answer in (huge_declared, undeclared, chunked):
        async with RawServer(answer) as server:
            with pytest.raises(FetchTooLarge):
                await fetch_url(f"{server.base_url}/big", policy=_trusting(server), max_bytes=CAP, deadline_s=10)


async def test_a_lying_content_length_never_yields_more_than_it_declared_nor_a_short_body() -> None:
    async def longer_than_declared(path: str, writer: asyncio.StreamWriter) -> None:
        writer.write(head("200 OK", {"Content-Length": "10"}) + b"\0" * (4 * CAP))

    async def shorter_than_declared(path: str, writer: asyncio.StreamWriter) -> None:
        writer.write(head("200 OK", {"Content-Length": "1000"}) + b"\0" * 10)

    async with RawServer(longer_than_declared) as server:
        assert await fetch_url(server.base_url, policy=_trusting(server), max_bytes=CAP, deadline_s=5) == b"\0" * 10
    async with RawServer(shorter_than_declared) as server:
        with pytest.raises(FetchError):
            await fetch_url(server.base_url, policy=_trusting(server), max_bytes=CAP, deadline_s=5)


# --- one public message, the cause in the log -------------------------------------------------------------

async def test_every_failure_reads_the_same_to_the_user_and_the_log_has_the_cause(
        target: RawServer, caplog: pytest.LogCaptureFixture) -> None:
    async def not_found(path: str, writer: asyncio.StreamWriter) -> None:
        writer.write(head("404 Not Found", {"Content-Length": "0"}))

    async def silent(path: str, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(3600)

    limits = IntakeLimits(max_bytes=CAP, download_timeout_s=0.3)
    async with RawServer(not_found) as missing, RawServer(silent) as slow:
        _, resolve = _resolver({})
        trusted = fetch_policy(["127.0.0.1"], resolver=resolve)
        cases = {
            "loopback": (f"{target.base_url}/x.png?token=secret-token", STRICT),
            "does not resolve": ("http://nowhere.test/x.png", trusted),
            "HTTP 404": (f"{missing.base_url}/x.png", trusted),
            "ConnectError": ("http://127.0.0.1:9/x.png", trusted),  # nothing listens
            "deadline": (f"{slow.base_url}/x.png", trusted),
        }
        with caplog.at_level(logging.INFO, logger="services.url_fetch"):
            for cause, (url, policy) in cases.items():
                caplog.clear()
                with pytest.raises(ImageInputError) as info:
                    await fetch_source(url, limits=limits, policy=policy, role="mask")
                assert (info.value.code, info.value.message, info.value.role) == (
                    "download_failed", PUBLIC_MESSAGE, "mask")
                assert cause in caplog.text and "secret-token" not in caplog.text and "/x.png" not in caplog.text
    assert target.connections == 0


async def test_too_large_is_the_one_failure_told_apart() -> None:
    async with RawServer(body_answer(BODY)) as server:
        with pytest.raises(ImageInputError) as info:
            await fetch_source(f"{server.base_url}/x.png", limits=IntakeLimits(max_bytes=100),
                               policy=_trusting(server))
    assert info.value.code == "too_many_bytes"


# --- fuzz: any string into the fetch path ------------------------------------------------------------------

_NO_NETWORK = FetchPolicy(resolver=_resolver({})[1])
_URLISH = st.one_of(
    st.text(),
    st.builds(lambda scheme, rest: scheme + rest,
              st.sampled_from(["http://", "https://", "HTTP://", "http:", "data:", "data:image/png;base64,"]),
              st.text()),
    st.builds(lambda host, rest: f"http://{host}{rest}",
              st.sampled_from(["127.0.0.1", "[::1]", "0x7f000001", "example.test", "[", "a@b", "%00", ""]),
              st.text()),
)


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(url=_URLISH)
async def test_any_string_into_the_fetch_path_is_an_image_error_or_bytes(url: str) -> None:
    error: ImageInputError | None = None
    try:
        await fetch_source(url, limits=IntakeLimits(max_bytes=CAP, download_timeout_s=2), policy=_NO_NETWORK)
    except ImageInputError as exc:
        error = exc
    if error is not None:
        assert error.code in ("bad_source", "download_failed", "too_many_bytes")
        assert error.code != "download_failed" or error.message == PUBLIC_MESSAGE
