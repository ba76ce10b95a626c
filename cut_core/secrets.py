"""What of a credential may appear in a text we show, log or store: the one owner of that rule.

    scrub(text, secrets)   every occurrence of a known secret (an API key) replaced by REDACTED
    public_url(url)        a URL without user:password@, query or fragment

Judges (cut_core/judge) scrub their judgments and errors; generation engines
(cut_core/infer/engines.py) scrub the server replies they quote in an error.
"""

from __future__ import annotations

from typing import Iterable

REDACTED = "[redacted]"


def scrub(text: str | None, secrets: Iterable[str]) -> str | None:
    """`text` with every occurrence of a known secret (an API key) replaced by [redacted]."""
    if text is None:
        return None
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text


def public_url(url: str) -> str:
    """The URL without user:password@, query or fragment: what may appear in a name or a log."""
    from urllib.parse import urlsplit, urlunsplit
    try:
        parts = urlsplit(url)
        netloc = parts.hostname or ""
        if ":" in netloc:  # IPv6
            netloc = f"[{netloc}]"
        if parts.port:
            netloc += f":{parts.port}"
    except ValueError:
        return "<invalid url>"
    return urlunsplit((parts.scheme, netloc, parts.path, "", "")).rstrip("/")
