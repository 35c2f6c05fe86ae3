"""The quantized tensors of a Llama-family GGUF file, as they are, in `ModelWeights`' layout.

A GGUF's Q/K/V/O/gate/up/down and embedding tensors are read as their stored blocks (no
dequantization): rows K | V | Q of the attention projection and gate | up of the MLP are
concatenated, which keeps blocks intact (a block runs along a row). llama.cpp's converter
stores the Q and K rows of Llama models permuted (pairs of rotary dimensions interleaved);
the rows are put back in the order the float model uses (transformers' GGUF loader does the
same to the dequantized values).
"""
import numpy as np
import torch

from ..ops.weight_formats import QUANTIZED, QuantizedWeight
from .gguf_file import GGUFFile

# GGUF tensor names per layer -> the ModelWeights field whose rows they are, in row order.
LAYER_TENSORS = {"kvq_weight": ("attn_k", "attn_v", "attn_q"), "o_weight": ("attn_output",),
                 "up_weight": ("ffn_gate", "ffn_up"), "down_weight": ("ffn_down",)}
SUPPORTED_ARCHITECTURES = ("llama",)


class GGUFWeightError(ValueError):
    pass


def read_gguf_weights(path: str, spec):
    """(per-layer dicts {field: QuantizedWeight or None}, embedding, LM head or None when tied)
    of the file's tensors. A field is None where the file stores it unquantized (float16/32):
    the float model's tensor is used there. Raises GGUFWeightError for an architecture or a
    quantization type this engine cannot run as it is."""
    reader = GGUFFile(path)
    arch = reader.fields.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFWeightError(f"{path}: architecture {arch!r} cannot run from its GGUF blocks "
                              f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)}); load it with "
                              "weights='fp32', 'bf16' or 'int8'")
    tensors = reader.tensors
    layers = []
    for i in range(spec.num_layers):
        fields = {}
        for field, names in LAYER_TENSORS.items():
            parts = [_rows(tensors, f"blk.{i}.{name}.weight", spec) for name in names]
            fields[field] = _concat(parts, f"blk.{i}.{'|'.join(names)}")
        layers.append(fields)
    embed = _rows(tensors, "token_embd.weight", spec)
    lm_head = _rows(tensors, "output.weight", spec) if "output.weight" in tensors else None
    return layers, embed, lm_head


def _rows(tensors, name, spec):
    """The tensor's blocks as a QuantizedWeight with rows in the float model's order, or None
    for a float tensor."""
    if name not in tensors:
        raise GGUFWeightError(f"the GGUF file has no tensor {name}")
    t = tensors[name]
    if t.kind in ("f32", "f16", "bf16"):
        return None
    if t.kind not in QUANTIZED:
        raise GGUFWeightError(f"{name} is {t.kind}: this engine runs {', '.join(QUANTIZED[1:])} "
                              "blocks as they are; load the file with weights='fp32', 'bf16' or 'int8'")
    data = torch.from_numpy(np.array(t.data))                 # a copy: the file is only mapped
    heads = {"attn_q": spec.num_heads, "attn_k": spec.num_kv_heads}.get(name.split(".")[-2])
    if heads is not None:
        data = data[_unpermuted_rows(data.shape[0], heads)]
    return QuantizedWeight(data.contiguous(), t.kind, int(t.shape[0]))


def _unpermuted_rows(rows: int, heads: int) -> torch.Tensor:
    """Index that puts llama.cpp's interleaved rotary rows back in rotate-half order."""
    return torch.arange(rows).reshape(heads, rows // heads // 2, 2).transpose(1, 2).reshape(-1)


def _concat(parts, what):
    if all(p is None for p in parts):
        return None
    formats = {None if p is None else p.format for p in parts}
    if len(formats) > 1:
        raise GGUFWeightError(f"{what} are stored in different formats ({sorted(map(str, formats))}): "
                              "they run as one matrix; load the file with weights='fp32', 'bf16' or 'int8'")
    return QuantizedWeight(torch.cat([p.data for p in parts]).contiguous(), parts[0].format,
                           parts[0].in_features)
