"""Training the budget-conditioned controller: traces -> supervised warm start -> REINFORCE.

1. Traces (training/controller_traces.py): the oracle's labels and states on training windows
   only.
2. Warm start: binary cross-entropy of the net's PROCESS logit against the teacher's label, at
   budgets sampled in [0, 1] (rows the budget rule decides alone are left out).
3. REINFORCE: each step draws a budget b ~ U[0, 1] and a batch of training windows, runs the
   controller stochastically (sampling PROCESS/SKIP) and greedily, and rewards every token with
   -KL(full || run) + savings_weight * (1 - compute) - overspend_penalty * max(0, compute - b).
   The baseline is the greedy run's reward of the same token (self-critical), so the advantage
   says whether the sampled path beat the current policy. Log-probs are recomputed with grad from
   the recorded states; decisions the depth policy overrode carry no gradient.
4. Selection: REINFORCE's net is kept only if its mean KL on a few training windows at the
   acceptance budgets (0.75, 0.5) is lower than the warm start's; short runs can make it worse.
5. Optional static fallback (`fallback_margin`): the saved controller follows the oracle's base
   static set wherever its |logit| is at most the margin (control/trained.py). Training is the
   same with or without it.
6. Optional class plans (`class_budgets`, with the fallback): per-token-class swaps against the
   base static set at those budgets, measured on training windows (training/class_plans.py); the
   saved controller falls back to its token's class plan instead of the static set there.

Every stage checkpoints into the output directory; `resume=True` continues from what is there.
The per-step randomness is derived from (seed, step) (training/checkpoints.py), so a resumed run
draws what an unbroken one would.
"""
import json
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..actions import PROCESS, SKIP
from ..control.trained import FEATURES, BudgetConditionedController
from ..eval.corpus import corpus_text, evenly_spaced, split_windows, token_windows
from ..eval.quality import full_logits, score_windows, token_metrics
from .checkpoints import load_checkpoint, run_directory, save_checkpoint, seeded_generator
from .class_plans import fit_class_plans
from .controller_traces import collect_traces, processable_layers
from .options import option

TEACHERS = ("oracle", "heuristic")
EVAL_BUDGETS = (1.0, 0.75, 0.5, 0.25)


