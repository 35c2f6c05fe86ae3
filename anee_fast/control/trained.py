"""The budget-conditioned trained controller: one small MLP serves every energy budget.

Per token and layer it reads eight scalars of the residual and the budget (FEATURES), a learned
projection of the RMS-normalised residual, and the layer index (an embedding, so it can learn which
layers matter), and outputs the logit of PROCESS (else SKIP). A layer is always PROCESSed when the
token can still pay for every remaining layer: at budget 1 nothing is skipped.

On disk: `<stem>.safetensors` (weights) + `<stem>.json` (format, features, model shape, how it was
trained); a directory holds `controller.safetensors` + `controller.json`.

Optional static fallback (config key "static_fallback": {"order", "margin", "net_min_budget",
"net_max_budget"}): the net's proposal is kept only where |logit| > margin and the token's
budget is in [net_min_budget, net_max_budget] (0 and 1 when absent); elsewhere the token follows
the base static set of its budget (the first layers of `order` SKIPped, as many as the budget
needs). The student then departs from the static set only where it is sure, and only at the
budgets where it was measured to help.
"""
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..model.weights_file import file_pair, load_matching, read_config
from ..ops import reference
from ..ops.reference import CONTROLLER_FEATURES as FEATURES
from .base import Controller

FORMAT = "anee_fast.budget_controller"
VERSION = 1
SHIPPED_NAME = "smollm2-135m-instruct"


def shipped_controller_path() -> Path:
    """The controller trained for the embedded SmolLM2-135M-Instruct (used by "learned")."""
    return Path(__file__).parent.parent / "data" / "controllers" / f"{SHIPPED_NAME}.json"


def skip_count(order, ctx) -> torch.Tensor:
    """[N] long: how many of the decidable layers `order` each token's budget leaves unpaid."""
    return reference.static_skip_count(ctx.budget, ctx.num_layers, len(order), ctx.skip_cost)


def static_fallback_process(order, layer: int, counts):
    """[N] bool: whether the static set that SKIPs `order`'s first counts[n] layers (skip_count)
    PROCESSes `layer`. `order` lists the decidable layers; others always run."""
    if layer not in order:
        return torch.ones_like(counts, dtype=torch.bool)
    return order.index(layer) >= counts


def context_budget(ctx) -> torch.Tensor:
    """ctx.budget, which the trained controller's features need (DepthPolicy fills it)."""
    if ctx.budget is None:
        raise ValueError("the trained controller needs LayerContext.budget (the token's whole "
                         "budget); DepthPolicy fills it")
    return ctx.budget


def controller_features(ctx):
    """(scalars [N, len(FEATURES)], normalised residual [N, hidden]) of a LayerContext
    (ops/reference.py:controller_features)."""
    return reference.controller_features(ctx.h, ctx.h_prev, context_budget(ctx), ctx.budget_left,
                                         ctx.layer, ctx.num_layers, ctx.skip_cost)


class ControllerNet(nn.Module):
    """logit(PROCESS) from (scalars, normalised residual, layer index)."""

    def __init__(self, num_layers: int, hidden_size: int, width: int = 32, proj_dim: int = 8):
        super().__init__()
        self.proj = nn.Linear(hidden_size, proj_dim, bias=False)
        self.layer_embed = nn.Embedding(num_layers, width)
        self.inp = nn.Linear(len(FEATURES) + proj_dim, width)
        self.hidden = nn.Linear(width, width)
        self.out = nn.Linear(width, 1)
        self.register_buffer("scalar_mean", torch.zeros(len(FEATURES)))
        self.register_buffer("scalar_std", torch.ones(len(FEATURES)))

    def set_normalisation(self, scalars):
        """Standardises the scalar features with statistics of training data."""
        self.scalar_mean.copy_(scalars.mean(0))
        self.scalar_std.copy_(scalars.std(0).clamp_min(1e-3))

    def forward(self, scalars, normed, layer):
        return reference.controller_logit(
            scalars, normed, self.scalar_mean, self.scalar_std, self.proj.weight, self.inp.weight,
            self.inp.bias, self.layer_embed(layer), self.hidden.weight, self.hidden.bias,
            self.out.weight, self.out.bias)

    def op_tensors(self):
        """The net's tensors in the order of the budget_controller op's arguments."""
        return (self.scalar_mean, self.scalar_std, self.proj.weight, self.inp.weight,
                self.inp.bias, self.layer_embed.weight, self.hidden.weight, self.hidden.bias,
                self.out.weight, self.out.bias)


