"""A small weight-tied (recurrent) transformer, trainable in PyTorch and run by the engine.

Virtual layer l of L = prelude + block * iterations + coda runs stored block `config.block_of(l)`:
the prelude layers, then the recurrent block's B layers applied `iterations` times, then the coda
(as in retrofitted-recurrence models and ANIRA). Halting a token after r iterations is
an EXIT; with `always_last = coda` the depth policy still runs the coda, and the skipped
iterations still write their K/V, so later tokens see a complete cache.

`forward(ids, process)` is the reference that loops the shared block: it runs each virtual layer
on every token and keeps the block's output only where `process` says so
(h = where(process, block(h), h)), so a SKIPped token's K/V come from the norm of its own unchanged residual, as in the engine.
Parameters are stored in the engine's layout (K | V | Q rows in one matrix, gate | up in
another), so `pack` hands the engine views of them, one set per stored block.
"""
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from .weights import LayerWeights, ModelSpec, ModelWeights
from .weights_file import load_matching

MODEL_TYPE = "anee_recurrent"
CONFIG_NAME = "recurrent_config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class RecurrentConfig:
    vocab_size: int
    hidden_size: int = 128
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    prelude: int = 1
    block: int = 1                 # distinct layers in the recurrent block
    iterations: int = 8            # times the block is applied at full depth
    coda: int = 1
    max_positions: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    model_type: str = MODEL_TYPE

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size",
                     "block", "iterations", "max_positions"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("prelude", "coda"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must split into num_heads "
                             f"{self.num_heads}, a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head size {self.head_dim} must be even (rotary embedding)")
        if self.model_type != MODEL_TYPE:
            raise ValueError(f"model_type must be {MODEL_TYPE!r}, got {self.model_type!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_layers(self) -> int:
        """Virtual layers at full depth."""
        return self.prelude + self.block * self.iterations + self.coda

    @property
    def num_blocks(self) -> int:
        """Stored layers: prelude, the recurrent block's layers, coda."""
        return self.prelude + self.block + self.coda

    def block_of(self, layer: int) -> int:
        """The stored layer virtual layer `layer` runs."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} is outside 0..{self.num_layers - 1}")
        core = self.block * self.iterations
        if layer < self.prelude:
            return layer
        if layer < self.prelude + core:
            return self.prelude + (layer - self.prelude) % self.block
        return layer - core + self.block

    def iteration_end(self, iterations: int) -> int:
        """The first virtual layer after `iterations` applications of the block."""
        return self.prelude + self.block * iterations


def rms_norm(x, weight, eps: float):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def inv_frequencies(config: RecurrentConfig) -> torch.Tensor:
    d = config.head_dim
    return 1.0 / config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)


def rotate(x, cos, sin):
    """Rotary embedding, rotate-half layout; x [batch, T, heads, d], cos/sin [T, d]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos[:, None] + rotated.float() * sin[:, None]).to(x.dtype)


class Block(nn.Module):
    """One pre-norm decoder layer (RMSNorm, GQA attention with RoPE, gated SiLU MLP)."""

    def __init__(self, config: RecurrentConfig):
        super().__init__()
        c = config
        self.config = c
        kv, q = c.num_kv_heads * c.head_dim, c.num_heads * c.head_dim
        self.attn_norm = nn.Parameter(torch.ones(c.hidden_size))
        self.kvq = nn.Linear(c.hidden_size, 2 * kv + q, bias=False)
        self.o = nn.Linear(q, c.hidden_size, bias=False)
        self.mlp_norm = nn.Parameter(torch.ones(c.hidden_size))
        self.gate_up = nn.Linear(c.hidden_size, 2 * c.intermediate_size, bias=False)
        self.down = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, h, cos, sin, process=None):
        """h [batch, T, hidden]; process [batch, T] bool (None = every token runs the block)."""
        c = self.config
        n, T, _ = h.shape
        kv, d = c.num_kv_heads * c.head_dim, c.head_dim
        k, v, q = self.kvq(rms_norm(h, self.attn_norm, c.norm_eps)).split([kv, kv, c.num_heads * d], -1)
        q = rotate(q.view(n, T, c.num_heads, d), cos, sin)
        k = rotate(k.view(n, T, c.num_kv_heads, d), cos, sin)
        v = v.view(n, T, c.num_kv_heads, d)
        group = c.num_heads // c.num_kv_heads
        k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
        attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=True, scale=d ** -0.5)
        h_attn = h + self.o(attn.transpose(1, 2).reshape(n, T, -1))
        gate, up = self.gate_up(rms_norm(h_attn, self.mlp_norm, c.norm_eps)).chunk(2, dim=-1)
        out = h_attn + self.down(F.silu(gate) * up)
        return out if process is None else torch.where(process[..., None], out, h)


