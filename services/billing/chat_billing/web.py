"""The HTTP edge of billing: exact JSON decoding of request bodies."""
from __future__ import annotations

from decimal import Decimal
from typing import Any

import msgspec
from litestar import Request
from litestar.types import Empty

from chat_common.errors import BadRequestError

# Litestar's own JSON decoding turns 0.1 into a float before any type is applied; money in
# dollars must reach dollars_to_exact_nanos as the decimal the caller wrote.
_EXACT_JSON = msgspec.json.Decoder(float_hook=Decimal)

# No valid request nests anywhere near this; refusing deeper bodies here keeps every recursive
# step after decoding (conversion, checks, encoding) far from Python's recursion limit.
MAX_JSON_DEPTH = 32


class ExactJsonRequest(Request[Any, Any, Any]):
    async def json(self) -> Any:
        if self._json is Empty:
            body = await self.body()
            try:
                value = _EXACT_JSON.decode(body or b"null")
            except msgspec.DecodeError as exc:
                raise BadRequestError(f"request body is not valid JSON: {exc}") from None
            except RecursionError:
                raise BadRequestError(f"request body nests deeper than {MAX_JSON_DEPTH} levels") from None
            if _depth(value) > MAX_JSON_DEPTH:
                raise BadRequestError(f"request body nests deeper than {MAX_JSON_DEPTH} levels")
            self._json = value
        return self._json


def _depth(value: Any) -> int:
    deepest = 0
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict):
            deepest = max(deepest, depth)
            pending.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            deepest = max(deepest, depth)
            pending.extend((child, depth + 1) for child in item)
    return deepest


def encode(value: Any) -> bytes:
    return msgspec.json.encode(value)
