"""The repacked, architecture-neutral weights every backend runs on.

Per layer the attention input projection is one matrix with rows ordered K | V | Q, so the
SKIP path (K/V only) reads one contiguous slice of it: `LayerWeights.kv_weight` is a view.

Projection weights, the embedding and the LM head are float tensors or `QuantizedWeight`s
(ops/weight_formats.py; model/weight_storage.py makes them); norms stay float32.

Weight-tied (recurrent) models list the same `LayerWeights` object at several positions of
`layers`: those virtual layers run one block's weights, never a copy, while the paged cache
still holds K/V per virtual layer.
"""
from dataclasses import dataclass, fields
from typing import Optional

import torch

from ..ops.weight_formats import QuantizedWeight, nbytes


@dataclass(frozen=True)
class ModelSpec:
    """Shape and flavour of a decoder-only pre-norm transformer."""
    arch: str                 # "gpt2" or "llama" (Llama, Qwen2, Mistral, SmolLM)
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_positions: int
    norm: str                 # "layernorm" or "rmsnorm"
    norm_eps: float
    activation: str           # "gelu_tanh" (GPT-2 MLP) or "silu" (gated MLP)
    attn_scale: float
    tied_embeddings: bool
    uses_rope: bool
    model_type: str = ""      # the transformers model_type it came from

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


@dataclass
class LayerWeights:
    attn_norm_weight: torch.Tensor
    attn_norm_bias: Optional[torch.Tensor]
    kvq_weight: torch.Tensor              # [2*kv_size + q_size, hidden], rows K | V | Q
    kvq_bias: Optional[torch.Tensor]
    o_weight: torch.Tensor                # [hidden, q_size]
    o_bias: Optional[torch.Tensor]
    mlp_norm_weight: torch.Tensor
    mlp_norm_bias: Optional[torch.Tensor]
    up_weight: torch.Tensor               # gated: [2*inter, hidden] rows gate | up; else [inter, hidden]
    up_bias: Optional[torch.Tensor]
    down_weight: torch.Tensor             # [hidden, inter]
    down_bias: Optional[torch.Tensor]
    kv_size: int
    sliding_window: Optional[int] = None  # attend only to the last `sliding_window` positions

    def __post_init__(self):
        self.make_views()

    def make_views(self):
        """kv_weight, q_weight, kv_bias, q_bias: the K | V rows (the SKIP path's) and the Q rows of
        kvq_*, as views made once (a slice costs host time at every layer of every step); again
        after kvq_* are replaced."""
        kv = 2 * self.kv_size
        self.kv_weight, self.q_weight = self.kvq_weight[:kv], self.kvq_weight[kv:]
        bias = self.kvq_bias
        self.kv_bias, self.q_bias = (None, None) if bias is None else (bias[:kv], bias[kv:])

    def tensors(self):
        """The stored weights, float tensors or QuantizedWeights (the views above are not
        counted again)."""
        return [t for f in fields(self)
                if isinstance(t := getattr(self, f.name), (torch.Tensor, QuantizedWeight))]


@dataclass
class ModelWeights:
    spec: ModelSpec
    embed: torch.Tensor                   # [vocab, hidden] (or a QuantizedWeight)
    pos_embed: Optional[torch.Tensor]     # [max_positions, hidden] (GPT-2) or None
    layers: list                          # one entry per virtual layer; tied layers share the object
    final_norm_weight: torch.Tensor
    final_norm_bias: Optional[torch.Tensor]
    lm_head: torch.Tensor                 # [vocab, hidden]; the embedding itself when tied
    rope_inv_freq: Optional[torch.Tensor] = None   # [head_dim/2] float32
    rope_scale: float = 1.0               # multiplies cos/sin (some RoPE variants)
    adapters: Optional[list] = None       # one SkipAdapter per virtual layer, or None (adapters.py)
    activation_dtype: Optional[torch.dtype] = None   # set when the embedding is quantized
    weight_format: str = "float"          # "float" (as packed) or weight_storage.py's mode

    def skip_kv_weights(self, layer: int, with_q: bool = False):
        """(norm weight, norm bias, K|V weight, K|V bias) of `layer`, as skip_kv reads them: the
        layer's own tensors or views of them (tied layers read their one stored block). with_q:
        the projection's Q rows too (K|V|Q), for skip_kv's q_out."""
        w = self.layers[layer]
        if with_q:
            return w.attn_norm_weight, w.attn_norm_bias, w.kvq_weight, w.kvq_bias
        return w.attn_norm_weight, w.attn_norm_bias, w.kv_weight, w.kv_bias

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        """The activations' (and the KV cache's) dtype."""
        return self.activation_dtype or self.embed.dtype

    def nbytes(self) -> int:
        """Bytes of every stored weight, each tensor once (tied ones are one)."""
        seen, total = set(), 0
        for t in [self.embed, self.pos_embed, self.lm_head, self.final_norm_weight,
                  self.final_norm_bias, *(t for layer in self.layers for t in layer.tensors())]:
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                total += nbytes(t)
        return total

    def skip_cost(self) -> float:
        """Cost of a SKIP (K/V projection, and the skip adapter when there is one) as a fraction
        of a PROCESS, by weight bytes."""
        layer = self.layers[0]
        total = _bytes(layer.tensors())
        skip = _bytes([layer.kv_weight, layer.kv_bias, layer.attn_norm_weight, layer.attn_norm_bias])
        if self.adapters is not None:
            skip += _bytes(self.adapters[0].tensors())
        return skip / total


def _bytes(tensors) -> int:
    return sum(nbytes(t) for t in tensors if t is not None)
