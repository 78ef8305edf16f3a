"""Paging (AIP-158): the page size a request may ask for, the bytes a page may hold, and opaque
page tokens.

A token is the request's selector, value and source with the position to continue after, as
URL-safe base64 of a JSON array; a token given with other request fields is refused.
"""

from __future__ import annotations

import base64
import binascii
import json

from deliveryreport.v1.error_reason_pb2 import ErrorReason
from dlrhub.errors import invalid_argument

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
# A page stops at about this many bytes, well within a gRPC client's default 4 MiB receive limit.
MAX_PAGE_BYTES = 1 << 20


def page_size(requested: int) -> int:
    """The size of the page to answer with; raises InvalidArgument for a negative one."""
    if requested < 0:
        raise invalid_argument("page_size", "must not be negative", ErrorReason.INVALID_PAGE_SIZE)
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def encode_page_token(selector: str, value: str, source: int, after: int) -> str:
    """The next_page_token continuing after position `after`."""
    token = json.dumps([selector, value, source, after], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(token).decode().rstrip("=")


def decode_page_token(token: str, selector: str, value: str, source: int) -> int:
    """The position a page_token continues after; raises InvalidArgument for a token dlrhub did not
    give out, or one given out for other request fields."""
    try:
        decoded = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        token_selector, token_value, token_source, after = decoded
        valid = isinstance(after, int) and 0 <= after < 2**63  # a 64-bit position
    except (ValueError, TypeError, binascii.Error, RecursionError):
        valid = False
    if not valid:
        raise invalid_argument(
            "page_token",
            "not a next_page_token dlrhub gave out",
            ErrorReason.INVALID_PAGE_TOKEN,
            message="page_token is not a token from a previous response",
        )
    if (token_selector, token_value, token_source) != (selector, value, source):
        raise invalid_argument(
            "page_token",
            "the other request fields must match the first page's",
            ErrorReason.PAGE_TOKEN_MISMATCH,
            message="page_token belongs to a request with another selector or source",
        )
    return int(after)
