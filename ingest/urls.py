"""Image URLs: made absolute, normalised, and turned into the `uid` every manifest row carries.

`extract` resolves each `<img src>` with :func:`absolutize` (against `<base href>`, itself resolved
against the page URL), normalises it with :func:`normalize_url`, and names the pair with
:func:`uid_of`. Later stages (curate's URL de-duplication, download, filter) import the same
functions, so one image URL written two ways (`HTTP://Host:80/a#top` and `http://host/a`) is one
URL everywhere.
"""

from __future__ import annotations

import hashlib
import re
from urllib.parse import quote, urljoin, urlsplit, urlunsplit

DEFAULT_PORTS = {"http": 80, "https": 443}

# Characters left as they are: RFC 3986 reserved and unreserved ones, plus `%` (existing escapes
# are kept; a `%` not followed by two hex digits is escaped below).
_PATH_SAFE = "/:@!$&'()*+,;=-._~%"
_QUERY_SAFE = _PATH_SAFE + "?"
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_CLEAN = re.compile(r"[A-Za-z0-9/:@!$&'()*+,;=\-._~?]*")  # nothing to escape, no % at all
_ESCAPE = re.compile(r"%[0-9a-f]{2}|%[0-9A-F][a-f]|%[a-f][0-9A-F]")


class BadURL(ValueError):
    """A URL that cannot be normalised (bad port, unencodable host, no host for http)."""


def _quote(part: str, safe: str) -> str:
    if _CLEAN.fullmatch(part):
        return part  # the common case, already valid: quote() is the slow part of normalising
    part = quote(_BAD_PERCENT.sub("%25", part), safe=safe)
    # %7e and %7E are the same escape; one spelling keeps one URL one uid.
    return _ESCAPE.sub(lambda m: m.group(0).upper(), part)


def _host(netloc: str, hostname: str | None, port: int | None, scheme: str) -> str:
    userinfo, _, _ = netloc.rpartition("@")
    host = (hostname or "").rstrip(".")
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise BadURL(f"host {hostname!r} cannot be IDNA-encoded: {exc}") from None
    if ":" in host:  # IPv6 literal: urlsplit strips the brackets
        host = f"[{host}]"
    if port is not None and port != DEFAULT_PORTS.get(scheme):
        host = f"{host}:{port}"
    return f"{userinfo}@{host}" if userinfo else host


def normalize_url(url: str) -> str:
    """One spelling per URL: scheme and host lower-cased, default port dropped, fragment removed,
    path and query percent-encoded validly (spaces and non-ASCII escaped, existing escapes kept).

    Idempotent: ``normalize_url(normalize_url(u)) == normalize_url(u)``. Raises :class:`BadURL`.
    """
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:  # a bad port, an unbalanced IPv6 bracket
        raise BadURL(f"{url[:200]!r}: {exc}") from None
    scheme = parts.scheme.lower()
    netloc = _host(parts.netloc, parts.hostname, port, scheme) if parts.netloc else ""
    if scheme in DEFAULT_PORTS and not parts.hostname:
        raise BadURL(f"{url[:200]!r}: no host")
    path = _quote(parts.path, _PATH_SAFE) or ("/" if netloc else "")
    query = _quote(parts.query, _QUERY_SAFE)
    return urlunsplit((scheme, netloc, path, query, ""))


def absolutize(src: str, page_url: str, base_href: str | None = None) -> str:
    """``src`` as an absolute URL: resolved against ``<base href>`` (itself resolved against the
    page URL, since it may be relative too) or, without one, against the page URL."""
    base = urljoin(page_url, base_href.strip()) if base_href and base_href.strip() else page_url
    return urljoin(base, src.strip())


def uid_of_normalized(url: str, text: str) -> str:
    """The uid of a URL that is already normalised (saves normalising twice in a hot loop)."""
    return hashlib.sha256(f"{url}\n{text}".encode("utf-8", "surrogatepass")).hexdigest()[:32]


def uid_of(url: str, text: str) -> str:
    """128-bit hex id of an (image URL, text) pair: sha256 of the normalised URL, ``\\n``, text."""
    return uid_of_normalized(normalize_url(url), text)