@dataclass
class TrainConfig:
    """Each field is an `anee-fast train-controller` option, with its help."""
    text: Optional[str] = option(
        None, "plain-text corpus file (default: Python's offline pydoc topics)")
    seq_len: int = option(64, "tokens per window")
    heldout_fraction: float = option(0.2, "last share of the windows held out, never trained on")
    trace_windows: int = option(8, "training windows the oracle measures")
    trace_budgets: int = option(6, "budgets per window in the traces, stratified in [0, 1]")
    order_windows: int = option(
        4, "trace windows the greedy ablation runs on to find the oracle's base order")
    order_stop_budget: float = option(0.2, "budget down to which the greedy ablation runs")
    max_swaps: int = option(1, "oracle: per-token swaps against the base static set")
    margin: float = option(2.0, "oracle: sensitivity ratio a swap needs")
    fallback_margin: Optional[float] = option(
        None, "saved controller follows the oracle's base static set unless |logit| > this "
              "(default: never)")
    teacher: str = option("oracle", f"warm-start labels: {' | '.join(TEACHERS)}")
    warm_epochs: int = option(6, "supervised warm-start epochs")
    warm_lr: float = option(3e-3, "warm-start learning rate")
    rl_windows: int = option(16, "training windows the REINFORCE rollouts draw from")
    rl_steps: int = option(20, "REINFORCE steps")
    rl_batch: int = option(4, "windows per REINFORCE step")
    rl_lr: float = option(1e-3, "REINFORCE learning rate")
    savings_weight: float = option(0.05, "reward per unit of compute saved")
    overspend_penalty: float = option(10.0, "reward penalty per unit of compute over the budget")
    class_budgets: tuple = option(
        (), "budgets, comma-separated, with per-token-class plans as the fallback's base (needs "
            "--fallback-margin; default: none)")
    classes: int = option(16, "class plans: k-means classes")
    class_candidates: int = option(3, "class plans: swaps tried per class and budget")
    class_windows: int = option(32, "class plans: training windows measured")
    eval_windows: int = option(8, "held-out windows for the final report, 0 = none")
    checkpoint_every: int = option(5, "REINFORCE steps between checkpoints")
    width: int = option(32, "controller network: hidden width")
    proj_dim: int = option(8, "controller network: width of its projection of the hidden state")
    seed: int = option(0, "seed of every random draw")

    def validate(self):
        if self.teacher not in TEACHERS:
            raise ValueError(f"teacher must be one of {', '.join(TEACHERS)}, got {self.teacher!r}")
        for name in ("seq_len", "trace_windows", "trace_budgets", "order_windows", "rl_windows", "rl_batch",
                     "checkpoint_every", "width", "proj_dim", "classes", "class_candidates",
                     "class_windows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("warm_epochs", "rl_steps", "eval_windows", "seed", "max_swaps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        for name in ("warm_lr", "rl_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.order_stop_budget <= 1.0:
            raise ValueError(f"order_stop_budget must be in [0, 1], got {self.order_stop_budget!r}")
        for name in ("savings_weight", "overspend_penalty", "margin"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.fallback_margin is not None and not self.fallback_margin >= 0:
            raise ValueError(f"fallback_margin must be >= 0 or None, got {self.fallback_margin!r}")
        budgets = self.class_budgets
        if not isinstance(budgets, (tuple, list)) or not all(
                isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 < b < 1.0 for b in budgets):
            raise ValueError(f"class_budgets must be budgets in (0, 1), got {budgets!r}")
        if budgets and self.fallback_margin is None:
            raise ValueError("class plans replace the static fallback's base set: set "
                             "fallback_margin too")


# ---- stage 2: supervised warm start ----------------------------------------------------------------

def warm_start(controller, traces, teacher: str, epochs: int, lr: float, seed: int,
               progress: bool = True) -> list:
    """Fits the net to the teacher's labels; returns [{epoch, loss, accuracy}]."""
    net = controller.net
    scalars, normed, layer = traces["scalars"], traces["normed"], traces["layer"]
    labels = traces[teacher].float()
    keep = scalars[:, FEATURES.index("affordable")] < 1.0 - 1e-6
    scalars, normed, layer, labels = scalars[keep], normed[keep], layer[keep], labels[keep]
    if not len(labels):
        raise ValueError("the traces hold no decision to learn (every budget was too large or too "
                         "small to leave a choice): use more trace budgets")
    net.set_normalisation(scalars)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    g = seeded_generator(seed, "warm")
    log = []
    net.train()
    from tqdm import tqdm
    for epoch in tqdm(range(epochs), desc="warm start", unit="epoch", disable=not progress):
        order = torch.randperm(len(labels), generator=g)
        total, correct = 0.0, 0
        for start in range(0, len(order), 1024):
            idx = order[start:start + 1024]
            logit = net(scalars[idx], normed[idx].float(), layer[idx])
            loss = F.binary_cross_entropy_with_logits(logit, labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            correct += int(((logit > 0).float() == labels[idx]).sum())
        log.append({"epoch": epoch + 1, "loss": total / len(labels), "accuracy": correct / len(labels)})
    net.eval()
    return log


# ---- stage 3: REINFORCE -----------------------------------------------------------------------------

def token_rewards(full_logp, logits, traces, budget_eff: float, savings_weight: float,
                  overspend_penalty: float):
    """(reward [N], kl [N], compute [N]) over the windows of one rollout, concatenated."""
    kl = torch.cat([(f.float().exp() * (f.float() - F.log_softmax(q, -1))).sum(-1).clamp_min(0)
                    for f, q in zip(full_logp, logits)])
    compute = torch.cat([t.compute.float().cpu() for t in traces])
    reward = -kl + savings_weight * (1.0 - compute) \
        - overspend_penalty * (compute - budget_eff).clamp_min(0.0)
    return reward, kl, compute


def policy_loss(net, records, executed, advantage):
    """-mean over tokens of advantage * log pi(recorded proposals), overridden ones left out."""
    layers, scalars, normed, process, rows_ok = [], [], [], [], []
    for layer, s, h, p, decided in records:
        done = torch.where(p, PROCESS, SKIP).to(executed.dtype) == executed[:, layer].to(p.device)
        rows_ok.append((decided & done).cpu())
        layers.append(torch.full((s.shape[0],), layer, dtype=torch.long))
        scalars.append(s.cpu())
        normed.append(h.cpu())
        process.append(p.cpu())
    ok = torch.cat(rows_ok)
    if not ok.any():
        return None
    token = torch.arange(executed.shape[0]).repeat(len(records))[ok]
    logit = net(torch.cat(scalars)[ok].clone(), torch.cat(normed)[ok].clone(), torch.cat(layers)[ok])
    logp = -F.binary_cross_entropy_with_logits(logit, torch.cat(process)[ok].float(), reduction="none")
    return -(advantage[token] * logp).sum() / executed.shape[0]


def _rollout(llm, windows, budget, controller):
    """One ragged batch (one engine step), so the recorder's rows are the batch's tokens."""
    return llm.score(windows, energy_budget=budget, controller=controller, return_trace=True)


def reinforce_step(llm, controller, optimizer, full_logp, windows, step: int, config: TrainConfig):
    """One REINFORCE update; returns its log entry."""
    g = seeded_generator(config.seed, "rl", step)
    budget = float(torch.rand((), generator=g))
    pick = torch.randperm(len(windows), generator=g)[:config.rl_batch].tolist()
    batch, batch_full = [windows[i] for i in pick], [full_logp[i] for i in pick]
    budget_eff = llm.depth.effective_budget(budget)
    sampler = BudgetConditionedController(controller.net, controller.config, sample=True, generator=g)
    sampler.recorder = []
    logits_s, traces_s = _rollout(llm, batch, budget, sampler)
    logits_g, traces_g = _rollout(llm, batch, budget, controller)
    args = (budget_eff, config.savings_weight, config.overspend_penalty)
    reward_s, kl_s, compute_s = token_rewards(batch_full, logits_s, traces_s, *args)
    reward_g, kl_g, compute_g = token_rewards(batch_full, logits_g, traces_g, *args)
    advantage = reward_s - reward_g
    advantage = advantage / (advantage.std() + 1e-4) if len(advantage) > 1 else advantage
    executed = torch.cat([t.actions for t in traces_s])
    controller.net.train()
    loss = policy_loss(controller.net, sampler.recorder, executed, advantage)
    if loss is not None:
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    controller.net.eval()
    return {"step": step + 1, "budget": budget, "reward_sampled": float(reward_s.mean()),
            "reward_greedy": float(reward_g.mean()), "kl_greedy": float(kl_g.mean()),
            "compute_greedy": float(compute_g.mean()), "kl_sampled": float(kl_s.mean()),
            "loss": None if loss is None else float(loss.detach())}


# ---- held-out check ---------------------------------------------------------------------------------

def heldout_metrics(llm, controller, windows, budgets=EVAL_BUDGETS, progress: bool = True) -> list:
    """[{budget, kl, top1, compute, max_compute, within_budget}] of the controller on `windows`."""
    full = full_logits(llm, windows, progress=False)
    out = []
    from tqdm import tqdm
    for budget in tqdm(budgets, desc="held-out check", unit="budget", disable=not progress):
        logits, traces = score_windows(llm, windows, energy_budget=budget, controller=controller,
                                       progress=False)
        metrics = [token_metrics(f, q) for f, q in zip(full, logits)]
        compute = torch.cat([t.compute for t in traces])
        limit = llm.depth.effective_budget(budget)
        out.append({"budget": budget, "kl": float(torch.cat([m["kl"] for m in metrics]).mean()),
                    "top1": float(torch.cat([m["top1"] for m in metrics]).float().mean()),
                    "compute": float(compute.mean()), "max_compute": float(compute.max()),
                    "within_budget": bool(compute.max() <= limit + 1e-6)})
    return out


SELECTION_BUDGETS = (0.75, 0.5)


def select_net(llm, controller, warm_state, windows, progress: bool = True) -> dict:
    """Compares the current net with the warm start by mean KL on (training) `windows` at
    SELECTION_BUDGETS and keeps the better one in `controller`; says which."""
    rl_state = {k: v.clone() for k, v in controller.net.state_dict().items()}
    scores = {}
    for name, state in (("warm_start", warm_state), ("reinforce", rl_state)):
        controller.net.load_state_dict(state)
        rows = heldout_metrics(llm, controller, windows, SELECTION_BUDGETS, progress=progress)
        scores[name] = sum(r["kl"] for r in rows) / len(rows)
    kept = min(scores, key=lambda name: (scores[name], name != "reinforce"))
    controller.net.load_state_dict(rl_state if kept == "reinforce" else warm_state)
    return {"mean_kl": scores, "kept": kept, "budgets": list(SELECTION_BUDGETS)}


# ---- the whole recipe -------------------------------------------------------------------------------

def train_controller(llm, out_dir, config: TrainConfig = None, resume: bool = False,
                     progress: bool = True, windows=None) -> dict:
    """Runs the recipe into `out_dir` (traces.pt, warm.pt, checkpoint.pt, controller.json +
    controller.safetensors, training_log.json, training_curve.png); returns the log.

    windows: token-id windows to split into train and held-out instead of the corpus text.
    """
    config = config or TrainConfig()
    config.validate()
    out = run_directory(out_dir, resume, ("traces.pt", "warm.pt", "checkpoint.pt"))
    if windows is None:
        if llm.tokenizer is None:
            raise ValueError("controller training needs a model with a tokenizer (to cut the "
                             "corpus) or token windows")
        windows = token_windows(llm.tokenizer, corpus_text(config.text), config.seq_len)
    train, heldout = split_windows(windows, config.heldout_fraction)
    timings = {}
    log = {"config": asdict(config), "model": str(llm.name), "timings_s": timings,
           "train_windows": len(train), "heldout_windows": len(heldout)}

    # 1. traces
    start = time.perf_counter()
    traces_path = out / "traces.pt"
    if traces_path.exists():
        traces = load_checkpoint(traces_path)
    else:
        g = seeded_generator(config.seed, "budgets")
        K = config.trace_budgets
        budgets = [float((i + torch.rand((), generator=g)) / K) for i in range(K)]
        traces = collect_traces(llm, evenly_spaced(train, config.trace_windows), budgets,
                                config.order_windows, config.order_stop_budget, config.max_swaps,
                                config.margin, progress)
        traces["elapsed_s"] = time.perf_counter() - start
        save_checkpoint(traces, traces_path)
    timings["traces"] = traces["elapsed_s"]

    # 1b. class plans (used by the saved controller's fallback)
    plans = None
    if config.class_budgets:
        start = time.perf_counter()
        plans_path = out / "class_plans.pt"
        if plans_path.exists():
            plans = load_checkpoint(plans_path)
        else:
            plans = fit_plans(llm, evenly_spaced(train, config.class_windows), traces["order"], config,
                              progress)
            plans["elapsed_s"] = time.perf_counter() - start
            save_checkpoint(plans, plans_path)
        timings["class_plans"] = plans["elapsed_s"]
        log["class_plans"] = plans["log"]

    # 2. warm start
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    controller = BudgetConditionedController.new(llm.num_layers, llm.spec.hidden_size, str(llm.name),
                                                 config.width, config.proj_dim)
    warm_path = out / "warm.pt"
    if warm_path.exists():
        warm = load_checkpoint(warm_path)
        controller.net.load_state_dict(warm["net"])
    else:
        warm_log = warm_start(controller, traces, config.teacher, config.warm_epochs, config.warm_lr,
                              config.seed, progress)
        warm = {"net": {k: v.clone() for k, v in controller.net.state_dict().items()}, "log": warm_log,
                "elapsed_s": time.perf_counter() - start}
        save_checkpoint(warm, warm_path)
    controller.net.eval()
    timings["warm_start"] = warm["elapsed_s"]
    log["warm_start"] = warm["log"]

    # 3. REINFORCE
    start = time.perf_counter()
    optimizer = torch.optim.Adam(controller.net.parameters(), lr=config.rl_lr)
    ckpt_path = out / "checkpoint.pt"
    rl_log, first_step, previous = [], 0, 0.0
    if ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path)
        controller.net.load_state_dict(ckpt["net"])
        optimizer.load_state_dict(ckpt["optimizer"])
        rl_log, first_step, previous = ckpt["log"], ckpt["step"], ckpt["elapsed_s"]
    if first_step < config.rl_steps:
        rl_train = evenly_spaced(train, config.rl_windows)
        full_logp = [F.log_softmax(f, -1).half()
                     for f in full_logits(llm, rl_train, progress=progress)]
        from tqdm import tqdm
        bar = tqdm(range(first_step, config.rl_steps), desc="REINFORCE", unit="step",
                   initial=first_step, total=config.rl_steps, disable=not progress)
        for step in bar:
            entry = reinforce_step(llm, controller, optimizer, full_logp, rl_train, step, config)
            rl_log.append(entry)
            bar.set_postfix(b=f"{entry['budget']:.2f}", kl=f"{entry['kl_greedy']:.3f}")
            if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.rl_steps:
                save_checkpoint({"net": controller.net.state_dict(), "optimizer": optimizer.state_dict(),
                                 "log": rl_log, "step": step + 1,
                                 "elapsed_s": previous + time.perf_counter() - start}, ckpt_path)
        previous += time.perf_counter() - start
    timings["reinforce"] = previous
    log["reinforce"] = rl_log

    # 4. keep REINFORCE's net only if it beats the warm start on training windows
    start = time.perf_counter()
    if rl_log:
        log["selection"] = select_net(llm, controller, warm["net"],
                                      evenly_spaced(train, config.rl_windows)[::4], progress)
    timings["selection"] = time.perf_counter() - start
    timings["total"] = sum(timings.values())
    if config.fallback_margin is not None:
        controller.config["static_fallback"] = {"order": [int(x) for x in traces["order"]],
                                                "margin": config.fallback_margin}
    if plans is not None:
        controller.net.register_buffer("class_centroids", plans["centroids"].clone())
        controller.config["class_plans"] = {
            "layer": plans["layer"], "classes": config.classes,
            "plans": {str(n): per_class for n, per_class in plans["plans"].items()}}

    # 5. held-out check and the saved controller
    if config.eval_windows:
        log["heldout"] = heldout_metrics(llm, controller, evenly_spaced(heldout, config.eval_windows),
                                         progress=progress)
    controller.save(out, extra={"training": {"recipe": asdict(config), "timings_s": timings,
                                             "selection": log.get("selection"),
                                             "heldout": log.get("heldout")}})
    (out / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
    from ..eval.plots import plot_controller_training
    plot_controller_training(log, out / "training_curve.png")
    return log


def fit_plans(llm, windows, order, config: TrainConfig, progress: bool = True) -> dict:
    """Class plans at config.class_budgets against the base static sets of `order`; the class
    is taken at the first decidable layer."""
    depth = llm.depth
    order = [int(x) for x in order]
    counts = []
    for b in config.class_budgets:
        k = processable_layers(b, llm.num_layers, depth.skip_cost, depth.min_layers, depth.always_last)
        counts.append(len(order) - k)
    full = full_logits(llm, windows, progress=progress)
    return fit_class_plans(llm, windows, full, order, sorted(set(counts)), config.classes,
                           config.class_candidates, layer=min(order), seed=config.seed,
                           progress=progress)
