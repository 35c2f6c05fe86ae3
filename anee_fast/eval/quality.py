"""Per-token quality of an adaptive-depth forward against the full-depth model."""
import torch
import torch.nn.functional as F


def score_windows(llm, windows, actions=None, *, energy_budget=1.0, controller="budget",
                  max_batch_tokens: int = 2048, desc: str = "scoring", progress: bool = True):
    """(logits, traces) per window, scored in ragged batches that fit the KV cache and token cap."""
    windows = [list(w) for w in windows]
    if actions is not None and len(actions) != len(windows):
        raise ValueError(f"{len(windows)} windows but {len(actions)} action matrices")
    manager = llm.engine.block_manager
    batches, current, tokens, blocks = [], [], 0, 0
    for index, window in enumerate(windows):
        need = -(-len(window) // manager.block_size)
        if need > manager.num_free:
            raise ValueError(f"a window of {len(window)} tokens needs {need} KV blocks, only "
                             f"{manager.num_free} exist: use shorter windows or raise num_kv_blocks")
        if current and (tokens + len(window) > max_batch_tokens or blocks + need > manager.num_free):
            batches.append(current)
            current, tokens, blocks = [], 0, 0
        current.append(index)
        tokens += len(window)
        blocks += need
    if current:
        batches.append(current)
    logits, traces = [None] * len(windows), [None] * len(windows)
    from tqdm import tqdm
    with tqdm(total=len(windows), desc=desc, unit="win", disable=not progress, leave=False) as bar:
        for batch in batches:
            batch_actions = None if actions is None else [actions[i] for i in batch]
            out, out_traces = llm.score([windows[i] for i in batch], batch_actions,
                                        energy_budget=energy_budget, controller=controller,
                                        return_trace=True)
            for i, lg, tr in zip(batch, out, out_traces):
                logits[i], traces[i] = lg, tr
            bar.update(len(batch))
    return logits, traces


def full_logits(llm, windows, progress: bool = True) -> list:
    """Full-depth float32 logits per window (every layer PROCESSed)."""
    L = llm.num_layers
    actions = [torch.zeros((len(w), L), dtype=torch.int8) for w in windows]
    logits, _ = score_windows(llm, windows, actions, desc="full model", progress=progress)
    return logits


def continuation_nll(llm, prefixes, continuations, progress: bool = True) -> list:
    """Per continuation, the full model's NLL [n] of each of its tokens given the prefix and the
    tokens before it: how plausible generated text is to the full model, whoever wrote it."""
    if len(prefixes) != len(continuations):
        raise ValueError(f"{len(prefixes)} prefixes but {len(continuations)} continuations")
    prefixes = [list(p) for p in prefixes]
    continuations = [list(c) for c in continuations]
    if any(not p for p in prefixes) or any(not c for c in continuations):
        raise ValueError("every prefix and every continuation needs at least one token")
    logits = full_logits(llm, [p + c for p, c in zip(prefixes, continuations)], progress=progress)
    nll = []
    for p, c, lg in zip(prefixes, continuations, logits):
        log_q = F.log_softmax(lg[len(p) - 1:len(p) + len(c) - 1].float(), dim=-1)
        nll.append(-log_q.gather(1, torch.tensor(c)[:, None])[:, 0])
    return nll


def distinct2(tokens) -> float:
    """Distinct 2-grams over all 2-grams of a token sequence: 1.0 when nothing repeats, near 0 for
    a loop (1 / (n - 1) for one token n times); the degenerate text low budgets write scores low."""
    tokens = list(tokens)
    if len(tokens) < 2:
        raise ValueError(f"distinct2 needs at least 2 tokens, got {len(tokens)}")
    pairs = list(zip(tokens, tokens[1:]))
    return len(set(pairs)) / len(pairs)


def token_kl(full: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(p_full || p) per position [T], float32, from log-softmaxes (no log of zero)."""
    if full.shape != logits.shape or full.dim() != 2:
        raise ValueError(f"full and logits must both be [T, vocab] of one shape, got "
                         f"{tuple(full.shape)} and {tuple(logits.shape)}")
    log_p = F.log_softmax(full.float(), dim=-1)
    log_q = F.log_softmax(logits.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0.0)


def token_metrics(full: torch.Tensor, logits: torch.Tensor, targets=None) -> dict:
    """Per-position `kl`, `top1` (argmax agreement, bool) and, given next-token targets, `nll`.

    targets[t] is the token that follows position t (length T, or T - 1 for a window's own
    tokens shifted by one, in which case the last position gets no nll).
    """
    metrics = {"kl": token_kl(full, logits), "top1": full.argmax(-1) == logits.argmax(-1)}
    if targets is not None:
        targets = torch.as_tensor(targets, dtype=torch.long)
        if targets.dim() != 1 or len(targets) > len(logits) or len(targets) < 1:
            raise ValueError(f"targets must be 1-D with 1..{len(logits)} entries, got shape "
                             f"{tuple(targets.shape)}")
        log_q = F.log_softmax(logits[:len(targets)].float(), dim=-1)
        metrics["nll"] = -log_q.gather(1, targets[:, None])[:, 0]
    return metrics
