"""Which image URLs a scraper must not fetch, decided from the URL alone (no DNS lookups).

Curate drops these rows with a reason, and download checks them again before each request (and
after each redirect). A crawler running in a cloud that fetched ``http://169.254.169.254/`` would
hand its instance credentials to whoever wrote the page, so the rule is strict by default:

- ``bad_url``: not http(s), no host, a malformed port or IPv6 literal, a host that is not a
  valid name.
- ``private_host``: loopback, RFC 1918, link-local (169.254.0.0/16, the metadata address
  included), carrier-grade NAT, unique-local and other non-global IPv6, unspecified addresses;
  IPv4 written the odd ways ``inet_aton`` accepts (``127.1``, ``2130706433``, ``0x7f.0.0.1``),
  which HTTP clients resolve without DNS; the names ``localhost``, ``*.localhost``, ``*.local``,
  ``*.internal``, ``*.localdomain``, ``*.home.arpa``, cloud metadata names, and single-label
  names, which the resolver's search domains turn into hosts of the local network.
- ``literal_ip``: a public IP literal. Real sites name their image hosts; a bare IP is mostly
  spam or a scanner target, and it sidesteps per-host politeness, so it is dropped too.

``allow_private=True`` (``--allow-private-hosts``) lets all of these hosts through: the demo and
the tests serve their web on 127.0.0.1. It does not let ``bad_url`` through.

A DNS name that resolves to a private address is not caught here (that needs the lookup);
download must check the address it connects to.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
from urllib.parse import urlsplit

BAD_URL = "bad_url"
PRIVATE_HOST = "private_host"
LITERAL_IP = "literal_ip"
REASONS = (BAD_URL, PRIVATE_HOST, LITERAL_IP)

PRIVATE_SUFFIXES = (".localhost", ".local", ".internal", ".localdomain", ".home.arpa", ".intranet", ".lan")
# Names the clouds' instance metadata services answer to, besides their link-local addresses.
METADATA_HOSTS = frozenset(
    {
        "localhost",
        "metadata",
        "metadata.google.internal",
        "metadata.goog",
        "instance-data",
        "instance-data.ec2.internal",
        "metadata.azure.internal",
        "metadata.tencentyun.com",
        "100-100-100-200.aliyun",
    }
)
# What inet_aton (and so most HTTP clients) reads as an IPv4 address: 1 to 4 parts, each decimal,
# octal (leading 0) or hex (0x).
_NUMERIC_HOST = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)(?:\.(?:0x[0-9a-f]*|[0-9]+)){0,3}\.?$")
_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")


def host_problem(url: str, allow_private: bool = False) -> str | None:
    """Why ``url`` must not be fetched (one of :data:`REASONS`), or None when it may be."""
    try:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        host = parts.hostname  # lower-cased, brackets of an IPv6 literal removed
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError:
        return BAD_URL
    if scheme not in ("http", "https") or not host:
        return BAD_URL
    return _host_kind(host, allow_private)


@functools.lru_cache(maxsize=65536)
def _host_kind(host: str, allow_private: bool) -> str | None:
    # Cached by host: a crawl has far fewer hosts than URLs.
    ip = _as_ip(host)
    if ip is _INVALID:
        return BAD_URL
    if ip is not None:
        if allow_private:
            return None
        return LITERAL_IP if ip.is_global else PRIVATE_HOST
    name = host.rstrip(".")
    try:
        ascii_name = name.encode("idna").decode("ascii")
    except UnicodeError:
        return BAD_URL
    labels = ascii_name.split(".")
    # An all-digit last label is no top-level domain: "1.2.3.4.5" is a broken address, not a name.
    if not all(_LABEL.match(label) for label in labels) or labels[-1].isdigit():
        return BAD_URL
    if allow_private:
        return None
    if len(labels) == 1 or ascii_name in METADATA_HOSTS or ascii_name.endswith(PRIVATE_SUFFIXES):
        return PRIVATE_HOST
    return None


_INVALID = object()


def _as_ip(host: str):
    """The address a host literal stands for, None for a name, _INVALID for a broken literal."""
    if ":" in host:  # only an IPv6 literal has a colon once urlsplit has taken the port off
        try:
            ip = ipaddress.IPv6Address(host)
        except ValueError:
            return _INVALID
        # ::ffff:127.0.0.1 reaches 127.0.0.1; judge the IPv4 address it maps.
        return ip.ipv4_mapped or ip
    if _NUMERIC_HOST.match(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host.rstrip(".")))
        except OSError:
            return _INVALID  # looks numeric but is no address (e.g. 999.1.1.1): not a valid name either
    return None
