"""How a weight matrix [N, K] (N output features, K input features) is stored, and what it means.

Decode at small batch reads every weight once per token, so its speed is bytes per weight. A
weight is either a float tensor ("dense": float32, bfloat16 or float16) or a `QuantizedWeight`:
a uint8 tensor [N, row_bytes] whose row n holds output feature n in one of these layouts:

| format | a row of K values | value k |
|--------|-------------------|---------|
| int8 | float32 scale s (4 bytes, little endian), then K int8 q | s * q[k] |
| q8_0 | K/32 blocks of 34 bytes: float16 d, 32 int8 q | d * q[j] |
| q4_0 | K/32 blocks of 18 bytes: float16 d, 16 bytes of 4-bit q | d * (q[j] - 8) |
| q4_1 | K/32 blocks of 20 bytes: float16 d, float16 m, 16 bytes of 4-bit q | d * q[j] + m |

q8_0, q4_0 and q4_1 are GGUF's (llama.cpp's) blocks, byte for byte: a GGUF file's tensors are
used as they are. In the 4-bit blocks byte i holds value i in its low nibble and value i + 16
in its high nibble. Every value is computed in float32 exactly as written above (one rounding
per operation: `dequantize` is the definition every kernel is tested against), and kernels
accumulate in float32.

Rows are independent, so a row slice (`weight[a:b]`) is a view: the K | V rows of a K | V | Q
projection are a `QuantizedWeight` too.
"""
from dataclasses import dataclass

import torch

BLOCK = 32                                             # values per GGUF block
BLOCK_BYTES = {"q8_0": 34, "q4_0": 18, "q4_1": 20}
QUANTIZED = ("int8", "q8_0", "q4_0", "q4_1")
FORMATS = ("dense",) + QUANTIZED


