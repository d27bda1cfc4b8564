"""Credentials never leave the process in text: URL user-info (``s3://key:secret@bucket/...``) and query values
(``?token=...``, a presigned URL's signature) are replaced by ``***`` wherever a location is recorded (provenance,
run configs, chunk-cache folders), logged or put in an error message (docs/security.md).

Standard library only: the console (errors, logging) uses it, and :mod:`dune_cache.storage.urls` re-exports
:func:`redact_url`.
"""
from __future__ import annotations

import logging
import re
from urllib.parse import SplitResult, urlsplit

HIDDEN = "***"
# a URL inside free text: scheme://, then anything up to whitespace, quotes, brackets or a comma
_URL_IN_TEXT = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"()<>\[\]{},]+")


def redact_url(url: str) -> str:
    """``url`` with its user-info and the value of each query parameter replaced by ``***`` (``s3://***@bucket/x``,
    ``https://host/x?token=***``); a plain path, or a URL holding neither, is returned as it is."""
    text = str(url)
    if "://" not in text:
        return text
    try:
        parts = urlsplit(text)
    except ValueError:  # e.g. an unbalanced IPv6 bracket: hide everything after the scheme
        return text.split("://", 1)[0] + "://" + HIDDEN
    netloc = f"{HIDDEN}@{parts.netloc.rpartition('@')[2]}" if "@" in parts.netloc else parts.netloc
    query = "&".join(f"{key.partition('=')[0]}={HIDDEN}" if key else key for key in parts.query.split("&"))
    if (netloc, query) == (parts.netloc, parts.query):
        return text
    return SplitResult(parts.scheme, netloc, parts.path, query, parts.fragment).geturl()


def redact_text(text: str) -> str:
    """``text`` with every URL in it passed through :func:`redact_url`."""
    return _URL_IN_TEXT.sub(lambda match: redact_url(match[0]), str(text))


class RedactingFilter(logging.Filter):
    """A logging filter (installed on the CLIs' log handler) that redacts URLs in every record's message."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact_text(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True
