"""Turns a loaded transformers causal LM into `ModelWeights` (repacked once, no copies kept; a
tied LM head is the embedding's tensor object, so it is converted and counted once)."""
from dataclasses import fields

import torch

from . import recurrent as recurrent_model
from .weights import LayerWeights, ModelSpec, ModelWeights

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "qwen2", "mistral", recurrent_model.MODEL_TYPE)


class UnsupportedModelError(ValueError):
    pass


def pack_hf_model(model, dtype=None, device=None) -> ModelWeights:
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type == "gpt2":
        weights = _pack_gpt2(model)
    elif model_type in ("llama", "qwen2", "mistral"):
        weights = _pack_llama(model)
    elif model_type == recurrent_model.MODEL_TYPE:
        weights = recurrent_model.pack(model)
    else:
        raise UnsupportedModelError(
            f"unsupported architecture {model_type!r} ({type(model).__name__}); supported model "
            f"types: {', '.join(SUPPORTED_MODEL_TYPES)} (SmolLM is 'llama')")
    return _cast(weights, dtype, device)


def _detach(t):
    return None if t is None else t.detach()


def _pack_gpt2(model) -> ModelWeights:
    config = model.config
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
        if getattr(config, flag, False):
            raise UnsupportedModelError(f"GPT-2 with {flag}=True is not supported")
    if config.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        raise UnsupportedModelError(
            f"GPT-2 activation {config.activation_function!r} is not supported (gelu_new only)")
    hidden, heads = config.n_embd, config.n_head
    spec = ModelSpec(
        arch="gpt2", num_layers=config.n_layer, hidden_size=hidden, num_heads=heads,
        num_kv_heads=heads, head_dim=hidden // heads, intermediate_size=config.n_inner or 4 * hidden,
        vocab_size=config.vocab_size, max_positions=config.n_positions, norm="layernorm",
        norm_eps=config.layer_norm_epsilon, activation="gelu_tanh",
        attn_scale=(hidden // heads) ** -0.5 if config.scale_attn_weights else 1.0,
        tied_embeddings=model.lm_head.weight is model.transformer.wte.weight,
        uses_rope=False, model_type="gpt2")
    layers = []
    for block in model.transformer.h:
        # Conv1D stores [in, out]; rows of the transpose are Q | K | V: reorder to K | V | Q.
        w = block.attn.c_attn.weight.detach().t()
        b = block.attn.c_attn.bias.detach()
        order = [slice(hidden, 2 * hidden), slice(2 * hidden, 3 * hidden), slice(0, hidden)]
        layers.append(LayerWeights(
            attn_norm_weight=_detach(block.ln_1.weight), attn_norm_bias=_detach(block.ln_1.bias),
            kvq_weight=torch.cat([w[s] for s in order]).contiguous(),
            kvq_bias=torch.cat([b[s] for s in order]).contiguous(),
            o_weight=block.attn.c_proj.weight.detach().t().contiguous(),
            o_bias=_detach(block.attn.c_proj.bias),
            mlp_norm_weight=_detach(block.ln_2.weight), mlp_norm_bias=_detach(block.ln_2.bias),
            up_weight=block.mlp.c_fc.weight.detach().t().contiguous(),
            up_bias=_detach(block.mlp.c_fc.bias),
            down_weight=block.mlp.c_proj.weight.detach().t().contiguous(),
            down_bias=_detach(block.mlp.c_proj.bias),
            kv_size=spec.kv_size))
    embed = model.transformer.wte.weight.detach()
    return ModelWeights(
        spec=spec, embed=embed,
        pos_embed=model.transformer.wpe.weight.detach(), layers=layers,
        final_norm_weight=_detach(model.transformer.ln_f.weight),
        final_norm_bias=_detach(model.transformer.ln_f.bias),
        lm_head=embed if spec.tied_embeddings else model.lm_head.weight.detach())


def _rope_of(model):
    rotary = getattr(model.model, "rotary_emb", None)
    rope_type = getattr(rotary, "rope_type", "default")
    if rotary is None or rope_type == "dynamic" or "longrope" in str(rope_type):
        raise UnsupportedModelError(f"RoPE type {rope_type!r} is not supported (its frequencies "
                                    "depend on the sequence length)")
    return rotary.inv_freq.detach().float().clone(), float(getattr(rotary, "attention_scaling", 1.0))


def _sliding_windows(config):
    window = getattr(config, "sliding_window", None)
    if config.model_type == "qwen2":
        types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
        return [window if t == "sliding_attention" else None for t in types]
    return [window] * config.num_hidden_layers


def _pack_llama(model) -> ModelWeights:
    config = model.config
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"hidden_act {act!r} is not supported (silu only)")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    spec = ModelSpec(
        arch="llama", num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
        num_heads=heads, num_kv_heads=config.num_key_value_heads or heads, head_dim=head_dim,
        intermediate_size=config.intermediate_size, vocab_size=config.vocab_size,
        max_positions=config.max_position_embeddings, norm="rmsnorm", norm_eps=config.rms_norm_eps,
        activation="silu", attn_scale=head_dim ** -0.5,
        tied_embeddings=model.lm_head.weight is model.model.embed_tokens.weight,
        uses_rope=True, model_type=config.model_type)
    inv_freq, rope_scale = _rope_of(model)
    layers = []
    for block, window in zip(model.model.layers, _sliding_windows(config)):
        attn, mlp = block.self_attn, block.mlp
        projs = (attn.k_proj, attn.v_proj, attn.q_proj)
        biases = [p.bias for p in projs]
        if any(b is not None for b in biases):
            biases = [b if b is not None else torch.zeros(p.out_features, dtype=p.weight.dtype,
                                                          device=p.weight.device)
                      for b, p in zip(biases, projs)]
            kvq_bias = torch.cat([b.detach() for b in biases]).contiguous()
        else:
            kvq_bias = None
        gate_up_bias = None
        if mlp.gate_proj.bias is not None:
            gate_up_bias = torch.cat([mlp.gate_proj.bias.detach(), mlp.up_proj.bias.detach()])
        layers.append(LayerWeights(
            attn_norm_weight=_detach(block.input_layernorm.weight), attn_norm_bias=None,
            kvq_weight=torch.cat([p.weight.detach() for p in projs]).contiguous(),
            kvq_bias=kvq_bias,
            o_weight=attn.o_proj.weight.detach(), o_bias=_detach(attn.o_proj.bias),
            mlp_norm_weight=_detach(block.post_attention_layernorm.weight), mlp_norm_bias=None,
            up_weight=torch.cat([mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach()]),
            up_bias=gate_up_bias,
            down_weight=mlp.down_proj.weight.detach(), down_bias=_detach(mlp.down_proj.bias),
            kv_size=spec.kv_size, sliding_window=window))
    embed = model.model.embed_tokens.weight.detach()
    return ModelWeights(
        spec=spec, embed=embed, pos_embed=None, layers=layers,
        final_norm_weight=_detach(model.model.norm.weight), final_norm_bias=None,
        lm_head=embed if spec.tied_embeddings else model.lm_head.weight.detach(),
        rope_inv_freq=inv_freq, rope_scale=rope_scale)


