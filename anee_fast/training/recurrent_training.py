"""Training a small weight-tied transformer on chained modular arithmetic, then its halting heads.

1. The model (RecurrentTransformer): each step draws num_ops uniformly in 1..train_max_ops per
   chain; every digit is trained to predict the running value and "=" the answer (dense targets:
   a chain of L operations holds problems of every size up to L). A `full_depth_share` of the
   chains run all R iterations; every other token runs a random number in 1..R (its later
   iterations SKIPped, as a halted token's are), so the model answers at any depth and reads
   context tokens that halted.
2. The halting heads, on the frozen model: for fresh chains, every token's cross-entropy CE_r
   when all tokens exit after r iterations (0 for tokens without a target: only compute counts
   there) and the states the heads read. Early head: regress CE_1..CE_R from the state after the
   prelude (squared error); it runs argmin_r predicted CE_r + penalty * r / R. (Minimising
   E_q[CE_r] + penalty * E_q[r] / R over a softmax q instead stalled with the same q for every
   difficulty: measured, see docs/recurrent.md.) Online head: with halting probabilities l_r,
   the exit distribution p(r) = l_r * prod_{j<r}(1 - l_j) (the last iteration takes the rest),
   minimise E_p[CE_r] + penalty * E_p[r] / R. No label says how hard a token is.
3. On-policy fine-tuning (`policy_steps`, 0 to leave out): the model trains further on chains
   whose tokens run the depths the stage-2 heads give them (a `policy_share` of the chains, split
   between the two heads; the rest as in stage 1), so it learns to read context tokens that
   halted where the heads halt them rather than at random depths. Then the heads are fitted
   again, on a fresh exit table of the fine-tuned model. Without this stage a 2.95 M model's
   halting lost to fixed depth at equal compute (docs/recurrent.md).

The run checkpoints into its directory and resumes (`resume=True`); per-step randomness comes
from (seed, stage, step) (training/checkpoints.py), so a resumed run draws what an unbroken one
would.
"""
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..control.halting import KINDS, early_plan, new_head, save_heads
from ..eval.modular_task import IGNORE, ModularTask
from ..model import recurrent as recurrent_model
from ..model.recurrent import RecurrentConfig, RecurrentTransformer
from .checkpoints import load_checkpoint, run_directory, save_checkpoint, seeded_generator
from .options import option


