"""`anee-fast train-controller`: skip adapters and the budget-conditioned controller for a model,
trained on the KL to the full model, on training text only.

1. Windows: a build-corpus directory (several sources and chat answers of the full model), a
   plain-text file or Python's pydoc topics; a few training windows are set aside to choose
   between candidates (step 5) and never stepped on.
2. Ridge adapters (training/adapter_ridge.py): training-free, refit on the inputs adapted
   skipping produces. Seconds to minutes.
3. The static order: greedy ablation with the ridge adapters in place (eval/static_search.py),
   the layers in the order they are best given up. It is the controller's static fallback.
4. Distillation (training/distillation.py): adapters and controller net together on KL(full ||
   run), budgets drawn per window, the net starting as the static set (zero output) and
   departing from it where the gradient says so (matrix products in bfloat16 where the CPU
   computes it natively: config.precision). At step `reorder_step` the static order is
   searched again with the adapters distilled so far (the layers best given up change once
   the adapters stand in for them), and the rest of the steps train the net against it.
5. Selection on the set-aside windows at SELECTION_BUDGETS: per budget the net with its fallback
   against the static set alone (same adapters), and the band of budgets in which the net is
   trusted (`net_min_budget` to `net_max_budget`; outside it every token follows the static
   set) chosen for the least KL summed over those budgets.

Every stage checkpoints into the output directory; `resume=True` continues from what is there.
Writes adapters.json/.safetensors and controller.json/.safetensors (load both with
LLM(..., adapters=OUT_DIR) and controller=OUT_DIR), training_log.json and training_curve.png.
"""
import json
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from ..control.trained import BudgetConditionedController
from ..eval.corpus import corpus_text, evenly_spaced, split_windows, token_windows
from ..eval.quality import full_logits, score_windows, token_metrics
from ..eval.static_search import greedy_path
from ..model.adapters import SkipAdapter, load_adapters, save_adapters
from .adapter_ridge import fit_ridge_adapters
from .checkpoints import load_checkpoint, run_directory, save_checkpoint, seeded_generator
from .distillation import RelaxedGateController, collate, distill_step, gated_run
from .gated_forward import GatedForward
from .mixed_corpus import load_corpus
from .options import option

SELECTION_BUDGETS = (0.5, 0.6, 0.7, 0.75, 0.8, 0.9)
HELDOUT_BUDGETS = (0.75, 0.5)
PRECISIONS = ("auto", "bf16", "fp32")
CHECKPOINTS = ("ridge.json", "static_order.json", "reorder.json", "distill_checkpoint.pt",
               "controller.json")