# Norm weights and biases stay float32 whatever the model's dtype: every backend normalises in
# float32, and a kernel given bf16 ones would convert them on every call (a launch each on a GPU).
NORM_FIELDS = ("attn_norm_weight", "attn_norm_bias", "mlp_norm_weight", "mlp_norm_bias")


def _cast(weights: ModelWeights, dtype, device) -> ModelWeights:
    """Moves every tensor once (norm parameters to float32); tied embeddings stay one tensor."""
    moved = {}     # id(original) -> (original, moved): holding the original keeps its id unique

    def move(t, to_dtype):
        if t is None:
            return None
        if id(t) not in moved:
            moved[id(t)] = (t, t.to(device=device, dtype=to_dtype if t.is_floating_point() else t.dtype))
        return moved[id(t)][1]

    for layer in weights.layers:
        for f in fields(layer):
            value = getattr(layer, f.name)
            if isinstance(value, torch.Tensor):
                setattr(layer, f.name, move(value, torch.float32 if f.name in NORM_FIELDS else dtype))
        layer.make_views()
    for name in ("embed", "pos_embed", "lm_head"):
        setattr(weights, name, move(getattr(weights, name), dtype))
    for name in ("final_norm_weight", "final_norm_bias"):
        setattr(weights, name, move(getattr(weights, name), torch.float32))
    if weights.rope_inv_freq is not None:
        weights.rope_inv_freq = weights.rope_inv_freq.to(device)
    return weights
