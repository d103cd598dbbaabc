"""Request bodies: decompression (gzip, deflate, br) with a hard cap on the result."""

from __future__ import annotations

import zlib

from lookout.errors import IngestError

MAX_BODY_BYTES = 20 * 1024 * 1024
_CHUNK = 64 * 1024


def decompress(body: bytes, encoding: str, limit: int = MAX_BODY_BYTES) -> bytes:
    """The body as the client meant it; 413 past `limit`, 400 when it does not inflate."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        out = body
    elif encoding in ("gzip", "x-gzip", "deflate"):
        wbits = 16 + zlib.MAX_WBITS if "gzip" in encoding else zlib.MAX_WBITS
        out = _inflate(body, wbits, limit)
    elif encoding == "br":
        out = _brotli(body, limit)
    else:
        raise IngestError(
            f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or br.",
            status=415,
            reason="unsupported_encoding",
        )
    if len(out) > limit:
        raise _too_large(limit)
    return out


def _too_large(limit: int) -> IngestError:
    return IngestError(
        f"Body is larger than {limit} bytes after decompression.", status=413, reason="too_large"
    )


def _inflate(body: bytes, wbits: int, limit: int) -> bytes:
    inflater = zlib.decompressobj(wbits)
    parts: list[bytes] = []
    size = 0
    try:
        data = body
        while data:
            chunk = inflater.decompress(data, _CHUNK)
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            parts.append(chunk)
            data = inflater.unconsumed_tail
        tail = inflater.flush()
    except zlib.error as exc:
        raise IngestError(f"Body does not decompress: {exc}") from exc
    if size + len(tail) > limit:
        raise _too_large(limit)
    return b"".join([*parts, tail])


def _brotli(body: bytes, limit: int) -> bytes:
    import brotli

    decompressor = brotli.Decompressor()
    parts: list[bytes] = []
    size = 0
    try:
        for start in range(0, len(body), _CHUNK):
            data = body[start : start + _CHUNK]
            while True:
                # Bounded output per call: a small input cannot balloon in one step.
                chunk = decompressor.process(data, output_buffer_limit=_CHUNK)
                data = b""
                size += len(chunk)
                if size > limit:
                    raise _too_large(limit)
                parts.append(chunk)
                if decompressor.can_accept_more_data():
                    break
    except brotli.error as exc:
        raise IngestError(f"Body does not decompress (br): {exc}") from exc
    return b"".join(parts)