@dataclass
class TrainConfig:
    """Each field is an `anee-fast train-controller` option, with its help."""
    corpus: Optional[str] = option(
        None, "a build-corpus directory (several sources, chat answers) or a plain-text file "
              "(default: Python's offline pydoc topics)")
    seq_len: int = option(128, "tokens per training window")
    heldout_fraction: float = option(0.2, "plain-text corpus: last share of windows held out")
    rank: int = option(128, "rank of each layer's skip adapter")
    ridge: float = option(1e-2, "ridge penalty, relative to the inputs' mean square")
    ridge_windows: int = option(64, "training windows the ridge fit reads")
    ridge_passes: int = option(2, "ridge fits, each after the first on the inputs the previous "
                                  "adapters give")
    search_windows: int = option(4, "training windows the static-order search scores")
    search_len: int = option(64, "tokens of each static-order search window")
    search_width: int = option(4, "static-order search: candidates measured again per step")
    first_search_width: int = option(4, "the same for the first search, with the ridge adapters "
                                        "(with reorder_step the order is searched again later)")
    steps: int = option(60, "distillation steps")
    reorder_step: int = option(0, "distillation step at which the static order is searched again "
                                  "with the adapters distilled so far (0: never)")
    batch: int = option(4, "windows per distillation step")
    precision: str = option("auto", "distillation's matrix products: bf16 (autocast: bfloat16 "
                                    "products, float32 residual, loss and parameters), fp32, or "
                                    "auto (bf16 where the CPU computes bfloat16 natively)")
    lr_adapters: float = option(3e-4, "distillation: the adapters' learning rate")
    lr_controller: float = option(1e-3, "distillation: the controller net's learning rate")
    margin: float = option(3.0, "the net overrides its static fallback where |logit| exceeds this")
    min_budget: float = option(0.4, "distillation budgets are drawn uniformly in [this, 1]")
    temperature: float = option(0.5, "temperature of the relaxed PROCESS gate")
    overspend_weight: float = option(5.0, "starting weight of the expected-overspend penalty")
    overspend_rate: float = option(20.0, "how fast that weight rises while the net overspends")
    select_windows: int = option(6, "set-aside training windows that choose net or static set")
    eval_windows: int = option(8, "held-out windows for the final report, 0 = none")
    checkpoint_every: int = option(10, "distillation steps between checkpoints")
    width: int = option(32, "controller network: hidden width")
    proj_dim: int = option(8, "controller network: width of its projection of the hidden state")
    seed: int = option(0, "seed of every random draw")

    def validate(self):
        for name in ("seq_len", "rank", "ridge_windows", "ridge_passes", "search_windows",
                     "search_len", "search_width", "first_search_width", "batch", "select_windows",
                     "checkpoint_every", "width", "proj_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("steps", "reorder_step", "eval_windows", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        for name in ("lr_adapters", "lr_controller", "temperature", "ridge"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("margin", "overspend_weight", "overspend_rate"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.reorder_step >= self.steps and self.reorder_step:
            raise ValueError(f"reorder_step must be below steps={self.steps} (or 0: never), got "
                             f"{self.reorder_step!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got "
                             f"{self.precision!r}")
        if not 0.0 <= self.min_budget < 1.0:
            raise ValueError(f"min_budget must be in [0, 1), got {self.min_budget!r}")


# ---- stage 1: windows ----------------------------------------------------------------------------

def training_windows(llm, config: TrainConfig, windows=None) -> tuple:
    """(train, select, heldout): token windows, and {source: held-out windows}. A build-corpus
    directory gives every source's training part, interleaved, each source as many windows as
    the smallest, and each source's held-out part; a file, the pydoc topics or `windows` (token
    lists) is split by config.heldout_fraction (one source, "text"). `select` comes out of the
    training part."""
    path = config.corpus
    if windows is not None:
        train, heldout = split_windows(windows, config.heldout_fraction)
    elif llm.tokenizer is None:
        raise ValueError("training cuts text into tokens: the model needs a tokenizer")
    elif path is not None and Path(path).is_dir():
        parts = load_corpus(path, llm.tokenizer, config.seq_len)
        train = _interleave([parts[s][0] for s in sorted(parts)])
        heldout = {source: parts[source][1] for source in sorted(parts)}
    else:
        windows = token_windows(llm.tokenizer, corpus_text(path), config.seq_len)
        train, heldout = split_windows(windows, config.heldout_fraction)
    if not isinstance(heldout, dict):
        heldout = {"text": heldout}
    if len(train) <= config.select_windows:
        raise ValueError(f"{len(train)} training windows: need more than select_windows="
                         f"{config.select_windows} (give more text or a shorter seq_len)")
    select = evenly_spaced(train, config.select_windows)
    chosen = {id(w) for w in select}
    return [w for w in train if id(w) not in chosen], select, heldout


def _interleave(lists) -> list:
    """The lists' items taken in turn, as many from each as the shortest holds: every source
    weighs the same, and every stretch of the result mixes them."""
    return [item for group in zip(*lists) for item in group]


# ---- stage 4: distillation -------------------------------------------------------------------------

def distill(llm, forward, windows, adapters, controller, config: TrainConfig, out: Path,
            resume: bool, progress: bool = True, reorder=None, bf16: bool = False) -> list:
    """Trains `adapters` (lists of float32 parameters) and controller.net in place; returns the
    per-step log. Checkpoints every config.checkpoint_every steps and at config.reorder_step,
    where it calls `reorder()` (which gives the static fallback its new order) first. bf16: each
    step under bfloat16 autocast (resolved_precision)."""
    params = [p for a in adapters for p in a]
    optimizer = torch.optim.Adam([{"params": params, "lr": config.lr_adapters},
                                  {"params": list(controller.net.parameters()),
                                   "lr": config.lr_controller}])
    state = {"step": 0, "mu": config.overspend_weight, "log": []}
    path = out / "distill_checkpoint.pt"
    if resume and path.exists():
        saved = load_checkpoint(path)
        with torch.no_grad():
            for p, v in zip(params, saved["adapters"]):
                p.copy_(v)
        controller.net.load_state_dict(saved["net"])
        optimizer.load_state_dict(saved["optimizer"])
        state = saved["state"]
    pad = pad_id(llm)
    from tqdm import tqdm
    bar = tqdm(total=config.steps, initial=state["step"], desc="distillation", unit="step",
               disable=not progress)
    while state["step"] < config.steps:
        step = state["step"]
        if reorder is not None and step == config.reorder_step > 0:
            reorder()
        g = seeded_generator(config.seed, "distill", step)
        picks = torch.randint(0, len(windows), (config.batch,), generator=g).tolist()
        ids, mask = collate([windows[i] for i in picks], pad)
        budgets = config.min_budget + (1 - config.min_budget) * torch.rand(config.batch, generator=g)
        controller.generator = g
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            with torch.no_grad():     # the full model's final normed residual: its logits' input
                teacher = forward.final_normed(
                    forward.run(ids, lambda l, h, hp: torch.ones(ids.shape))).float()
            loss, kl, over, compute = distill_step(forward, ids, mask, teacher, llm.depth,
                                                   budgets, adapters, controller, state["mu"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        state["mu"] = max(0.0, state["mu"] + config.overspend_rate * float(over))
        state["log"].append({"step": step, "kl": float(kl), "overspend": float(over),
                             "compute": float(compute), "budget": float(budgets.mean()),
                             "mu": state["mu"]})
        state["step"] += 1
        bar.update(1)
        bar.set_postfix(kl=f"{float(kl):.3f}", compute=f"{float(compute):.2f}")
        if (state["step"] % config.checkpoint_every == 0
                or state["step"] in (config.steps, config.reorder_step)):
            save_checkpoint({"adapters": [p.detach().clone() for p in params],
                             "net": controller.net.state_dict(),
                             "optimizer": optimizer.state_dict(), "state": state}, path)
    bar.close()
    return state["log"]


def resolved_precision(precision: str) -> str:
    """"bf16" or "fp32" for config.precision; "auto" is bf16 only where oneDNN (PyTorch's CPU
    matrix products) has native bfloat16 instructions: elsewhere it emulates them, slower than
    float32, and an explicit "bf16" there warns so."""
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if precision == "bf16" and not native:
        warnings.warn("precision bf16: this CPU has no native bfloat16 instructions, so the "
                      "matrix products emulate them, slower than fp32 (auto would pick fp32)")
    if precision != "auto":
        return precision
    return "bf16" if native else "fp32"


# ---- stage 5 and the report: KL per budget ---------------------------------------------------------

def budget_metrics(llm, controller, windows, budgets, full=None) -> list:
    """[{budget, kl, top1, compute, max_compute, within_budget}] of `controller` on `windows`."""
    full = full if full is not None else full_logits(llm, windows, progress=False)
    rows = []
    for budget in budgets:
        logits, traces = score_windows(llm, windows, energy_budget=budget, controller=controller,
                                       progress=False)
        metrics = [token_metrics(f, q) for f, q in zip(full, logits)]
        compute = torch.cat([t.compute for t in traces])
        rows.append({"budget": budget, "kl": float(torch.cat([m["kl"] for m in metrics]).mean()),
                     "top1": float(torch.cat([m["top1"] for m in metrics]).float().mean()),
                     "compute": float(compute.mean()), "max_compute": float(compute.max()),
                     "within_budget": bool(compute.max() <= llm.depth.effective_budget(budget) + 1e-6)})
    return rows


def select_controller(llm, controller, windows) -> dict:
    """Sets the static fallback's trusted band [net_min_budget, net_max_budget] (best_band) from
    the KL at SELECTION_BUDGETS on `windows` of the net with its fallback and of the static set
    alone."""
    full = full_logits(llm, windows, progress=False)
    fallback = controller.config["static_fallback"]
    kl = {}
    for name, band in (("net", (0.0, 1.0)), ("static", (1.0, 1.0))):
        controller.config["static_fallback"] = dict(fallback, net_min_budget=band[0],
                                                    net_max_budget=band[1])
        rows = budget_metrics(llm, controller, windows, SELECTION_BUDGETS, full)
        kl[name] = [r["kl"] for r in rows]
    low, high, total = best_band(SELECTION_BUDGETS, kl["net"], kl["static"])
    controller.config["static_fallback"] = dict(fallback, net_min_budget=low, net_max_budget=high)
    n = len(SELECTION_BUDGETS)
    return {"budgets": list(SELECTION_BUDGETS), "kl_net": kl["net"], "kl_static": kl["static"],
            "net_min_budget": low, "net_max_budget": high,
            "mean_kl": {"net": sum(kl["net"]) / n, "static": sum(kl["static"]) / n,
                        "chosen": total / n}}


def best_band(budgets, kl_net, kl_static) -> tuple:
    """(low, high, summed KL) of the band of budgets in which to trust the net: of the bands
    whose ends are `budgets` (ascending; one reaching the highest runs on to 1.0) and none
    ((1.0, 1.0): the net never trusted), the least KL summed over `budgets`, the net's inside
    the band and the static set's outside it. Ties (to 1e-6) go to the band of fewer budgets,
    then to the higher one."""
    n = len(budgets)

    def total(i, j):
        return sum(kl_net[k] if i <= k <= j else kl_static[k] for k in range(n))

    bands = [(0, -1)] + [(i, j) for i in range(n) for j in range(i, n)]    # (0, -1): none
    i, j = min(bands, key=lambda band: (round(total(*band), 6), band[1] - band[0], -band[0]))
    if j < i:
        return 1.0, 1.0, total(i, j)
    return budgets[i], 1.0 if j == n - 1 else budgets[j], total(i, j)


def static_order(llm, train, config: TrainConfig, width: int, path: Path, resume: bool,
                 progress: bool) -> list:
    """The decidable layers in the order they are best given up, with llm's adapters in place:
    greedy ablation of `width` candidates a step on config.search_windows training windows (read
    from `path` on resume, written there otherwise)."""
    if resume and path.exists():
        return json.loads(path.read_text())["order"]
    search = [w[:config.search_len] for w in evenly_spaced(train, config.search_windows)]
    steps = greedy_path(llm, search, llm.depth.floor, width=width,
                        progress=progress, use_cache=False)
    order = [next(iter(set(b["skip"]) - set(a["skip"]))) for a, b in zip(steps, steps[1:])]
    path.write_text(json.dumps({"order": order, "path": steps}, indent=1) + "\n")
    return order


# ---- the whole recipe -------------------------------------------------------------------------------

def train_controller(llm, out_dir, config: TrainConfig = None, resume: bool = False,
                     progress: bool = True, windows=None, float_weights=None) -> dict:
    """Runs the recipe (module docstring) into `out_dir`; returns the log. `llm` ends with the
    trained adapters in place. windows: token lists to train on instead of config.corpus.
    float_weights: the same model's float ModelWeights when llm's are quantized: the gradients
    run through them, while llm (its SKIP cost, hence the budgets, and every score) is what the
    controller will run with. A GGUF's blocks dequantize to exactly these floats."""
    config = config or TrainConfig()
    config.validate()
    out = run_directory(out_dir, resume, CHECKPOINTS)
    spec = llm.spec
    timings = {}
    precision = resolved_precision(config.precision)
    log = {"config": asdict(config), "model": str(llm.name), "timings_s": timings,
           "precision": precision}
    start = time.perf_counter()
    train, select, heldout = training_windows(llm, config, windows)
    log.update(train_windows=len(train), select_windows=len(select),
               heldout_windows={source: len(w) for source, w in heldout.items()})
    llm.set_adapters(None)
    forward = GatedForward(llm.weights if float_weights is None else float_weights)
    pad = pad_id(llm)

    # 2. ridge adapters (the skip cost they add counts in the budgets they are fitted for)
    ridge_path = out / "ridge.json"
    if resume and ridge_path.exists():
        adapters, _ = load_adapters(ridge_path, spec.num_layers, spec.hidden_size)
    else:
        llm.set_adapters(_zero_adapters(spec, config.rank))
        depth = llm.depth
        llm.set_adapters(None)
        adapters = fit_ridge_adapters(forward, evenly_spaced(train, config.ridge_windows), depth,
                                      rank=config.rank, ridge=config.ridge,
                                      passes=config.ridge_passes, pad_id=pad,
                                      generator=seeded_generator(config.seed, "ridge"),
                                      progress=progress)
        save_adapters(adapters, ridge_path, str(llm.name), {"fitted": "ridge"})
    llm.set_adapters(adapters)
    timings["ridge"] = time.perf_counter() - start

    # 3. the static order with these adapters
    start = time.perf_counter()
    order = static_order(llm, train, config, config.first_search_width, out / "static_order.json",
                         resume, progress)
    timings["static_order"] = time.perf_counter() - start

    # 4. distillation: adapters and net together, the net starting as the static set
    start = time.perf_counter()
    controller = BudgetConditionedController.new(spec.num_layers, spec.hidden_size, str(llm.name),
                                                 config.width, config.proj_dim)
    controller.config["static_fallback"] = {"order": order, "margin": config.margin}
    net = controller.net.train()
    torch.nn.init.zeros_(net.out.weight)
    torch.nn.init.zeros_(net.out.bias)
    relaxed = RelaxedGateController(net, config.temperature, None,
                                    controller.config["static_fallback"])
    params = [[torch.nn.Parameter(t.detach().float().clone()) for t in a.tensors()]
              for a in adapters]
    with torch.no_grad():         # feature statistics for the net's input normalisation
        relaxed.generator = seeded_generator(config.seed, "normalisation")
        relaxed.scalars = []
        ids, _ = collate(train[:config.batch], pad)
        gated_run(forward, ids, llm.depth, torch.linspace(config.min_budget, 1.0, len(ids)),
                  params, relaxed)
        net.set_normalisation(torch.cat(relaxed.scalars))
        relaxed.scalars = None
    reorder_path = out / "reorder.json"

    def reorder():      # the static order again, with the adapters distilled so far
        started = time.perf_counter()
        llm.set_adapters([SkipAdapter(*(p.detach().clone() for p in a)) for a in params])
        relaxed.fallback["order"] = static_order(llm, train, config, config.search_width,
                                                 reorder_path, resume, progress)
        timings["reorder"] = time.perf_counter() - started

    if resume and reorder_path.exists():
        relaxed.fallback["order"] = json.loads(reorder_path.read_text())["order"]
    log["distillation"] = distill(llm, forward, train, params, relaxed, config, out, resume,
                                  progress, reorder, bf16=precision == "bf16")
    adapters = [SkipAdapter(*(p.detach().clone() for p in a)) for a in params]
    save_adapters(adapters, out / "adapters.json", str(llm.name),
                  {"fitted": "ridge, then distilled", "recipe": asdict(config)})
    llm.set_adapters(adapters)
    controller.net.eval()
    timings["distillation"] = time.perf_counter() - start - timings.get("reorder", 0.0)

    # 5. from which budget the net is trusted, on set-aside training windows
    start = time.perf_counter()
    log["selection"] = select_controller(llm, controller, select)
    timings["selection"] = time.perf_counter() - start
    if config.eval_windows:
        log["heldout"] = [dict(row, source=source) for source, windows in heldout.items()
                          for row in budget_metrics(llm, controller,
                                                    evenly_spaced(windows, config.eval_windows),
                                                    HELDOUT_BUDGETS)]
    timings["total"] = sum(timings.values())
    controller.save(out, extra={"adapters": "adapters.json",
                                "training": {"recipe": asdict(config), "timings_s": timings,
                                             "selection": log["selection"],
                                             "heldout": log.get("heldout")}})
    (out / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
    from ..eval.plots import plot_controller_training
    plot_controller_training(log, out / "training_curve.png")
    return log


def pad_id(llm) -> int:
    """The token that pads short windows (never scored: any id would do)."""
    return getattr(llm.tokenizer, "eos_token_id", None) or 0


def _zero_adapters(spec, rank: int) -> list:
    """Adapters of `rank` that add nothing: what the depth accounting of that rank reads."""
    h = spec.hidden_size
    return [SkipAdapter(torch.zeros(rank, h), torch.zeros(h, rank), torch.zeros(h))
            for _ in range(spec.num_layers)]
