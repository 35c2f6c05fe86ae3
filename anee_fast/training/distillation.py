"""Skip adapters and the depth controller trained on the KL to the full model itself.

Each step draws a batch of training windows and one budget per window, runs the gated forward
(training/gated_forward.py) with the controller deciding through the engine's own depth policy
(so the budget rule, forced layers and EXIT are exactly the engine's), and minimises

    mean KL(full || run) per token  +  mu * mean max(0, expected compute - budget)

over the adapters and the controller net. The controller's PROCESS/SKIP is a straight-through
relaxation: the forward takes the hard decision, the gradient flows through
sigmoid((logit + logistic noise) / temperature), wherever the net (not the budget rule) decided.
The KL alone says every layer helps; the penalty on the net's expected compute over the budget
makes layers compete for it, and its weight mu rises while the expectation overspends (dual
ascent), so the net learns which layers to give up rather than running until the rule cuts it
off. The base model's weights never change.
"""
import torch
import torch.nn.functional as F

from ..actions import PROCESS, SKIP
from ..control.base import Controller
from ..control.depth_policy import DepthPolicy
from ..control.trained import (FEATURES, controller_features, skip_count,
                                static_fallback_process, trusted_band)
from ..ops import reference

_EPS = 1e-6


class RelaxedGateController(Controller):
    """The trained controller's proposal rule (control/trained.py) with a relaxed, noisy gate:
    records per layer what distillation needs for the straight-through gradient."""
    name = "relaxed-gate"

    def __init__(self, net, temperature: float, generator, fallback=None):
        self.net = net
        self.temperature = temperature
        self.generator = generator
        self.fallback = fallback   # {"order", "margin", ...}: the static fallback, as a prior
        self.last = None           # (soft gate, P(PROCESS), proposed PROCESS, decided by the net)
        self.scalars = None        # a list: receives the scalar features (for normalisation)

    def propose(self, ctx):
        scalars, normed = controller_features(ctx)
        if self.scalars is not None:
            self.scalars.append(scalars)
        layer = torch.full((ctx.h.shape[0],), ctx.layer, dtype=torch.long)
        logit = self.net(scalars, normed, layer)
        trusted = base = torch.ones_like(logit, dtype=torch.bool)
        if self.fallback is not None:
            # The inference rule "the net where |logit| > margin, else the static set" is
            # "logit + margin * (+1 if the set PROCESSes, else -1) > 0": one logit to relax, and
            # a net whose output is still zero follows the static set exactly. Outside the
            # trusted band of budgets the token follows the set whatever the net says.
            order = self.fallback["order"]
            base = static_fallback_process(order, ctx.layer, skip_count(order, ctx))
            logit = logit + self.fallback["margin"] * (2.0 * base.float() - 1.0)
            low, high = trusted_band(self.fallback)
            trusted = (ctx.budget >= low) & (ctx.budget <= high)
        u = torch.rand(logit.shape, generator=self.generator).clamp(_EPS, 1 - _EPS)
        soft = torch.sigmoid((logit + torch.log(u) - torch.log1p(-u)) / self.temperature)
        free = scalars[:, FEATURES.index("affordable")] >= 1.0 - _EPS
        process = torch.where(trusted, soft > 0.5, base) | free
        self.last = (soft, torch.sigmoid(logit), process, ~free & trusted)
        return torch.where(process, PROCESS, SKIP).to(torch.int8)


def gated_run(forward, ids, depth, budgets, adapters, controller):
    """(final residual [B, T, hidden], expected compute per token [B, T], realised compute
    [B, T]) of ids under the engine's depth policy at budgets [B] per window, `controller` a
    RelaxedGateController: the gates carry its straight-through gradient."""
    B, T = ids.shape
    N = B * T
    token_budgets = budgets.repeat_interleave(T)
    policy = DepthPolicy(N, depth, "cpu", reference, depth.budget_terms(token_budgets.tolist()),
                         controller=controller)
    L, c = depth.num_layers, depth.skip_cost
    expected = torch.zeros(N)

    def gate(l, h, h_prev):
        nonlocal expected
        controller.last = None
        process = policy.decide(l, h.detach().reshape(N, -1), h_prev.detach().reshape(N, -1))
        g = process.float()
        if controller.last is None:                     # a forced layer
            expected = expected + g + (1 - g) * c
        else:
            soft, prob, proposed, decided = controller.last
            kept = decided & (proposed == process)      # the rule did not override the net
            g = g + torch.where(kept, soft - soft.detach(), 0.0)
            p = torch.where(decided, prob, g.detach())
            expected = expected + p + (1 - p) * c
        return g.reshape(B, T)

    h = forward.run(ids, gate, adapters)
    return h, (expected / L).reshape(B, T), policy.compute().reshape(B, T)


def kl_per_token(teacher_logits, logits):
    """KL(teacher || student) per position, float32, [..., vocab] -> [...]."""
    log_p = F.log_softmax(teacher_logits.float(), dim=-1)
    log_q = F.log_softmax(logits.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def distill_step(forward, ids, mask, teacher_normed, depth, budgets, adapters, controller,
                 mu: float):
    """One step's loss terms: (loss, mean KL, mean expected overspend, mean realised compute).
    mask [B, T] marks the positions scored (padding excluded); teacher_normed: the full
    model's final normed residual [B, T, hidden]."""
    h, expected, realised = gated_run(forward, ids, depth, budgets, adapters, controller)
    with torch.no_grad():
        teacher = F.linear(teacher_normed, forward.weights.lm_head)
    kl = kl_per_token(teacher, forward.logits(h))
    m = mask.float()
    kl_mean = (kl * m).sum() / m.sum()
    allowed = torch.tensor([depth.effective_budget(float(b)) for b in budgets])[:, None]
    over = ((expected - allowed).clamp_min(0) * m).sum() / m.sum()
    return kl_mean + mu * over, kl_mean.detach(), over.detach(), (realised * m).sum() / m.sum()


def collate(windows, pad_id: int):
    """(ids [B, T], mask [B, T]) of token lists padded at the end to the longest (causal
    attention: padding changes no earlier position; the mask leaves it unscored)."""
    T = max(len(w) for w in windows)
    ids = torch.full((len(windows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(windows), T), dtype=torch.bool)
    for i, w in enumerate(windows):
        ids[i, :len(w)] = torch.as_tensor(w)
        mask[i, :len(w)] = True
    return ids, mask

