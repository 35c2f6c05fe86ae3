"""Stores a model's weights in the format `LLM(weights=...)` asks for.

Decode at small batch reads every weight once per token: bytes per weight set its speed. The
projections, the embedding and the LM head can be float32, bfloat16, int8 per output channel,
or (for a GGUF file) the file's own blocks, read as they are; the activations keep the model's
dtype, norms stay float32. "auto" keeps a GGUF's own format and a float model's floats.
"""
from dataclasses import fields
from typing import Optional

import torch

from ..ops.weight_formats import QuantizedWeight, dequantize_rows, quantize
from .gguf_weights import read_gguf_weights

WEIGHTS = ("auto", "fp32", "bf16", "int8", "gguf")
PROJECTIONS = ("kvq_weight", "o_weight", "up_weight", "down_weight")
_DENSE = {"fp32": torch.float32, "bf16": torch.bfloat16}


def check_weights_mode(mode) -> str:
    if mode not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}, got {mode!r}")
    return mode


def store_weights(weights, mode: str, gguf_path: Optional[str] = None):
    """`weights` (float, as packed from the float model) with its projections, embedding and LM
    head stored per `mode`; gguf_path: the GGUF file the model came from, if any."""
    mode = check_weights_mode(mode)
    if mode == "auto":
        mode = "gguf" if gguf_path is not None else None
    if mode is None:
        return weights
    if mode == "gguf" and gguf_path is None:
        raise ValueError("weights='gguf' needs a model loaded from a .gguf file (the embedded "
                         "model is one)")
    weights.activation_dtype = weights.dtype
    if mode == "gguf":
        _use_gguf(weights, gguf_path)
    else:
        convert = _converter(mode)
        _replace(weights, lambda layer_index, field, tensor: convert(tensor),
                 convert(weights.embed),
                 None if weights.lm_head is weights.embed else convert(weights.lm_head))
    weights.weight_format = mode
    return weights


# Skip adapters follow the projections' format (a SKIP's cost is its bytes): q8_0 next to GGUF
# blocks (they are small and carry what a skipped layer would add), int8 next to int8.
ADAPTER_FORMATS = {"gguf": "q8_0", "int8": "int8"}


def store_adapters(adapters, weights):
    """SkipAdapters (float, any dtype/device) as `weights` runs them: on its device, down and
    up quantized per ADAPTER_FORMATS or in the activations' dtype, the bias in that dtype."""
    from .adapters import SkipAdapter
    fmt = ADAPTER_FORMATS.get(weights.weight_format)

    def matrix(t):
        t = t.to(device=weights.device, dtype=weights.dtype)
        return t if fmt is None else quantize(t, fmt).to(weights.device)

    return [SkipAdapter(matrix(a.down), matrix(a.up), a.bias.to(device=weights.device,
                                                                 dtype=weights.dtype))
            for a in adapters]


def _converter(mode):
    if mode == "int8":
        return lambda t: quantize(t, "int8").to(t.device)
    return lambda t: t.to(_DENSE[mode])


def _use_gguf(weights, path):
    layers, embed, lm_head = read_gguf_weights(path, weights.spec)
    device = weights.device

    def file_or_float(layer_index, field, tensor):
        stored = layers[layer_index][field]
        if stored is None:                  # a float tensor in the file: the float model's
            return tensor
        _check_same_rows(stored, tensor, f"layer {layer_index} {field}")
        return stored.to(device)

    if embed is not None:
        _check_same_rows(embed, weights.embed, "the embedding")
    if lm_head is not None:
        _check_same_rows(lm_head, weights.lm_head, "the LM head")
    tied = weights.lm_head is weights.embed
    _replace(weights, file_or_float,
             weights.embed if embed is None else embed.to(device),
             None if tied else (weights.lm_head if lm_head is None else lm_head.to(device)))


def _check_same_rows(stored: QuantizedWeight, dense: torch.Tensor, what: str):
    """The file's blocks must give the float model's values: a few rows, bit for bit (a wrong
    tensor name or row order fails here, not in the text)."""
    if tuple(stored.shape) != tuple(dense.shape):
        raise ValueError(f"{what}: the GGUF tensor is {list(stored.shape)}, the model's "
                         f"{list(dense.shape)}")
    rows = torch.tensor(sorted({0, 1, 2, 3, dense.shape[0] - 1}))
    if not torch.equal(dequantize_rows(stored, rows), dense[rows.to(dense.device)].float().cpu()):
        raise ValueError(f"{what}: the GGUF blocks do not dequantize to the model's float values")


def _replace(weights, layer_weight, embed, lm_head):
    """Sets every layer's projections to layer_weight(index, field, tensor) (tied layers once),
    then the embedding and the LM head (None: the embedding itself, tied)."""
    done = set()
    for index, layer in enumerate(weights.layers):
        if id(layer) in done:
            continue
        done.add(id(layer))
        for f in fields(layer):
            if f.name in PROJECTIONS:
                setattr(layer, f.name, layer_weight(index, f.name, getattr(layer, f.name)))
        layer.make_views()
    weights.embed = embed
    weights.lm_head = embed if lm_head is None else lm_head
