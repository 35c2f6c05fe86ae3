"""The repacked, architecture-neutral weights every backend runs on.

Per layer the attention input projection is one matrix with rows ordered K | V | Q, so the
SKIP path (K/V only) reads one contiguous slice of it: `LayerWeights.kv_weight` is a view.
The attention norms and these projections of all blocks live in stacked [B, ...] tensors (the
per-layer fields are views of them), so one `skip_kv` launch can serve consecutive layers.

Weight-tied (recurrent) models list the same `LayerWeights` object at several positions of
`layers`: those virtual layers run one block's weights, never a copy, while the paged cache
still holds K/V per virtual layer. `layer_block[l]` is the stacked block virtual layer l runs.
"""
from dataclasses import dataclass, field
from typing import Optional

import torch


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

    @property
    def kv_weight(self) -> torch.Tensor:
        return self.kvq_weight[: 2 * self.kv_size]

    @property
    def kv_bias(self) -> Optional[torch.Tensor]:
        return None if self.kvq_bias is None else self.kvq_bias[: 2 * self.kv_size]

    @property
    def q_weight(self) -> torch.Tensor:
        return self.kvq_weight[2 * self.kv_size:]

    @property
    def q_bias(self) -> Optional[torch.Tensor]:
        return None if self.kvq_bias is None else self.kvq_bias[2 * self.kv_size:]

    def tensors(self):
        return [t for t in vars(self).values() if isinstance(t, torch.Tensor)]


STACKED_FIELDS = ("attn_norm_weight", "attn_norm_bias", "kvq_weight", "kvq_bias")


@dataclass
class ModelWeights:
    spec: ModelSpec
    embed: torch.Tensor                   # [vocab, hidden]
    pos_embed: Optional[torch.Tensor]     # [max_positions, hidden] (GPT-2) or None
    layers: list                          # one entry per virtual layer; tied layers share the object
    final_norm_weight: torch.Tensor
    final_norm_bias: Optional[torch.Tensor]
    lm_head: torch.Tensor                 # [vocab, hidden]; the embedding itself when tied
    rope_inv_freq: Optional[torch.Tensor] = None   # [head_dim/2] float32
    rope_scale: float = 1.0               # multiplies cos/sin (some RoPE variants)
    stacked: dict = field(default_factory=dict)  # STACKED_FIELDS name -> [B, ...] tensor or None
    layer_block: list = field(default_factory=list)  # virtual layer -> index into the stacks
    skip_kv_slices: dict = field(default_factory=dict)  # with_q -> per layer, skip_kv_weights

    def stack_layers(self) -> None:
        """Moves the STACKED_FIELDS of every distinct block into one [B, ...] tensor each, and
        slices once what skip_kv reads per layer (see skip_kv_weights)."""
        blocks = list({id(layer): layer for layer in self.layers}.values())
        index = {id(block): b for b, block in enumerate(blocks)}
        self.layer_block = [index[id(layer)] for layer in self.layers]
        for name in STACKED_FIELDS:
            parts = [getattr(block, name) for block in blocks]
            if parts[0] is None:
                self.stacked[name] = None
                continue
            self.stacked[name] = torch.stack(parts)
            for block, view in zip(blocks, self.stacked[name]):
                setattr(block, name, view)
        self.skip_kv_slices = {with_q: [self._skip_kv_slices(b, with_q) for b in self.layer_block]
                               for with_q in (False, True)}

    def _skip_kv_slices(self, b: int, with_q: bool):
        rows = slice(None) if with_q else slice(0, 2 * self.spec.kv_size)
        w, bias = self.stacked["kvq_weight"], self.stacked["kvq_bias"]
        norm_b = self.stacked["attn_norm_bias"]
        block = slice(b, b + 1)
        return (self.stacked["attn_norm_weight"][block],
                None if norm_b is None else norm_b[block],
                w[block, rows], None if bias is None else bias[block, rows])

    def skip_kv_weights(self, layer: int, with_q: bool = False):
        """(norm weight, norm bias, K|V weight, K|V bias) of `layer` as the [1, ...] slices of the
        stacks that skip_kv reads (views: tied layers read their one stored block). with_q: the
        projection's Q rows too (K|V|Q), for skip_kv's q_out."""
        return self.skip_kv_slices[with_q][layer]

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    def skip_cost(self) -> float:
        """Cost of a SKIP (K/V projection only) as a fraction of a PROCESS, by weight bytes."""
        layer = self.layers[0]
        total = sum(t.numel() * t.element_size() for t in layer.tensors())
        kv = layer.kv_weight.numel() * layer.kv_weight.element_size()
        kv += sum(t.numel() * t.element_size() for t in (layer.kv_bias, layer.attn_norm_weight,
                                                        layer.attn_norm_bias) if t is not None)
        return kv / total
