"""JSON text as browsers and the PHP backend send and receive it: strict parsing, compact encoding.

(Messages between our own services are msgpack envelopes: `shared.envelopes`.)
"""

from __future__ import annotations

import json
from typing import Any


def dumps(obj: Any) -> str:
    """Compact RFC 8259 JSON as sent to browsers (non-ASCII kept, as PHP's
    JSON_UNESCAPED_UNICODE). Raises ValueError for NaN/Infinity rather than emit text that a
    browser's `JSON.parse` rejects."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads_strict(raw: str | bytes) -> Any:
    """Parse RFC 8259 JSON only: what we parse we may echo or relay, and a browser must be
    able to parse it again.

    Python's `json` accepts `NaN`/`Infinity` and `\\ud800`-style lone surrogates (and decodes
    bytes with `surrogatepass`); any of them in a message sent back would make the browser's
    `JSON.parse` throw, or make its UTF-8 encoding fail in the writer. Raises
    ValueError for all of them.
    """
    text = raw.decode("utf-8") if isinstance(raw, bytes) else raw  # strict: no surrogates
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    if "\\u" in text:
        # Only an escape can produce a lone surrogate; prove the value re-encodes as UTF-8.
        dumps(value).encode("utf-8")
    return value