@dataclass
class RecurrentTrainConfig:
    """Each field is an `anee-fast train-recurrent` option, with its help."""
    modulus: int = option(5, "the task's modulus")
    train_max_ops: int = option(4, "operations per training chain: drawn uniformly in 1..this")
    full_depth_share: float = option(
        0.5, "share of the training chains whose tokens all run every iteration; the others run "
             "random depths")
    hidden_size: int = option(256, "model width")
    num_heads: int = option(8, "attention heads")
    num_kv_heads: int = option(4, "K/V heads")
    intermediate_size: int = option(768, "MLP width")
    prelude: int = option(1, "layers before the recurrent block")
    block: int = option(1, "layers in the recurrent block")
    iterations: int = option(8, "times the block runs at full depth")
    coda: int = option(1, "layers after the recurrent block")
    steps: int = option(1500, "model training steps")
    batch: int = option(64, "chains per step")
    lr: float = option(2e-3, "model learning rate")
    weight_decay: float = option(0.01, "AdamW weight decay")
    halting_examples: int = option(2048, "fresh chains the halting heads learn from")
    halting_steps: int = option(500, "optimisation steps per halting head")
    halting_lr: float = option(3e-3, "halting heads' learning rate")
    halting_width: int = option(64, "hidden width of the halting heads")
    compute_penalty: float = option(0.2, "nats of cross-entropy a full depth of compute is worth")
    policy_steps: int = option(
        300, "on-policy fine-tuning steps after the first head fit, then the heads are fitted "
             "again; 0 leaves the stage out")
    policy_lr: float = option(3e-4, "on-policy fine-tuning learning rate")
    policy_share: float = option(
        0.5, "share of the fine-tuning chains whose tokens run the depths the halting heads pick")
    checkpoint_every: int = option(250, "steps between checkpoints")
    seed: int = option(0, "seed of every random draw")

    def validate(self):
        for name in ("train_max_ops", "steps", "batch", "halting_examples", "halting_steps",
                     "halting_width", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.policy_steps, bool) or not isinstance(self.policy_steps, int) \
                or self.policy_steps < 0:
            raise ValueError(f"policy_steps must be an integer >= 0, got {self.policy_steps!r}")
        for name in ("lr", "halting_lr", "policy_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("full_depth_share", "policy_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        for name in ("weight_decay", "compute_penalty"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        ModularTask(self.modulus)
        self.model_config()

    def model_config(self) -> RecurrentConfig:
        task = ModularTask(self.modulus)
        return RecurrentConfig(
            vocab_size=task.vocab_size, hidden_size=self.hidden_size, num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads, intermediate_size=self.intermediate_size,
            prelude=self.prelude, block=self.block, iterations=self.iterations, coda=self.coda,
            max_positions=max(64, 2 * task.prompt_length(4 * self.train_max_ops)))


def depth_mask(config: RecurrentConfig, iterations: torch.Tensor) -> torch.Tensor:
    """process [..., L] bool for tokens that run `iterations` [...] of the block (prelude and
    coda always run)."""
    layers = torch.arange(config.num_layers)
    done = (layers - config.prelude).div(config.block, rounding_mode="floor")
    recurrent = (layers >= config.prelude) & (layers < config.iteration_end(config.iterations))
    return ~recurrent | (done < iterations[..., None])


def training_batch(task: ModularTask, config: RecurrentConfig, max_ops: int, batch: int,
                   full_depth_share: float, g):
    """(ids [n, T], targets [n, T], per-token iterations [n, T]): num_ops uniform in 1..max_ops;
    a full_depth_share of the chains run R iterations, the other tokens a random number."""
    num_ops = torch.randint(1, max_ops + 1, (batch,), generator=g)
    ids, targets = task.batch(num_ops.tolist(), g)
    iterations = torch.randint(1, config.iterations + 1, ids.shape, generator=g)
    full = torch.rand(batch, generator=g) < full_depth_share
    iterations[full] = config.iterations
    return ids, targets, iterations


def token_loss(model, ids, targets, iterations, answer_id: int):
    """(mean cross-entropy over every target, accuracy of the answers at "=")."""
    logits = model(ids, depth_mask(model.config, iterations))
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
    answer = ids == answer_id
    return loss, (logits.argmax(-1)[answer] == targets[answer]).float().mean()


# ---- stage 2: halting heads ---------------------------------------------------------------------

@torch.no_grad()
def head_inputs(model, ids):
    """The residuals the heads read, from one full-depth pass: (after the prelude [..., hidden],
    after each iteration r = 1..R [..., R, hidden])."""
    c = model.config
    hidden = []
    model(ids, hidden_states=hidden)
    after_prelude = hidden[c.prelude - 1] if c.prelude else model.embed(ids)
    return after_prelude, torch.stack([hidden[c.iteration_end(r) - 1]
                                       for r in range(1, c.iterations + 1)], -2)


@torch.no_grad()
def exit_table(model, task: ModularTask, max_ops: int, examples: int, g, batch: int = 256):
    """One row per token of `examples` fresh chains (padding left out): {ce [n, R]: its
    cross-entropy when every token exits after r iterations (0 where it has no target),
    after_prelude [n, hidden] and states [n, R, hidden]: the residuals the heads read, answer [n]:
    whether it is an "=" token}."""
    c = model.config
    R = c.iterations
    parts = {"ce": [], "after_prelude": [], "states": [], "answer": []}
    pad, answer_id = task.token_id("<pad>"), task.token_id("=")
    for start in range(0, examples, batch):
        n = min(batch, examples - start)
        ids, targets, _ = training_batch(task, c, max_ops, n, 1.0, g)
        real = ids != pad
        after_prelude, states = head_inputs(model, ids)
        parts["after_prelude"].append(after_prelude[real])
        parts["states"].append(states[real])
        ce = []
        for r in range(1, R + 1):
            logits = model(ids, depth_mask(c, torch.full(ids.shape, r)))
            ce.append(F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                                      reduction="none").view(ids.shape)[real])
        parts["ce"].append(torch.stack(ce, 1))
        parts["answer"].append(ids[real] == answer_id)
    return {k: torch.cat(v) for k, v in parts.items()}


def online_exit_distribution(head, table) -> torch.Tensor:
    """[n, R]: the online head's probability of exiting after each iteration."""
    n, R = table["ce"].shape
    r = torch.arange(1, R).repeat(n)
    halt = torch.sigmoid(head(table["states"][:, :R - 1].reshape(n * (R - 1), -1), r)).view(n, R - 1)
    survive = torch.cumprod(torch.cat([torch.ones(n, 1), 1 - halt], 1), 1)     # [n, R]
    return torch.cat([halt, torch.ones(n, 1)], 1) * survive


def fit_halting_head(kind: str, table, config: RecurrentTrainConfig, progress: bool = True):
    """Trains one head on an exit table; returns (head, log)."""
    torch.manual_seed(config.seed)
    R = table["ce"].shape[1]
    head = new_head(kind, table["states"].shape[-1], R, config.halting_width)
    opt = torch.optim.Adam(head.parameters(), lr=config.halting_lr)
    cost = torch.arange(1, R + 1, dtype=torch.float32) / R
    log = []
    from tqdm import tqdm
    for step in tqdm(range(config.halting_steps), desc=f"{kind} halting head", unit="step",
                     disable=not progress):
        if kind == "early":
            predicted = head(table["after_prelude"])
            loss = F.mse_loss(predicted, table["ce"])
            p = F.one_hot(early_plan(predicted.detach(), config.compute_penalty) - 1, R).float()
        else:
            p = online_exit_distribution(head, table)
            loss = (p * table["ce"]).sum(-1).mean() + config.compute_penalty * (p * cost).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step + 1 == config.halting_steps:
            p = p.detach()
            log.append({"step": step + 1, "loss": float(loss.detach()),
                        "expected_ce": float((p * table["ce"]).sum(-1).mean()),
                        "expected_iterations": float((p * cost).sum(-1).mean()) * R})
    return head.eval(), log


def fit_heads(model, task: ModularTask, config: RecurrentTrainConfig, fit_round: int,
              progress: bool = True):
    """Both heads on a fresh exit table of the (frozen) model: (heads, logs, table)."""
    model.eval()
    table = exit_table(model, task, config.train_max_ops, config.halting_examples,
                       seeded_generator(config.seed, "halting", fit_round))
    heads, logs = {}, {}
    for kind in KINDS:
        heads[kind], logs[kind] = fit_halting_head(kind, table, config, progress)
    return heads, logs, table


# ---- stage 3: on-policy fine-tuning -----------------------------------------------------------

@torch.no_grad()
def head_iterations(model, heads: dict, ids, compute_penalty: float) -> dict:
    """{kind: iterations [n, T] the head gives every token}. The online head reads full-depth
    states; at inference a halted context changes them a little (a first-order stand-in)."""
    R = model.config.iterations
    after_prelude, states = head_inputs(model, ids)
    exit_at = torch.full(ids.shape, R)
    for r in range(R - 1, 0, -1):
        halt = heads["online"](states[..., r - 1, :], torch.full(ids.shape, r)) > 0.0
        exit_at = torch.where(halt, r, exit_at)
    return {"early": early_plan(heads["early"](after_prelude), compute_penalty), "online": exit_at}


def policy_batch(model, heads: dict, task: ModularTask, config: RecurrentTrainConfig, g):
    """A stage-1 batch in which a policy_share of the chains (each given to one head at random)
    run the depths that head picks."""
    ids, targets, iterations = training_batch(task, model.config, config.train_max_ops,
                                              config.batch, config.full_depth_share, g)
    picked = head_iterations(model, heads, ids, config.compute_penalty)
    on_policy = torch.rand(config.batch, generator=g) < config.policy_share
    head_of_chain = torch.randint(len(KINDS), (config.batch,), generator=g)
    for i, kind in enumerate(KINDS):
        rows = on_policy & (head_of_chain == i)
        iterations[rows] = picked[kind][rows]
    return ids, targets, iterations


# ---- the whole recipe -------------------------------------------------------------------------

def _optimise(model, config: RecurrentTrainConfig, stage: str, steps: int, lr: float, make_batch,
              ckpt_path: Path, answer_id: int, progress: bool, saved_with: dict = None):
    """`steps` AdamW steps of token_loss on make_batch(g) (warm-up, then cosine to zero) with
    checkpoints in ckpt_path (holding `saved_with` too), resuming from it when it exists.
    Returns (log, seconds)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=config.weight_decay)
    warmup = min(100, max(1, steps // 10))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + torch.cos(torch.tensor(torch.pi * min(s, steps) / steps)).item()))
    log, first, elapsed = [], 0, 0.0
    if ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path)
        if ckpt["config"] != asdict(config):
            raise ValueError(f"{ckpt_path} was made with other settings: {ckpt['config']}")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        schedule.load_state_dict(ckpt["schedule"])
        log, first, elapsed = ckpt["log"], ckpt["step"], ckpt["elapsed_s"]
    start = time.perf_counter()
    model.train()
    from tqdm import tqdm
    bar = tqdm(range(first, steps), desc=stage, unit="step", initial=first, total=steps,
               disable=not progress)
    window = []
    for step in bar:
        ids, targets, iterations = make_batch(seeded_generator(config.seed, stage, step))
        loss, accuracy = token_loss(model, ids, targets, iterations, answer_id)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        window.append((float(loss.detach()), float(accuracy)))
        if (step + 1) % 50 == 0 or step + 1 == steps:
            mean_loss = sum(x for x, _ in window) / len(window)
            mean_acc = sum(a for _, a in window) / len(window)
            log.append({"step": step + 1, "loss": mean_loss, "accuracy": mean_acc})
            bar.set_postfix(loss=f"{mean_loss:.3f}", acc=f"{mean_acc:.2f}")
            window = []
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == steps:
            save_checkpoint({"model": model.state_dict(), "optimizer": opt.state_dict(),
                             "schedule": schedule.state_dict(), "log": log, "step": step + 1,
                             "config": asdict(config),
                             "elapsed_s": elapsed + time.perf_counter() - start,
                             **(saved_with or {})}, ckpt_path)
    model.eval()
    return log, elapsed + time.perf_counter() - start


def train_recurrent(out_dir, config: RecurrentTrainConfig = None, resume: bool = False,
                    progress: bool = True) -> dict:
    """Runs the recipe into `out_dir`: the model (recurrent_config.json + model.safetensors),
    both halting heads (halting-*.safetensors + halting.json), training_log.json,
    training_curve.png, checkpoint.pt and (with policy_steps) policy_checkpoint.pt. Returns
    the log."""
    config = config or RecurrentTrainConfig()
    config.validate()
    out = run_directory(out_dir, resume, ("checkpoint.pt",))
    ckpt_path, policy_path = out / "checkpoint.pt", out / "policy_checkpoint.pt"
    task = ModularTask(config.modulus)
    answer_id = task.token_id("=")
    torch.manual_seed(config.seed)
    model = RecurrentTransformer(config.model_config())
    log, timings = {}, {}
    log["model_log"], timings["model"] = _optimise(
        model, config, "recurrent model", config.steps, config.lr,
        lambda g: training_batch(task, model.config, config.train_max_ops, config.batch,
                                 config.full_depth_share, g),
        ckpt_path, answer_id, progress)

    start = time.perf_counter()
    if config.policy_steps and policy_path.exists():      # resuming: the policy is saved with it
        saved = load_checkpoint(policy_path)
        heads = {kind: new_head(kind, config.hidden_size, config.iterations, config.halting_width)
                 for kind in KINDS}
        for kind, head in heads.items():
            head.load_state_dict(saved["policy_heads"][kind])
        timings["halting"] = saved["halting_s"]
    else:
        heads, log["halting_log"], table = fit_heads(model, task, config, 0, progress)
        timings["halting"] = time.perf_counter() - start
    if config.policy_steps:
        policy = {kind: head.eval() for kind, head in heads.items()}
        log["policy_log"], timings["policy"] = _optimise(
            model, config, "on-policy fine-tuning", config.policy_steps, config.policy_lr,
            lambda g: policy_batch(model, policy, task, config, g), policy_path, answer_id,
            progress, {"policy_heads": {k: h.state_dict() for k, h in policy.items()},
                       "halting_s": timings["halting"]})
        start = time.perf_counter()
        heads, log["halting_log"], table = fit_heads(model, task, config, 1, progress)
        timings["refit"] = time.perf_counter() - start
    recurrent_model.save(model, out)
    save_heads(out, heads, config.halting_width, config.compute_penalty)
    full = {"config": asdict(config), "task": {"modulus": config.modulus},
            "model": asdict(model.config), "parameters": sum(p.numel() for p in model.parameters()),
            "timings_s": timings, **log,
            "exit_ce_by_iteration": table["ce"][table["answer"]].mean(0).tolist()}
    (out / "training_log.json").write_text(json.dumps(full, indent=2) + "\n")
    from ..eval.plots import plot_recurrent_training
    plot_recurrent_training(full, out / "training_curve.png")
    return full
