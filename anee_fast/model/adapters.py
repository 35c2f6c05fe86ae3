"""Skip adapters: a small learned correction a SKIP adds to the residual instead of nothing.

A layer that a token does not PROCESS still writes its K/V (skip_kv); with adapters the residual
also gains up @ (down @ norm(h)) + bias, a rank-r estimate of what the block would have added,
read from the same normed input. One adapter per layer, every layer the same rank, so a SKIP has
one cost (its bytes join the skip cost: `ModelWeights.skip_cost`). Without adapters the engine
runs exactly as before.

On disk: `<stem>.safetensors` (`layers.<l>.down` [rank, hidden], `layers.<l>.up` [hidden, rank],
`layers.<l>.bias` [hidden]) + `<stem>.json` (format, model shape, rank, how they were fitted);
a directory holds `adapters.safetensors` + `adapters.json`. The JSON key "matrices", when
present, names the weight format down and up are stored in (ops/weight_formats.py: their uint8
rows, e.g. q8_0, about half the bytes of float16); loading dequantizes them.
"""
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..ops.weight_formats import QUANTIZED, QuantizedWeight, dequantize, quantize, row_bytes
from .weights_file import file_pair, read_config

FORMAT = "anee_fast.skip_adapters"
VERSION = 1
SHIPPED_NAME = "smollm2-135m-instruct"


@dataclass
class SkipAdapter:
    down: torch.Tensor      # [rank, hidden]
    up: torch.Tensor        # [hidden, rank]
    bias: torch.Tensor      # [hidden]

    def tensors(self):
        return [self.down, self.up, self.bias]


def shipped_adapters_path() -> Path:
    """The adapters fitted for the embedded SmolLM2-135M-Instruct."""
    return Path(__file__).parent.parent / "data" / "adapters" / f"{SHIPPED_NAME}.json"


def save_adapters(adapters, path, model: str, extra: dict = None,
                  dtype: torch.dtype = torch.float32, matrices: str = None) -> Path:
    """Writes one adapter per layer (in `dtype`: float16 halves a file that ships; `matrices`, a
    quantized weight format such as "q8_0", stores down and up in it instead) + the JSON config;
    returns the JSON path. Loading converts to the model's dtype."""
    rank, hidden = adapters[0].down.shape
    check_adapters(adapters, len(adapters), hidden)
    if matrices is not None and matrices not in QUANTIZED:
        raise ValueError(f"matrices must be one of {', '.join(QUANTIZED)} or None, got {matrices!r}")
    json_path, weights_path = file_pair(path, True, "adapters", "skip adapters")

    def stored(name, t):
        t = t.detach().to(device="cpu", dtype=torch.float32 if matrices else dtype)
        return quantize(t, matrices).data if matrices and name != "bias" else t.to(dtype)

    state = {f"layers.{l}.{name}": stored(name, t).contiguous()
             for l, a in enumerate(adapters) for name, t in zip(("down", "up", "bias"), a.tensors())}
    save_file(state, str(weights_path), metadata={"format": FORMAT, "version": str(VERSION)})
    config = {"format": FORMAT, "version": VERSION, "model": model, "num_layers": len(adapters),
              "hidden_size": hidden, "rank": rank, **({"matrices": matrices} if matrices else {}),
              **(extra or {})}
    json_path.write_text(json.dumps(config, indent=2) + "\n")
    return json_path


def load_adapters(path, num_layers: int, hidden_size: int, device=None, dtype=None) -> tuple:
    """(adapters, config) from a directory, a .json or a .safetensors path, checked against the
    model's shape; tensors on `device` in `dtype`."""
    config, json_path, weights_path = read_config(path, "adapters", "skip adapters", FORMAT, VERSION)
    if config.get("num_layers") != num_layers or config.get("hidden_size") != hidden_size:
        raise ValueError(f"{json_path}: these adapters were fitted for {config.get('model')!r} "
                         f"({config.get('num_layers')} layers, hidden size "
                         f"{config.get('hidden_size')}); the model has {num_layers} layers and "
                         f"hidden size {hidden_size}: fit adapters for it (anee-fast train-controller)")
    try:
        state = load_file(str(weights_path))
    except Exception as e:
        raise ValueError(f"cannot read skip adapters {weights_path}: {e}") from None
    rank, matrices = config.get("rank"), config.get("matrices")
    if matrices is not None and matrices not in QUANTIZED:
        raise ValueError(f"{json_path}: matrices must be one of {', '.join(QUANTIZED)}, got "
                         f"{matrices!r}")
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{json_path}: rank must be a positive integer, got {rank!r}")
    shapes = {"down": (rank, hidden_size), "up": (hidden_size, rank)}
    if matrices is not None:        # stored rows: row_bytes raises if a size does not fit
        try:
            shapes = {n: (rows, row_bytes(matrices, k)) for n, (rows, k) in shapes.items()}
        except ValueError as e:
            raise ValueError(f"{json_path}: {e}") from None
    expected = {f"layers.{l}.{name}": shape for l in range(num_layers)
                for name, shape in (*shapes.items(), ("bias", (hidden_size,)))}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != expected:
        raise ValueError(f"{weights_path}: tensors do not match the config {json_path.name} "
                         f"(rank {rank}, {num_layers} layers, matrices {matrices or 'float'}): "
                         f"expected {len(expected)} tensors layers.<l>.down/up/bias, got "
                         f"{sorted(got)[:6]}...")

    def tensor(l, name):
        t = state[f"layers.{l}.{name}"]
        if matrices is not None and name != "bias":
            if t.dtype != torch.uint8:
                raise ValueError(f"{weights_path}: layers.{l}.{name} must hold uint8 {matrices} "
                                 f"rows, got {t.dtype}")
            t = dequantize(QuantizedWeight(t, matrices, hidden_size if name == "down" else rank))
        return t.to(device=device, dtype=dtype)

    adapters = [SkipAdapter(*(tensor(l, name) for name in ("down", "up", "bias")))
                for l in range(num_layers)]
    return adapters, config


def check_adapters(adapters, num_layers: int, hidden_size: int):
    """One adapter per layer, all of one rank, shaped for the model."""
    if len(adapters) != num_layers:
        raise ValueError(f"need one skip adapter per layer ({num_layers}), got {len(adapters)}")
    rank = adapters[0].down.shape[0]
    for l, a in enumerate(adapters):
        shapes = [tuple(t.shape) for t in a.tensors()]
        if shapes != [(rank, hidden_size), (hidden_size, rank), (hidden_size,)]:
            raise ValueError(f"skip adapter {l}: expected down [{rank}, {hidden_size}], up "
                             f"[{hidden_size}, {rank}], bias [{hidden_size}] (one rank for every "
                             f"layer), got {shapes}")

