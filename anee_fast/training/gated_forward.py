"""The model's forward over whole windows with a gate per token and layer, differentiable:
what fitting and distilling skip adapters (and the controller) runs through.

It computes what the engine computes for the same actions (tests/training check the logits
against `LLM.score`): at every layer each token's K/V come from norm(h) whatever it does, a token
with gate 1 takes the block's output, one with gate 0 keeps h plus its skip adapter's correction.
A gate between 0 and 1 (a straight-through relaxation) mixes the two, so the KL to the full
model has a gradient for the adapters and for whatever produced the gates. The base weights are
read, never changed. Every token runs every block here (a window is a dense batch): that costs
time on the CPU, not correctness.
"""
import torch
import torch.nn.functional as F

from ..ops.reference import norm, rope_cos_sin, rotate


class GatedForward:
    """forward pieces over token windows [B, T] of one model (ModelWeights, float32)."""

    def __init__(self, weights):
        if weights.weight_format not in ("float", "fp32") or weights.dtype != weights.embed.dtype:
            raise ValueError(f"training runs through float weights, these are stored as "
                             f"{weights.weight_format!r}: load the model with weights='fp32'")
        self.weights = weights
        self.spec = weights.spec
        self.rms = self.spec.norm == "rmsnorm"

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, T, hidden] token (+ position) embeddings of ids [B, T]."""
        w = self.weights
        h = F.embedding(ids, w.embed)
        if w.pos_embed is not None:
            h = h + w.pos_embed[:ids.shape[1]]
        return h

    def normed(self, l: int, h: torch.Tensor) -> torch.Tensor:
        """norm(h) with layer l's input norm: what skip_kv and the skip adapter read."""
        layer = self.weights.layers[l]
        return norm(h, layer.attn_norm_weight, layer.attn_norm_bias, self.spec.norm_eps, self.rms)

    def block_delta(self, l: int, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """block(h) - h of layer l for every token of h [B, T, hidden]; x = normed(l, h)."""
        spec, layer = self.spec, self.weights.layers[l]
        B, T, _ = h.shape
        kvq = F.linear(x, layer.kvq_weight, layer.kvq_bias)
        kv, d = layer.kv_size, spec.head_dim
        k = kvq[..., :kv].reshape(B * T, spec.num_kv_heads, d)
        v = kvq[..., kv:2 * kv].reshape(B, T, spec.num_kv_heads, d)
        q = kvq[..., 2 * kv:].reshape(B * T, spec.num_heads, d)
        if spec.uses_rope:
            positions = torch.arange(T, device=h.device).repeat(B)
            cos, sin = rope_cos_sin(positions, self.weights.rope_inv_freq, self.weights.rope_scale)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        groups = spec.num_heads // spec.num_kv_heads
        q = q.reshape(B, T, spec.num_heads, d).transpose(1, 2)
        k = k.reshape(B, T, spec.num_kv_heads, d).repeat_interleave(groups, dim=2).transpose(1, 2)
        v = v.repeat_interleave(groups, dim=2).transpose(1, 2)
        mask = torch.ones(T, T, dtype=torch.bool, device=h.device).tril()
        if layer.sliding_window:
            mask &= ~torch.ones(T, T, dtype=torch.bool, device=h.device).tril(-layer.sliding_window)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=spec.attn_scale)
        o = F.linear(attn.transpose(1, 2).reshape(B, T, -1), layer.o_weight, layer.o_bias)
        h_attn = h + o
        x2 = norm(h_attn, layer.mlp_norm_weight, layer.mlp_norm_bias, spec.norm_eps, self.rms)
        up = F.linear(x2, layer.up_weight, layer.up_bias)
        if spec.activation == "silu":
            gate, value = up.chunk(2, dim=-1)
            up = F.silu(gate) * value
        else:
            up = F.gelu(up, approximate="tanh")
        return o + F.linear(up, layer.down_weight, layer.down_bias)

    def final_normed(self, h: torch.Tensor) -> torch.Tensor:
        """The final norm of the residual: the LM head's input."""
        w = self.weights
        return norm(h, w.final_norm_weight, w.final_norm_bias, self.spec.norm_eps, self.rms)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """float32 logits of the final residual."""
        return F.linear(self.final_normed(h), self.weights.lm_head).float()

    def run(self, ids: torch.Tensor, gate, adapters=None, record=None) -> torch.Tensor:
        """The final residual [B, T, hidden] of ids [B, T].

        gate(l, h, h_prev) -> [B, T] float in [0, 1] (1: the block; 0: the SKIP path), asked
        once per layer in order; adapters: per layer (down, up, bias) or None for a plain SKIP;
        record, when a list, receives (x, block delta, gate) per layer."""
        h = self.embed(ids)
        h_prev = h
        for l in range(self.spec.num_layers):
            g = gate(l, h, h_prev)[..., None]
            x = self.normed(l, h)
            delta = self.block_delta(l, h, x)
            if record is not None:
                record.append((x, delta, g))
            skip = 0.0
            if adapters is not None:
                down, up, bias = adapters[l]
                skip = F.linear(F.linear(x, down), up, bias)
            h_prev, h = h, h + g * delta + (1 - g) * skip
        return h
