"""The one shape every reader yields (CHUNK_SCHEMA: one row per record, in row order), the
text decoding the readers share (UTF-16/32 files marked by a byte-order mark), and `prefetched`,
which makes the next chunk on a thread while the caller works on this one."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa

# Every reader yields Arrow tables of this shape, in row order: one row per record.
CHUNK_SCHEMA = pa.schema([("row_number", pa.int64()), ("text", pa.large_string()),
                          ("pre_reason", pa.string()), ("pre_detail", pa.large_string()),
                          ("pre_raw", pa.large_string())])
# Raw text kept for a record rejected before parsing (oversized, undecodable) is cut to this.
RAW_KEEP = 10_000


def null_at(text: pa.Array, positions: Iterable[int]) -> pa.Array:
    """`text` (large_string) with NULL at these positions."""
    positions = sorted(positions)
    if not positions:
        return text
    if text.offset == 0 and text.null_count == 0:     # the zero-copy JSONL block: a validity bitmap
        valid = np.ones(len(text), bool)
        valid[positions] = False
        _, offsets, data = text.buffers()[:3]
        return pa.LargeStringArray.from_buffers(len(text), offsets, data,
                                                pa.py_buffer(np.packbits(valid, bitorder="little")),
                                                len(positions))
    values = text.to_pylist()
    for i in positions:
        values[i] = None
    return pa.array(values, pa.large_string())


def make_chunk(rows, text: pa.Array, pre: dict[int, tuple[str, str, str]] | None = None) -> pa.Table:
    """A chunk from row numbers and texts; `pre` maps positions to (reason, detail, raw) of
    records the reader rejected (their text becomes NULL)."""
    n = len(rows)
    if not pre:
        return pa.table([pa.array(rows, pa.int64()), text, pa.nulls(n, pa.string()), pa.nulls(n, pa.large_string()),
                         pa.nulls(n, pa.large_string())], schema=CHUNK_SCHEMA)
    reasons, details, raws = [None] * n, [None] * n, [None] * n
    for i, (reason, detail, raw) in pre.items():
        reasons[i], details[i], raws[i] = reason, detail, raw
    return pa.table([pa.array(rows, pa.int64()), null_at(text, pre), pa.array(reasons, pa.string()),
                     pa.array(details, pa.large_string()), pa.array(raws, pa.large_string())], schema=CHUNK_SCHEMA)


# Byte-order marks of the wide encodings (UTF-32 first: its little-endian mark starts like UTF-16's).
_WIDE_BOMS = [(b"\xff\xfe\x00\x00", "utf-32-le", "<u4"), (b"\x00\x00\xfe\xff", "utf-32-be", ">u4"),
              (b"\xff\xfe", "utf-16-le", "<u2"), (b"\xfe\xff", "utf-16-be", ">u2")]


def wide_encoding(path: Path) -> tuple[str, str, int] | None:
    """(codec, numpy code-unit dtype, BOM length) of a file marked as UTF-16/32, else None."""
    with open(path, "rb") as f:
        head = f.read(4)
    for bom, codec, dtype in _WIDE_BOMS:
        if head.startswith(bom):
            return codec, dtype, len(bom)
    return None


def decoded_text(path: Path) -> tuple[str, str | None]:
    """The text of a whole file (JSON arrays, CSV in a wide encoding) and, when its bytes are
    not valid in its encoding, why (naming the encoding)."""
    raw = path.read_bytes()
    wide = wide_encoding(path)
    codec, skip = (wide[0], wide[2]) if wide else ("utf-8-sig", 0)
    try:
        return raw[skip:].decode(codec), None
    except UnicodeDecodeError as err:
        name = "UTF-8" if codec == "utf-8-sig" else f"{codec.upper()} (by its byte-order mark)"
        return raw[skip:].decode(codec, "replace"), f"{err.reason} at byte {err.start + skip}: the file is not valid {name}"


class prefetched:
    """`items` (an iterator), the next one made on a thread while the caller works on this one.

    The work behind each item (reading a chunk, checking it in DuckDB) releases the GIL, so it
    overlaps the caller's instead of adding to it. The thread starts at once (the first item is
    on its way while the caller does something else) and starts an item only when the caller has
    taken the one before: at most two are alive, the caller's and the next. An error in the
    thread is raised at the item where it happened; `close()` (also when never iterated) stops
    the thread and closes `items`."""

    def __init__(self, items: Iterator, name: str = "ingest-reader"):
        import queue
        import threading

        self._items, self._handoff = items, queue.Queue(maxsize=1)
        self._wanted = threading.Semaphore(1)     # one token per item the caller is ready for
        self._stop, self._end, self._done = threading.Event(), object(), False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import queue
        try:
            it = iter(self._items)
            while True:
                while not self._wanted.acquire(timeout=0.05):
                    if self._stop.is_set():
                        return
                item = next(it, self._end)
                while not self._stop.is_set():
                    try:
                        self._handoff.put(item, timeout=0.05)
                        break
                    except queue.Full:
                        continue
                if item is self._end or self._stop.is_set():
                    return
        except BaseException as err:   # handed to the consumer, raised in its thread
            self._handoff.put(err)     # the queue is empty: the item before was taken
        finally:
            close = getattr(self._items, "close", None)
            if close is not None:
                close()

    def __iter__(self) -> "prefetched":
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        item = self._handoff.get()
        self._wanted.release()             # make the next item while the caller works on this one
        if item is self._end:
            self.close()
            raise StopIteration
        if isinstance(item, BaseException):
            self.close()
            raise item
        return item

    def close(self) -> None:
        self._done = True
        self._stop.set()
        self._thread.join()