def row_bytes(format: str, in_features: int) -> int:
    """Bytes of one stored row of `in_features` values."""
    if format == "int8":
        return 4 + in_features
    if format not in BLOCK_BYTES:
        raise ValueError(f"unknown weight format {format!r}: one of {', '.join(QUANTIZED)}")
    if in_features % BLOCK:
        raise ValueError(f"{format} needs in_features divisible by {BLOCK}, got {in_features}")
    return in_features // BLOCK * BLOCK_BYTES[format]


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight [out_features, in_features] stored as uint8 rows of `format` (module docstring)."""
    data: torch.Tensor          # uint8 [out_features, row_bytes(format, in_features)]
    format: str
    in_features: int

    def __post_init__(self):
        expected = row_bytes(self.format, self.in_features)
        if (self.data.dtype != torch.uint8 or self.data.dim() != 2
                or self.data.shape[1] != expected or self.data.stride(1) != 1):
            raise ValueError(f"{self.format} weight with {self.in_features} in_features must be "
                             f"uint8 [rows, {expected}] with contiguous rows, got "
                             f"{self.data.dtype} {list(self.data.shape)}")

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.data.shape[0], self.in_features))

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def __getitem__(self, rows: slice) -> "QuantizedWeight":
        """Rows a:b as a view (the only indexing a weight needs)."""
        if not isinstance(rows, slice):
            raise TypeError(f"a QuantizedWeight is indexed by a slice of rows, got {rows!r}")
        return QuantizedWeight(self.data[rows], self.format, self.in_features)

    def to(self, device=None) -> "QuantizedWeight":
        return QuantizedWeight(self.data.to(device), self.format, self.in_features)


def format_of(weight) -> str:
    return weight.format if isinstance(weight, QuantizedWeight) else "dense"


def storage(weight) -> torch.Tensor:
    """The tensor a kernel reads: the float tensor itself, or the uint8 rows."""
    return weight.data if isinstance(weight, QuantizedWeight) else weight


def nbytes(weight) -> int:
    return weight.nbytes if isinstance(weight, QuantizedWeight) else weight.numel() * weight.element_size()


# ---- dequantization (the definition) --------------------------------------------------------

def dequantize(weight) -> torch.Tensor:
    """float32 [out_features, in_features]: every value as the table in the module docstring
    says (a dense weight: converted to float32)."""
    if not isinstance(weight, QuantizedWeight):
        return weight.float()
    return _dequantize_rows(weight.data, weight.format, weight.in_features)


def dequantize_rows(weight, index: torch.Tensor) -> torch.Tensor:
    """float32 rows `index` of the weight: an embedding lookup that reads only those rows."""
    if not isinstance(weight, QuantizedWeight):
        return weight[index].float()
    return _dequantize_rows(weight.data[index], weight.format, weight.in_features)


def _half(bytes_: torch.Tensor) -> torch.Tensor:
    """float32 of little-endian float16s stored in the last dim (2 bytes each). A copy: a slice
    that looks contiguous may still start at an odd byte, which a view as float16 refuses."""
    return bytes_.clone(memory_format=torch.contiguous_format).view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[..., 16] bytes -> [..., 32] values 0..15: low nibbles first, then high nibbles."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1).float()


def _dequantize_rows(data: torch.Tensor, format: str, K: int) -> torch.Tensor:
    n = data.shape[0]
    if format == "int8":
        scale = data[:, :4].clone(memory_format=torch.contiguous_format).view(torch.float32)
        return data[:, 4:].view(torch.int8).float() * scale
    blocks = data.reshape(n, K // BLOCK, BLOCK_BYTES[format])
    d = _half(blocks[..., 0:2])                                             # [n, blocks, 1]
    if format == "q8_0":
        values = d * blocks[..., 2:].contiguous().view(torch.int8).float()
    elif format == "q4_0":
        values = (_nibbles(blocks[..., 2:]) - 8.0) * d
    else:
        values = d * _nibbles(blocks[..., 4:]) + _half(blocks[..., 2:4])
    return values.reshape(n, K)


# ---- quantization (for models that do not come quantized) ----------------------------------

def quantize(weight: torch.Tensor, format: str) -> QuantizedWeight:
    """The weight [N, K] in `format`, rounding to nearest: per output row for int8 (scale =
    max |w| / 127), per block of 32 for the GGUF formats (q8_0: d = max |w| / 127; q4_0: d =
    the signed value of largest magnitude / -8; q4_1: d = (max - min) / 15, m = min)."""
    if format not in QUANTIZED:
        raise ValueError(f"unknown weight format {format!r}: one of {', '.join(QUANTIZED)}")
    w = weight.detach().float()
    if w.dim() != 2:
        raise ValueError(f"quantize: weight must be [out_features, in_features], got {list(w.shape)}")
    n, K = w.shape
    row_bytes(format, K)      # checks K
    if format == "int8":
        scale = w.abs().amax(dim=1, keepdim=True) / 127
        q = torch.where(scale > 0, w / scale, 0).round().clamp(-127, 127).to(torch.int8)
        data = torch.cat([scale.view(torch.uint8), q.view(torch.uint8)], dim=1)
        return QuantizedWeight(data.contiguous(), format, K)
    b = w.reshape(n, K // BLOCK, BLOCK)
    if format == "q8_0":
        d = (b.abs().amax(dim=-1, keepdim=True) / 127).half()
        q = _divide(b, d).round().clamp(-127, 127).to(torch.int8).view(torch.uint8)
        parts = [d.view(torch.uint8), q]
    elif format == "q4_0":
        extreme = b.gather(-1, b.abs().argmax(dim=-1, keepdim=True))
        d = (extreme / -8).half()
        q = (_divide(b, d) + 8.5).floor().clamp(0, 15).to(torch.uint8)
        parts = [d.view(torch.uint8), _pack_nibbles(q)]
    else:
        low, high = b.amin(dim=-1, keepdim=True), b.amax(dim=-1, keepdim=True)
        d, m = ((high - low) / 15).half(), low.half()
        q = (_divide(b - m.float(), d) + 0.5).floor().clamp(0, 15).to(torch.uint8)
        parts = [d.view(torch.uint8), m.view(torch.uint8), _pack_nibbles(q)]
    data = torch.cat(parts, dim=-1).reshape(n, -1)
    return QuantizedWeight(data.contiguous(), format, K)


def _divide(values: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    d = d.float()
    return torch.where(d != 0, values / torch.where(d != 0, d, 1), 0)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """[..., 32] values 0..15 -> [..., 16] bytes (value i low, value i + 16 high)."""
    return q[..., :16] | (q[..., 16:] << 4)
