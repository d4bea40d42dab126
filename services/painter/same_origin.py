"""Whether a POST comes from the painter's own page: the browser's `Origin` (and, where it sends one,
`Sec-Fetch-Site`) must name the painter's public origin. Browsers send `Origin` on every POST (and
`Sec-Fetch-Site` to https origins), so a request with neither comes from no browser page and is refused too."""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlsplit

_DEFAULT_PORTS = {"http": 80, "https": 443}


def origin_of(url: str) -> str:
    """`scheme://host[:port]` of `url`, normalised (lower case, default port dropped); "" when it has none
    (e.g. the `null` origin browsers send from sandboxed or privacy-sensitive contexts)."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return ""
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    if scheme not in _DEFAULT_PORTS or not host:
        return ""
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}" if port in (None, _DEFAULT_PORTS[scheme]) else f"{scheme}://{host}:{port}"


def from_own_page(headers: Mapping[str, str], own_origin: str) -> bool:
    """True when the request says it comes from `own_origin` (an `origin_of` value) and nothing says otherwise."""
    site = headers.get("sec-fetch-site")
    sent = headers.get("origin")
    if site is None and sent is None:
        return False
    if site is not None and site.strip().lower() != "same-origin":
        return False
    return sent is None or (own_origin != "" and origin_of(sent) == own_origin)
