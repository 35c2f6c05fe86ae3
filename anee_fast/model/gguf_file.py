"""The tensor table of a GGUF file: names, types, shapes and their bytes (memory-mapped).

Reading only what loading needs: gguf-py's reader also decodes every metadata value (the
tokenizer's 100k strings among them), about 2.5 s per load on the development machine; here the
metadata is stepped over and only the scalar and string fields are kept.
"""
import mmap
import struct
from dataclasses import dataclass

import numpy as np

MAGIC = b"GGUF"
# Metadata value types: struct format of the scalars; 8 = string, 9 = array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
# ggml tensor types this engine reads, with (values per block, bytes per block).
TENSOR_TYPES = {0: ("f32", 1, 4), 1: ("f16", 1, 2), 30: ("bf16", 1, 2), 2: ("q4_0", 32, 18),
                3: ("q4_1", 32, 20), 8: ("q8_0", 32, 34)}


class GGUFFileError(ValueError):
    pass


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    kind: str                 # "f32", "f16", "bf16", "q4_0", "q4_1", "q8_0", or "ggml type N"
    shape: tuple              # ggml order: shape[0] values per row, then the row counts
    data: np.ndarray          # uint8 [rows, row bytes] (empty for a kind this engine cannot read)


class GGUFFile:
    """`fields` (scalar and string metadata) and `tensors` (name -> GGUFTensor) of a file."""

    def __init__(self, path):
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        buf = self._map
        if buf[:4] != MAGIC:
            raise GGUFFileError(f"{path} is not a GGUF file (no GGUF magic)")
        version, n_tensors, n_fields = struct.unpack_from("<IQQ", buf, 4)
        if version < 2:
            raise GGUFFileError(f"{path}: GGUF version {version} is not supported (2 or 3)")
        self.path, self.fields, pos = path, {}, 24
        for _ in range(n_fields):
            key, pos = _string(buf, pos)
            (kind,), pos = struct.unpack_from("<I", buf, pos), pos + 4
            value, pos = _value(buf, pos, kind)
            if value is not None:
                self.fields[key] = value
        infos = []
        for _ in range(n_tensors):
            name, pos = _string(buf, pos)
            (dims,), pos = struct.unpack_from("<I", buf, pos), pos + 4
            shape, pos = struct.unpack_from(f"<{dims}Q", buf, pos), pos + 8 * dims
            kind, offset = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            infos.append((name, shape, kind, offset))
        alignment = int(self.fields.get("general.alignment", 32))
        start = -(-pos // alignment) * alignment
        self.tensors = {name: self._tensor(name, shape, kind, start + offset)
                        for name, shape, kind, offset in infos}

    def _tensor(self, name, shape, kind, offset) -> GGUFTensor:
        if kind not in TENSOR_TYPES:
            return GGUFTensor(name, f"ggml type {kind}", tuple(shape), np.empty((0, 0), np.uint8))
        label, per_block, block_bytes = TENSOR_TYPES[kind]
        rows = int(np.prod(shape[1:], dtype=np.int64))
        row_bytes = shape[0] // per_block * block_bytes
        data = np.frombuffer(self._map, np.uint8, rows * row_bytes, offset).reshape(rows, row_bytes)
        return GGUFTensor(name, label, tuple(shape), data)


def _string(buf, pos):
    (n,) = struct.unpack_from("<Q", buf, pos)
    return bytes(buf[pos + 8:pos + 8 + n]).decode("utf-8", errors="replace"), pos + 8 + n


def _value(buf, pos, kind):
    """(value or None for arrays, position after it)."""
    if kind in _SCALARS:
        fmt = "<" + _SCALARS[kind]
        return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
    if kind == _STRING:
        return _string(buf, pos)
    if kind == _ARRAY:
        item, count = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if item in _SCALARS:
            return None, pos + count * struct.calcsize("<" + _SCALARS[item])
        if item == _STRING:                    # stepped over: the tokenizer's are many
            for _ in range(count):
                pos += 8 + struct.unpack_from("<Q", buf, pos)[0]
            return None, pos
        for _ in range(count):
            _, pos = _value(buf, pos, item)
        return None, pos
    raise GGUFFileError(f"unknown GGUF metadata value type {kind}")
