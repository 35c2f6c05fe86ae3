"""Per-token features of the hidden state entering a layer, computed on the device.

`anee_state` is the ANEE 0.4 controller input. `lm_head_confidence` runs the final norm and the
LM head on every token at the layer where it is asked for: a [tokens, vocab] x hidden product,
which for SmolLM2-135M (vocab 49152, hidden 576) is about 8x the weight bytes of one of its
layers, so it is off unless a controller asks for it.
"""
import torch
import torch.nn.functional as F

STATE_DIM = 6


def anee_state(h, h_prev, budget_left, layer: int, num_layers: int):
    """[N, 6]: log1p(|h|), log1p(|h - h_prev|), log1p(var h), urgency, budget_left, layer/L.

    budget_left is the compute still allowed, as a fraction of a full forward; urgency is
    budget_left minus the fraction of layers still ahead (negative: cannot run them all).
    """
    hf, pf = h.float(), h_prev.float()
    layers_left = (num_layers - layer) / num_layers
    return torch.stack([
        torch.log1p(hf.norm(dim=-1)),
        torch.log1p((hf - pf).norm(dim=-1)),
        torch.log1p(hf.var(dim=-1)),
        budget_left - layers_left,
        budget_left,
        torch.full_like(budget_left, layer / num_layers),
    ], dim=-1)


def lm_head_confidence(h, weights, ops):
    """(entropy, max probability) of the next-token distribution read at this depth; `ops` is
    the backend's op set (the LM head may be quantized)."""
    x = ops.norm(h, weights.final_norm_weight, weights.final_norm_bias, weights.spec.norm_eps,
                 weights.spec.norm == "rmsnorm")
    logp = F.log_softmax(ops.linear(x, weights.lm_head).float(), dim=-1)
    p = logp.exp()
    return -(p * logp).sum(-1), p.max(-1).values
