"""JSON lines -> chunks: UTF-8 files cut at newlines without copying, BOM-marked UTF-16/32 files
decoded line by line, lines over the maximum record size rejected as `oversized` without being
held in memory, bad bytes rejected naming their line."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa

from cut_core.data.ingest.chunks import RAW_KEEP, make_chunk

# JSONL is read in blocks of about this many bytes (cut at a newline): bounded memory for any
# file size, and blocks big enough that per-statement overhead vanishes.
CHUNK_BYTES = 64 << 20


def cut_lines(data, first_row: int, max_record_bytes: int, file_pos: int = 0) -> pa.Table:
    """Whole lines of UTF-8 bytes -> a chunk, without copying the bytes: the newline offsets
    (numpy) become the offsets of an Arrow string array over the block. Lines that are not
    UTF-8 or longer than max_record_bytes are rejected here (the only per-line Python)."""
    arr = np.frombuffer(data, np.uint8)
    ends = np.flatnonzero(arr == 10) + 1
    if len(arr) and arr[-1] != 10:
        ends = np.append(ends, len(arr))
    n = len(ends)
    offsets = np.zeros(n + 1, np.int64)
    offsets[1:] = ends
    text = pa.LargeStringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data))
    pre: dict[int, tuple[str, str, str]] = {}
    for i in np.flatnonzero(np.diff(offsets) > max_record_bytes + 2):   # + the line terminator
        line = bytes(arr[offsets[i]:offsets[i] + RAW_KEEP])
        pre[int(i)] = ("oversized", f"the record is {int(offsets[i + 1] - offsets[i])} bytes, above the maximum "
                       f"record size of {max_record_bytes} bytes (Ingestion.max_record_bytes)",
                       line.decode("utf-8", "replace"))
    try:
        text.validate(full=True)
    except pa.ArrowInvalid:
        # Only here, on a block that has a bad byte: find its lines (rare).
        for i in np.unique(np.searchsorted(offsets, np.flatnonzero(arr >= 0x80), side="right") - 1):
            if int(i) in pre:
                continue
            line = arr[offsets[i]:offsets[i + 1]].tobytes()
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                pre[int(i)] = ("invalid_utf8", f"invalid UTF-8 byte 0x{line[err.start]:02x} at byte {err.start} "
                               "of the line", line.decode("utf-8", "replace").rstrip("\r\n"))
    return make_chunk(np.arange(first_row, first_row + n, dtype=np.int64), text, pre)


def read_jsonl(path: Path, max_record_bytes: int) -> Iterator[pa.Table]:
    """Blocks of about CHUNK_BYTES cut after a newline (one os.pread each). A line longer than
    max_record_bytes is rejected without being held in memory: its bytes are skipped block by
    block up to the next newline, keeping the first RAW_KEEP for the reject."""
    next_row = 1
    with open(path, "rb") as f:
        fd, size = f.fileno(), os.fstat(f.fileno()).st_size
        pos = 3 if os.pread(fd, 3, 0) == b"\xef\xbb\xbf" else 0   # a byte-order mark is not part of line 1
        while pos < size:
            data = os.pread(fd, min(CHUNK_BYTES, size - pos), pos)
            if not data:    # the file shrank while we read it
                return
            cut = len(data) if pos + len(data) >= size else data.rfind(b"\n") + 1
            if cut == 0:    # no newline in a whole block: one line longer than CHUNK_BYTES
                length, head, at = 0, data[:RAW_KEEP], pos
                while True:
                    nl = data.find(b"\n")
                    if nl >= 0 or at + len(data) >= size:
                        length += nl + 1 if nl >= 0 else len(data)
                        break
                    length, at = length + len(data), at + len(data)
                    data = os.pread(fd, min(CHUNK_BYTES, size - at), at)
                if length > max_record_bytes + 2:
                    detail = (f"the record is {length} bytes, above the maximum record size of {max_record_bytes} "
                              "bytes (Ingestion.max_record_bytes)")
                    yield make_chunk([next_row], pa.array([None], pa.large_string()),
                                 {0: ("oversized", detail, head.decode("utf-8", "replace"))})
                    next_row, pos = next_row + 1, pos + length
                    continue
                data, cut = os.pread(fd, length, pos), length   # allowed: read it whole
            chunk = cut_lines(memoryview(data)[:cut], next_row, max_record_bytes)
            next_row += chunk.num_rows
            pos += cut
            yield chunk


def read_wide_lines(path: Path, codec: str, dtype: str, bom: int, max_record_bytes: int) -> Iterator[pa.Table]:
    """JSON lines in UTF-16/32: lines cut at the newline code unit, each decoded strictly; a
    line that is not valid in the encoding is rejected as invalid_encoding, naming it."""
    unit = np.dtype(dtype).itemsize
    block = max(unit, CHUNK_BYTES // unit * unit)
    next_row = 1
    with open(path, "rb") as f:
        fd, size = f.fileno(), os.fstat(f.fileno()).st_size
        pos, carry = bom, b""
        while pos < size or carry:
            data = carry + (os.pread(fd, min(block, size - pos), pos) if pos < size else b"")
            pos += len(data) - len(carry)
            usable = len(data) // unit * unit
            units = np.frombuffer(data[:usable], dtype)
            ends = (np.flatnonzero(units == 10) + 1) * unit
            if pos >= size:
                if usable and (not len(ends) or ends[-1] != usable):
                    ends = np.append(ends, usable)
                carry = b""
                if usable != len(data):          # a dangling odd byte: part of the last line
                    ends = np.append(ends[:-1], len(data)) if len(ends) else np.array([len(data)])
            else:
                if not len(ends):
                    carry = data
                    continue
                carry = data[ends[-1]:]
            starts = np.concatenate([[0], ends[:-1]])
            texts, pre = [], {}
            for i, (a, b) in enumerate(zip(starts.tolist(), ends.tolist())):
                raw = data[a:b]
                try:
                    line = raw.decode(codec)
                except UnicodeDecodeError as err:
                    texts.append(None)
                    pre[i] = ("invalid_encoding", f"the file is marked {codec.upper()} by its byte-order mark, and "
                              f"this line is not valid {codec.upper()} ({err.reason} at byte {err.start})",
                              raw.decode(codec, "replace").rstrip("\r\n")[:RAW_KEEP])
                    continue
                if len(line.encode()) > max_record_bytes + 2:
                    texts.append(None)
                    pre[i] = ("oversized", f"the record is {len(line.encode())} bytes as UTF-8, above the maximum "
                              f"record size of {max_record_bytes} bytes (Ingestion.max_record_bytes)", line[:RAW_KEEP])
                    continue
                texts.append(line)
            if texts:
                yield make_chunk(np.arange(next_row, next_row + len(texts)), pa.array(texts, pa.large_string()), pre)
                next_row += len(texts)
            if pos >= size:
                return
