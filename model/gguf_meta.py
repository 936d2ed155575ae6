"""The metadata of a GGUF file, read straight from its header. gguf-py's reader maps every field
into numpy views and takes seconds on a file with a large vocabulary; this reads the scalars
and skips the arrays, in milliseconds."""
from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

from dgxready.errors import DgxReadyError

SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
           12: "<d"}
STRING, ARRAY = 8, 9


def _read(fh: BinaryIO, fmt: str):
    size = struct.calcsize(fmt)
    data = fh.read(size)
    if len(data) != size:
        raise EOFError
    return struct.unpack(fmt, data)[0]


def _string(fh: BinaryIO) -> str:
    n = _read(fh, "<Q")
    data = fh.read(n)
    if len(data) != n:
        raise EOFError
    return data.decode("utf-8", errors="replace")


def _skip_array(fh: BinaryIO) -> None:
    kind, count = _read(fh, "<I"), _read(fh, "<Q")
    if kind == STRING:
        for _ in range(count):
            fh.seek(_read(fh, "<Q"), 1)
    elif kind == ARRAY:
        for _ in range(count):
            _skip_array(fh)
    elif kind in SCALARS:
        fh.seek(struct.calcsize(SCALARS[kind]) * count, 1)
    else:
        raise ValueError(f"unknown array element type {kind}")


def read_metadata(path: Path) -> dict[str, object]:
    """Scalar and string metadata; array values (the vocabulary) are skipped."""
    try:
        with open(path, "rb") as fh:
            if fh.read(4) != b"GGUF":
                raise DgxReadyError(f"{path}: not a GGUF file (bad magic)")
            _read(fh, "<I")
            _read(fh, "<Q")
            fields: dict[str, object] = {}
            for _ in range(_read(fh, "<Q")):
                key, kind = _string(fh), _read(fh, "<I")
                if kind == STRING:
                    fields[key] = _string(fh)
                elif kind == ARRAY:
                    _skip_array(fh)
                elif kind in SCALARS:
                    fields[key] = _read(fh, SCALARS[kind])
                else:
                    raise ValueError(f"unknown value type {kind} for {key}")
            return fields
    except (EOFError, ValueError) as exc:
        raise DgxReadyError(f"{path}: truncated or corrupt GGUF header ({exc or 'ends early'})") from None
