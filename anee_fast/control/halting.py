"""Per-token halting for weight-tied models (as in ANIRA): early allocation and online halting.

Both read the residual through a parameter-free RMS normalisation and a small MLP, and act on
the engine's controller interface by proposing EXIT at an iteration boundary (the engine then
fills the skipped iterations' K/V and, with always_last = coda, still runs the coda).

- Early (ANIRA-E): at the first recurrent layer, from the state after the prelude, the
  token's predicted cross-entropy after each count r = 1..R of iterations; the token runs the
  count that minimises it plus compute_penalty * r / R.
- Online (ANIRA-O): after each iteration r < R, a halting probability from the current state;
  the token halts once it exceeds 1/2.

Heads are trained without difficulty labels (recurrent_training.fit_halting_head): from each
token's cross-entropy at every exit, with a compute penalty.
"""
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from ..actions import EXIT, PROCESS
from ..model.recurrent import load_config
from ..model.weights_file import load_matching
from ..ops.reference import normalised
from .base import Controller

KINDS = ("early", "online")
HALTING_CONFIG = "halting.json"


class EarlyHead(nn.Module):
    """Predicted cross-entropy [N, R] of exiting after r iterations (index r-1)."""

    def __init__(self, hidden_size: int, iterations: int, width: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden_size, width), nn.ReLU(), nn.Linear(width, iterations))

    def forward(self, h_after_prelude):
        return self.net(normalised(h_after_prelude))


class OnlineHead(nn.Module):
    """Halting logit [N] after iteration r (1-based) from the state after it."""

    def __init__(self, hidden_size: int, iterations: int, width: int = 64):
        super().__init__()
        self.inp = nn.Linear(hidden_size, width)
        self.iteration = nn.Embedding(iterations, width)
        self.out = nn.Linear(width, 1)

    def forward(self, state, r: torch.Tensor):
        return self.out(F.relu(self.inp(normalised(state)) + self.iteration(r - 1))).squeeze(-1)


class HaltingController(Controller):
    """Proposes EXIT at iteration boundaries (PROCESS elsewhere) for a weight-tied model."""
    graph_safe = True      # the early plan lives within one step: made at its first iteration
    reads_h_prev = False

    def __init__(self, kind: str, head: nn.Module, prelude: int, block: int, iterations: int,
                 num_layers: int, hidden_size: int, compute_penalty: float):
        if kind not in KINDS:
            raise ValueError(f"halting kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if not compute_penalty >= 0:
            raise ValueError(f"compute_penalty must be >= 0, got {compute_penalty!r}")
        self.name = f"halting-{kind}"
        self.kind, self.head = kind, head.eval()
        self.prelude, self.block, self.iterations = prelude, block, iterations
        self.num_layers, self.hidden_size = num_layers, hidden_size
        self.compute_penalty = compute_penalty     # early: nats per full depth
        self.planned = None       # early: iterations per row of the current step

    def check_model(self, num_layers: int, hidden_size: int):
        if (num_layers, hidden_size) != (self.num_layers, self.hidden_size):
            raise ValueError(f"this halting controller was trained for a recurrent model with "
                             f"{self.num_layers} virtual layers and hidden size {self.hidden_size}; "
                             f"the model has {num_layers} and {hidden_size}")

    def propose(self, ctx):
        self.check_model(ctx.num_layers, ctx.h.shape[-1])
        n = ctx.h.shape[0]
        offset = ctx.layer - self.prelude
        done, within = divmod(offset, self.block)       # iterations completed before this layer
        if offset < 0 or done >= self.iterations or within:
            # Outside the recurrence, or inside an iteration: decisions are taken at its first layer.
            return torch.full((n,), PROCESS, dtype=torch.int8, device=ctx.h.device)
        head = self.head.to(ctx.h.device)
        with torch.no_grad():
            if self.kind == "early":
                if done == 0:
                    self.planned = early_plan(head(ctx.h), self.compute_penalty)
                if self.planned is None or self.planned.shape[0] != n:
                    raise RuntimeError("the early halting controller must see the first recurrent "
                                       "layer of a step before the later ones")
                halt = self.planned <= done
            elif done == 0:
                halt = torch.zeros(n, dtype=torch.bool, device=ctx.h.device)
            else:
                r = torch.full((n,), done, dtype=torch.long, device=ctx.h.device)
                halt = head(ctx.h, r) > 0.0
        return torch.where(halt, EXIT, PROCESS).to(torch.int8)


def early_plan(predicted_ce, compute_penalty: float) -> torch.Tensor:
    """Iterations [N] minimising predicted cross-entropy + compute_penalty * r / R."""
    R = predicted_ce.shape[-1]
    cost = torch.arange(1, R + 1, device=predicted_ce.device) / R
    return (predicted_ce + compute_penalty * cost).argmin(-1) + 1


def new_head(kind: str, hidden_size: int, iterations: int, width: int = 64) -> nn.Module:
    if kind not in KINDS:
        raise ValueError(f"halting kind must be one of {', '.join(KINDS)}, got {kind!r}")
    return (EarlyHead if kind == "early" else OnlineHead)(hidden_size, iterations, width)


def save_heads(directory, heads: dict, width: int, compute_penalty: float):
    """Writes halting-<kind>.safetensors per head and halting.json (width, compute penalty)."""
    out = Path(os.fspath(directory))
    out.mkdir(parents=True, exist_ok=True)
    for kind, head in heads.items():
        state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
        save_file(state, str(out / f"halting-{kind}.safetensors"))
    (out / HALTING_CONFIG).write_text(json.dumps({"width": width, "kinds": sorted(heads),
                                                  "compute_penalty": compute_penalty}, indent=2) + "\n")


def load_controller(directory, kind: str) -> HaltingController:
    """The halting controller of `kind` saved next to a recurrent model checkpoint."""
    folder = Path(os.fspath(directory))
    if kind not in KINDS:
        raise ValueError(f"halting kind must be one of {', '.join(KINDS)}, got {kind!r}")
    weights = folder / f"halting-{kind}.safetensors"
    if not (folder / HALTING_CONFIG).is_file() or not weights.is_file():
        raise FileNotFoundError(f"{folder} holds no trained {kind} halting head (train one with "
                                "anee-fast train-recurrent)")
    config = load_config(folder)
    settings = json.loads((folder / HALTING_CONFIG).read_text())
    head = new_head(kind, config.hidden_size, config.iterations, settings["width"])
    load_matching(head, weights, f"{kind} halting head", f"{HALTING_CONFIG} and the model's config")
    return HaltingController(kind, head, config.prelude, config.block, config.iterations,
                             config.num_layers, config.hidden_size, settings["compute_penalty"])