class BudgetConditionedController(Controller):
    """Proposes PROCESS or SKIP per token: PROCESS where the net's logit is positive (or, with
    the static fallback, where its static set PROCESSes unless the net is sure), and wherever
    the token can still pay for every remaining layer. Distillation trains it through a relaxed
    copy of this rule (training/distillation.py)."""
    name = "learned"
    graph_safe = True

    def __init__(self, net: ControllerNet, config: dict, exit_threshold: float = 0.0):
        self.net = net.eval()
        self.exit_threshold = exit_threshold
        self.config = config
        self._op_cache = {}        # device -> (the net's version counters, its op tensors)

    @classmethod
    def new(cls, num_layers: int, hidden_size: int, model: str, width: int = 32, proj_dim: int = 8):
        config = {"format": FORMAT, "version": VERSION, "features": list(FEATURES),
                  "num_layers": num_layers, "hidden_size": hidden_size, "width": width,
                  "proj_dim": proj_dim, "model": model}
        return cls(ControllerNet(num_layers, hidden_size, width, proj_dim), config)

    def check_model(self, num_layers: int, hidden_size: int):
        c = self.config
        if num_layers != c["num_layers"] or hidden_size != c["hidden_size"]:
            raise ValueError(f"this controller was trained for {c['model']} ({c['num_layers']} layers, "
                             f"hidden size {c['hidden_size']}); the model has {num_layers} layers "
                             f"and hidden size {hidden_size}: train one for it "
                             "(anee-fast train-controller)")

    def propose(self, ctx):
        """One op, the backend's budget_controller: the rule above on the net's tensors."""
        self.check_model(ctx.num_layers, ctx.h.shape[-1])
        fallback = self.config.get("static_fallback")
        if fallback is None:
            position, length, margin = -1, 0, -1.0       # margin < 0: no fallback
            band = trusted_band({})
        else:
            order = fallback["order"]
            position = order.index(ctx.layer) if ctx.layer in order else -1
            length, margin = len(order), float(fallback["margin"])
            band = trusted_band(fallback)
        return ctx.ops.budget_controller(
            ctx.h, ctx.h_prev, context_budget(ctx), ctx.budget_left,
            *self._op_tensors(ctx.h.device), ctx.layer, ctx.num_layers, ctx.skip_cost, position,
            length, margin, *band, self.exit_threshold)

    def _op_tensors(self, device):
        """The net's tensors as the op reads them: float32, contiguous, on `device`, detached.
        Cached per device (no conversion ops per layer); a cached copy is remade when the net's
        weights have changed in place since (training: their version counters moved)."""
        tensors = self.net.op_tensors()
        versions = tuple(t._version for t in tensors)
        cached = self._op_cache.get(device)
        if cached is None or cached[0] != versions:
            cached = (versions, tuple(t.detach().to(device, torch.float32).contiguous()
                                      for t in tensors))
            self._op_cache[device] = cached
        return cached[1]

    # ---- files ---------------------------------------------------------------------------------

    def save(self, path, extra: dict = None) -> Path:
        """Writes weights + JSON config; returns the JSON path. `extra` joins the JSON."""
        json_path, weights_path = file_pair(path, True, "controller", "trained controller")
        config = dict(self.config, **(extra or {}))
        state = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        save_file(state, str(weights_path), metadata={"format": FORMAT, "version": str(VERSION)})
        json_path.write_text(json.dumps(config, indent=2) + "\n")
        self.config = config
        return json_path

    @classmethod
    def load(cls, path, exit_threshold: float = 0.0):
        """Loads a directory, a .json or a .safetensors path (its partner next to it).
        exit_threshold: EXIT once the budget left falls below it (ANEE's config option)."""
        config, json_path, weights_path = read_config(path, "controller", "trained controller",
                                                      FORMAT, VERSION)
        if config.get("features") != list(FEATURES):
            raise ValueError(f"{json_path}: features {config.get('features')!r} differ from this "
                             f"anee_fast's {list(FEATURES)}")
        for key in ("num_layers", "hidden_size", "width", "proj_dim"):
            if not isinstance(config.get(key), int) or config[key] < 1:
                raise ValueError(f"{json_path}: {key} must be a positive integer, got "
                                 f"{config.get(key)!r}")
        _check_fallback(config.get("static_fallback"), config["num_layers"], json_path)
        config.setdefault("model", "an unnamed model")
        net = ControllerNet(config["num_layers"], config["hidden_size"], config["width"],
                            config["proj_dim"])
        load_matching(net, weights_path, "controller weights", f"the config {json_path.name}")
        return cls(net, config, exit_threshold=exit_threshold)


def _check_fallback(fallback, num_layers: int, json_path):
    if fallback is None:
        return
    order = fallback.get("order") if isinstance(fallback, dict) else None
    margin = fallback.get("margin") if isinstance(fallback, dict) else None
    if (not isinstance(order, list) or not all(isinstance(x, int) and 0 <= x < num_layers for x in order)
            or len(set(order)) != len(order)):
        raise ValueError(f"{json_path}: static_fallback.order must list distinct layer indices in "
                         f"[0, {num_layers}), got {order!r}")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not margin >= 0:
        raise ValueError(f"{json_path}: static_fallback.margin must be a number >= 0, got {margin!r}")
    for key in ("net_min_budget", "net_max_budget"):
        value = fallback.get(key, 0.0)          # absent: valid (trusted_band's default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"{json_path}: static_fallback.{key} must be a number in [0, 1], "
                             f"got {value!r}")
    low, high = trusted_band(fallback)
    if low > high:
        raise ValueError(f"{json_path}: static_fallback.net_min_budget {low} is above "
                         f"net_max_budget {high}")


def trusted_band(fallback: dict) -> tuple:
    """(lowest, highest) budget at which the net's sure proposals are kept: [0, 1] unless the
    static fallback narrows it."""
    return (float(fallback.get("net_min_budget", 0.0)),
            float(fallback.get("net_max_budget", 1.0)))
