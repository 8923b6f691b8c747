"""Pagination every List RPC shares: page sizes and opaque page tokens.

A token is the position after the last item of a page (for example its sort key and
id), encoded so callers treat it as opaque. A token that does not decode to the keys a
listing expects answers INVALID_ARGUMENT on field page_token.
"""

import base64
import binascii
import json

from services.common.errors import InvalidArgument

_BAD_TOKEN = "page_token is not one this service issued"


def encode_page_token(position: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(position).encode()).decode()


def decode_page_token(token: str, keys: set[str]) -> dict:
    try:
        position = json.loads(base64.urlsafe_b64decode(token.encode()))
    except (binascii.Error, ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(_BAD_TOKEN, field="page_token") from exc
    if not isinstance(position, dict) or set(position) != keys:
        raise InvalidArgument(_BAD_TOKEN, field="page_token")
    return position


def bad_page_token() -> InvalidArgument:
    """The error for a token that decoded but holds values no page ever ended at."""
    return InvalidArgument(_BAD_TOKEN, field="page_token")


def page_size(value: int, default: int, maximum: int) -> int:
    """The page size to use: default for 0, capped at maximum; negative is refused."""
    if value < 0:
        raise InvalidArgument("page_size must not be negative", field="page_size")
    return min(value or default, maximum)