class RecurrentTransformer(nn.Module):
    """Embedding (tied with the LM head), config.num_blocks stored blocks, final RMSNorm."""

    def __init__(self, config: RecurrentConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_blocks))
        self.final_norm = nn.Parameter(torch.ones(config.hidden_size))
        self.register_buffer("inv_freq", inv_frequencies(config), persistent=False)
        nn.init.normal_(self.embed.weight, std=0.02)

    def rope_tables(self, T: int):
        if T > self.config.max_positions:
            raise ValueError(f"{T} positions exceed max_positions={self.config.max_positions}")
        freqs = torch.arange(T, dtype=torch.float32, device=self.inv_freq.device)[:, None] * self.inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()

    def logits(self, h):
        return F.linear(rms_norm(h, self.final_norm, self.config.norm_eps), self.embed.weight).float()

    def forward(self, ids, process=None, hidden_states=None):
        """float32 logits [batch, T, vocab]. process [batch, T, L] bool: which tokens run each
        virtual layer (None = all). `hidden_states`, when a list, receives the residual after
        each virtual layer."""
        c = self.config
        if process is not None and process.shape != (*ids.shape, c.num_layers):
            raise ValueError(f"process must be [batch, T, {c.num_layers}] for ids of shape "
                             f"{tuple(ids.shape)}, got {tuple(process.shape)}")
        cos, sin = self.rope_tables(ids.shape[1])
        h = self.embed(ids)
        for layer in range(c.num_layers):
            mask = None if process is None else process[..., layer]
            h = self.blocks[c.block_of(layer)](h, cos, sin, mask)
            if hidden_states is not None:
                hidden_states.append(h)
        return self.logits(h)


def pack(model: RecurrentTransformer) -> ModelWeights:
    """The engine's weights: one LayerWeights per stored block, listed once per virtual layer
    that runs it (views of the parameters; nothing is copied per iteration). Packing for another
    device or dtype copies them, so pack (and build the LLM) again after changing the parameters."""
    c = model.config
    spec = ModelSpec(
        arch="llama", num_layers=c.num_layers, hidden_size=c.hidden_size, num_heads=c.num_heads,
        num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, intermediate_size=c.intermediate_size,
        vocab_size=c.vocab_size, max_positions=c.max_positions, norm="rmsnorm", norm_eps=c.norm_eps,
        activation="silu", attn_scale=c.head_dim ** -0.5, tied_embeddings=True, uses_rope=True,
        model_type=MODEL_TYPE)
    blocks = [LayerWeights(
        attn_norm_weight=b.attn_norm.detach(), attn_norm_bias=None, kvq_weight=b.kvq.weight.detach(),
        kvq_bias=None, o_weight=b.o.weight.detach(), o_bias=None, mlp_norm_weight=b.mlp_norm.detach(),
        mlp_norm_bias=None, up_weight=b.gate_up.weight.detach(), up_bias=None,
        down_weight=b.down.weight.detach(), down_bias=None, kv_size=spec.kv_size)
        for b in model.blocks]
    embed = model.embed.weight.detach()
    return ModelWeights(
        spec=spec, embed=embed, pos_embed=None,
        layers=[blocks[c.block_of(layer)] for layer in range(c.num_layers)],
        final_norm_weight=model.final_norm.detach(), final_norm_bias=None,
        lm_head=embed, rope_inv_freq=inv_frequencies(c).to(embed.device))


def save(model: RecurrentTransformer, directory) -> Path:
    """Writes recurrent_config.json + model.safetensors into `directory`; returns it."""
    out = Path(os.fspath(directory))
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_NAME), metadata={"format": MODEL_TYPE})
    (out / CONFIG_NAME).write_text(json.dumps(asdict(model.config), indent=2) + "\n")
    return out


def is_checkpoint(path) -> bool:
    return os.path.isfile(os.path.join(os.fspath(path), CONFIG_NAME))


def load_config(directory) -> RecurrentConfig:
    """The config of a model saved by `save`."""
    folder = Path(os.fspath(directory))
    if not is_checkpoint(folder) or not (folder / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{folder} is not a recurrent model checkpoint (it needs {CONFIG_NAME} "
                                f"and {WEIGHTS_NAME})")
    try:
        return RecurrentConfig(**json.loads((folder / CONFIG_NAME).read_text()))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{folder / CONFIG_NAME} is not a valid recurrent model config: {e}") from None


def load(directory) -> RecurrentTransformer:
    """A model saved by `save` (eval mode, on the CPU)."""
    folder = Path(os.fspath(directory))
    model = RecurrentTransformer(load_config(folder))
    load_matching(model, folder / WEIGHTS_NAME, "model weights", CONFIG_NAME)
    return model.eval()
