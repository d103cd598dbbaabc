"""Request bodies: decompression (gzip, deflate, br) with a hard cap on the result.

`Inflater` takes the body a chunk at a time as it arrives, so neither the compressed body
nor more than `limit` bytes of its expansion is ever held: a body that expands past the
limit is refused with 413 as soon as it does, whatever it would have grown to.
"""

from __future__ import annotations

import zlib
from typing import Any

from lookout.errors import IngestError

MAX_BODY_BYTES = 20 * 1024 * 1024
_CHUNK = 64 * 1024


def _too_large(limit: int) -> IngestError:
    return IngestError(
        f"Body is larger than {limit} bytes after decompression.", status=413, reason="too_large"
    )


class Inflater:
    """Decompresses a body fed in chunks; `finish()` gives the whole of it."""

    def __init__(self, encoding: str, limit: int = MAX_BODY_BYTES) -> None:
        encoding = encoding.strip().lower()
        self.limit = limit
        self.size = 0
        self.parts: list[bytes] = []
        self.kind = encoding
        self._zlib: Any = None
        self._brotli: Any = None
        if encoding in ("", "identity"):
            self.kind = "identity"
        elif encoding in ("gzip", "x-gzip", "deflate"):
            self.kind = "zlib"
            self._wbits = 16 + zlib.MAX_WBITS if "gzip" in encoding else zlib.MAX_WBITS
            self._zlib = zlib.decompressobj(self._wbits)
        elif encoding == "br":
            import brotli

            self._brotli = brotli.Decompressor()
            self._brotli_error = brotli.error
        else:
            raise IngestError(
                f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or br.",
                status=415,
                reason="unsupported_encoding",
            )

    def _keep(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.limit:
            raise _too_large(self.limit)
        if chunk:
            self.parts.append(chunk)

    def feed(self, data: bytes) -> None:
        if self.kind == "identity":
            self._keep(data)
        elif self._zlib is not None:
            self._feed_zlib(data)
        else:
            self._feed_brotli(data)

    def _feed_zlib(self, data: bytes) -> None:
        try:
            while data:
                inflater = self._zlib
                # Bounded output per call: a small input cannot balloon in one step.
                self._keep(inflater.decompress(data, _CHUNK))
                data = inflater.unconsumed_tail
                if not data and inflater.eof and inflater.unused_data:
                    # The next member of a multi-member gzip body (`cat a.gz b.gz`).
                    data = inflater.unused_data
                    self._zlib = zlib.decompressobj(self._wbits)
        except zlib.error as exc:
            raise IngestError(f"Body does not decompress: {exc}") from exc

    def _feed_brotli(self, data: bytes) -> None:
        decompressor = self._brotli
        try:
            for start in range(0, max(len(data), 1), _CHUNK):
                piece = data[start : start + _CHUNK]
                while True:
                    self._keep(decompressor.process(piece, output_buffer_limit=_CHUNK))
                    piece = b""
                    if decompressor.can_accept_more_data() or decompressor.is_finished():
                        break
        except self._brotli_error as exc:
            raise IngestError(f"Body does not decompress (br): {exc}") from exc

    def finish(self) -> bytes:
        if self._zlib is not None:
            try:
                self._keep(self._zlib.flush())
            except zlib.error as exc:
                raise IngestError(f"Body does not decompress: {exc}") from exc
            if not self._zlib.eof and self.size:
                raise IngestError("Body does not decompress: the compressed data is cut short.")
        elif self._brotli is not None and not self._brotli.is_finished():
            raise IngestError("Body does not decompress (br): the compressed data is cut short.")
        return b"".join(self.parts)


def decompress(body: bytes, encoding: str, limit: int = MAX_BODY_BYTES) -> bytes:
    """The body as the client meant it; 413 past `limit`, 400 when it does not inflate."""
    inflater = Inflater(encoding, limit)
    inflater.feed(body)
    return inflater.finish()
