"""A streamed HTTP body as a file pyarrow can read from, one chunk at a time."""
from __future__ import annotations

import io
from typing import Iterator


class ChunkFile(io.RawIOBase):
    """Bytes from an iterator of chunks (an httpx ``iter_bytes()`` or ``iter_raw()``), read as a
    file; ``received`` counts the bytes taken from the iterator so far."""

    def __init__(self, chunks: Iterator[bytes]):
        self._chunks = chunks
        self._buffer = b""
        self.received = 0

    def readable(self) -> bool:
        return True

    def readinto(self, target) -> int:
        while not self._buffer:
            self._buffer = next(self._chunks, None)
            if self._buffer is None:
                self._buffer = b""
                return 0
            self.received += len(self._buffer)
        n = min(len(target), len(self._buffer))
        target[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        return n
