"""Quality against compute on held-out text, per controller and budget.

Per (controller, budget) on the held-out windows: realised compute (mean and max per token),
mean KL(full || controller) per token, top-1 agreement with the full model, perplexity of the
window's next tokens, and greedy-continuation agreement: from each window's first `prefix_len`
tokens both the full model and the controller generate `gen_tokens` tokens greedily (each
free-running on its own output), and the score is the fraction of the gen_tokens positions where
the two tokens are equal. Two figures say whether that continuation reads as text: `gen_ppl`,
the full model's perplexity of it given the prefix (pooled over windows), and `distinct2`, its
distinct 2-grams over all 2-grams (mean over windows; loops score low); the full model's own row
is what the others are read against. `within_budget` says every token, scored or generated, spent
at most max(budget, floor) (+1e-6), floor being the cost of the forced layers.
"""
import math
import sys
import time
from pathlib import Path

import torch

from ..control.controllers import StaticController
from ..control.registry import make_controller
from ..engine.sampling import SamplingParams
from .baselines import RandomSkipController, random_skip_prob, untrained_learned_controller
from .category_router import CategoryRouter
from .chat_answers import DEFAULT_PROMPTS, chat_answers, format_chat_markdown, format_chat_summary
from .corpus import corpus_text, evenly_spaced, split_windows, token_windows
from .quality import continuation_nll, distinct2, full_logits, score_windows, token_metrics
from .report import report, write_json, write_text
from .static_search import best_static_sets, skip_set_actions

DEFAULT_CONTROLLERS = ("budget", "heuristic", "random", "static", "router", "anee-untrained")
DEFAULT_BUDGETS = (1.0, 0.75, 0.5, 0.25)


def _per_window(value, budget, count):
    """A controller spec per window: value may be a spec or a callable budget -> spec(s)."""
    spec = value(budget) if callable(value) else value
    if isinstance(spec, list) and spec and not isinstance(spec[0], int):
        if len(spec) != count:
            raise ValueError(f"{len(spec)} per-window controllers for {count} windows")
        return spec
    return [spec] * count


def _greedy_tokens(llm, prefixes, gen_tokens, budget, controllers):
    params = SamplingParams(max_tokens=gen_tokens, temperature=0.0, ignore_eos=True)
    outs = llm.generate(prefixes, params, energy_budget=budget, controller=controllers)
    return [out.token_ids for out in outs], [out.trace for out in outs]


def _text_quality(llm, prefixes, continuations, progress) -> dict:
    """gen_ppl and distinct2 of greedy continuations (see the module doc)."""
    nll = torch.cat(continuation_nll(llm, prefixes, continuations, progress=progress))
    return {"gen_ppl": math.exp(float(nll.mean())),
            "distinct2": sum(distinct2(c) for c in continuations) / len(continuations)}


def evaluate(llm, controllers: dict, budgets, heldout_windows, *, prefix_len: int = 32,
             gen_tokens: int = 32, progress: bool = True) -> list:
    """One record per (controller, budget), plus one for the full model; see the module doc.

    controllers: name -> a controller spec (name, path, Controller, action list) used at every
    budget, or a callable budget -> spec, or budget -> list of one spec per held-out window.
    """
    windows = [list(w) for w in heldout_windows]
    if not windows:
        raise ValueError("no held-out windows to evaluate on")
    if min(len(w) for w in windows) <= prefix_len:
        raise ValueError(f"held-out windows must be longer than prefix_len={prefix_len} tokens")
    if gen_tokens < 2:
        raise ValueError(f"gen_tokens must be >= 2 (distinct2 counts 2-grams), got {gen_tokens}")
    budgets = [float(b) for b in budgets]
    if not budgets or any(not 0.0 <= b <= 1.0 for b in budgets):
        raise ValueError(f"budgets must be numbers in [0, 1], got {budgets}")
    full = full_logits(llm, windows, progress=progress)
    prefixes = [w[:prefix_len] for w in windows]
    reference, _ = _greedy_tokens(llm, prefixes, gen_tokens, 1.0, "budget")
    targets = [torch.tensor(w[1:]) for w in windows]
    full_nll = torch.cat([token_metrics(f, f, t)["nll"] for f, t in zip(full, targets)])
    records = [{"controller": "full", "budget": 1.0, "compute": 1.0, "compute_max": 1.0, "kl": 0.0,
                "top1": 1.0, "ppl": math.exp(float(full_nll.mean())), "greedy_agreement": 1.0,
                **_text_quality(llm, prefixes, reference, progress),
                "within_budget": True, "windows": len(windows),
                "tokens": sum(len(w) for w in windows)}]
    from tqdm import tqdm
    jobs = [(name, budget) for name in controllers for budget in budgets]
    for name, budget in tqdm(jobs, desc="evaluating", unit="run", disable=not progress):
        specs = _per_window(controllers[name], budget, len(windows))
        logits, traces = [None] * len(windows), [None] * len(windows)
        groups = {}
        for i, spec in enumerate(specs):
            groups.setdefault(id(spec), []).append(i)
        for members in groups.values():
            out, out_traces = score_windows(llm, [windows[i] for i in members], energy_budget=budget,
                                            controller=specs[members[0]], desc=f"{name} @ {budget:g}",
                                            progress=progress)
            for i, lg, tr in zip(members, out, out_traces):
                logits[i], traces[i] = lg, tr
        generated, gen_traces = _greedy_tokens(llm, prefixes, gen_tokens, budget, specs)
        metrics = [token_metrics(f, q, t) for f, q, t in zip(full, logits, targets)]
        compute = torch.cat([tr.compute.float().cpu() for tr in traces])
        spent_max = float(torch.cat([tr.compute.float().cpu() for tr in traces + gen_traces]).max())
        agreement = [sum(a == b for a, b in zip(g, r)) / gen_tokens
                     for g, r in zip(generated, reference)]
        records.append({
            "controller": name, "budget": budget,
            "compute": float(compute.mean()), "compute_max": float(compute.max()),
            "kl": float(torch.cat([m["kl"] for m in metrics]).mean()),
            "top1": float(torch.cat([m["top1"] for m in metrics]).float().mean()),
            "ppl": math.exp(float(torch.cat([m["nll"] for m in metrics]).mean())),
            "greedy_agreement": sum(agreement) / len(agreement),
            **_text_quality(llm, prefixes, generated, progress),
            "within_budget": spent_max <= llm.depth.effective_budget(budget) + 1e-6,
            "windows": len(windows), "tokens": int(compute.numel()),
        })
    return records


def weights_cost(llm, float_llm, windows, progress: bool = True) -> dict:
    """Mean KL(fp32 weights || llm's weights) and top-1 agreement at full depth: what a weight
    format trades for its bytes, before any layer is skipped."""
    metrics = [token_metrics(f, q) for f, q in zip(full_logits(float_llm, windows, progress),
                                                   full_logits(llm, windows, progress))]
    return {"kl_vs_fp32": float(torch.cat([m["kl"] for m in metrics]).mean()),
            "top1_vs_fp32": float(torch.cat([m["top1"] for m in metrics]).float().mean())}


def build_controllers(llm, names, budgets, train_windows, heldout_windows, *, search_windows: int = 16,
                      search_len: int = 64, search_width=6, router_k: int = 4, router_windows: int = 64,
                      prefix_len: int = 32, seed: int = 0, progress: bool = True) -> dict:
    """The controllers dict for evaluate() from names: the built-in baselines, 'learned', a
    controller file path, or NAME=PATH for a controller file under a chosen name."""
    controllers = {}
    L, depth = llm.num_layers, llm.depth
    search = [w[:search_len] for w in evenly_spaced(train_windows, search_windows)]
    for name in names:
        if name == "random":
            controllers[name] = lambda b: RandomSkipController(
                random_skip_prob(b, L, depth.skip_cost, depth.min_layers), seed=seed)
        elif name == "static":
            sets = best_static_sets(llm, search, budgets, width=search_width, progress=progress)
            statics = {b: StaticController(skip_set_actions(s["skip"], L)) for b, s in sets.items()}
            controllers[name] = lambda b, statics=statics: statics[b]
        elif name == "router":
            fit = [w[:search_len] for w in evenly_spaced(train_windows, router_windows)]
            router = CategoryRouter.build(llm, fit, k=router_k, prefix_len=prefix_len, seed=seed,
                                          progress=progress)
            categories = router.route(llm, heldout_windows)

            def routed(b, router=router, categories=categories):
                by_category = {c: StaticController(skip_set_actions(router.skip_set(llm, c, b), L))
                               for c in set(categories)}
                return [by_category[c] for c in categories]
            controllers[name] = routed
        elif name == "anee-untrained":
            controllers[name] = untrained_learned_controller(seed)
        elif "=" in name:
            label, path = name.split("=", 1)
            controllers[label] = make_controller(path)
        else:
            controllers[name] = make_controller(name)
    return controllers


def default_controller_names(out=sys.stdout) -> list:
    """The built-in baselines, plus 'learned' once a trained controller ships (said either way)."""
    try:
        make_controller("learned")
    except (ValueError, OSError) as e:
        print(f"note: no 'learned' controller in the comparison ({e})", file=out)
        return list(DEFAULT_CONTROLLERS)
    return list(DEFAULT_CONTROLLERS) + ["learned"]


def format_table(records) -> str:
    head = f"{'controller':<16}{'budget':>7}{'compute':>9}{'max':>7}{'KL':>9}{'top-1':>8}{'ppl':>11}" \
           f"{'greedy':>8}{'gen_ppl':>10}{'dist2':>7}  within"
    lines = [head, "-" * len(head)]
    for r in records:
        lines.append(f"{r['controller']:<16}{r['budget']:>7.2f}{r['compute']:>9.3f}{r['compute_max']:>7.3f}"
                     f"{r['kl']:>9.3f}{r['top1']:>8.3f}{r['ppl']:>11.4g}{r['greedy_agreement']:>8.3f}"
                     f"{r['gen_ppl']:>10.4g}{r['distinct2']:>7.3f}  "
                     f"{'yes' if r['within_budget'] else 'NO'}")
    return "\n".join(lines)


def run_eval(llm, *, budgets=DEFAULT_BUDGETS, text_path=None, controllers=None, windows: int = 8,
             seq_len: int = 128, heldout_fraction: float = 0.2, json_path=None, plot_path=None,
             chat_path=None, chat_max_tokens: int = 96, chat_prompt_budget=1.0, chat_set=None,
             float_llm=None, progress: bool = True, out=None, **build_options) -> list:
    """The whole `anee-fast eval`: corpus, split, baselines, evaluation, table, JSON and PNG; with
    chat_path, also the chat answers to DEFAULT_PROMPTS of every controller but the router (it
    routes held-out windows, not prompts), prompts read at chat_prompt_budget (None: at each
    budget), as markdown there, and their summary table; with chat_set (instructions, e.g. a
    chat corpus's held-out ones), their answers' summary too (six prompts are too few to count
    loops by), and their records next to json_path (<name>_chat_set.json). out: where
    the tables go (None: sys.stdout when called, so a replaced stdout is followed). float_llm:
    the same model with float32 weights, when `llm` stores them otherwise (int8, bf16, GGUF
    blocks): the full-depth record then also says what the format costs against it
    (kl_vs_fp32, top1_vs_fp32)."""
    out = sys.stdout if out is None else out
    if llm.tokenizer is None:
        raise ValueError("evaluation cuts text into tokens: the model needs a tokenizer")
    if isinstance(windows, bool) or not isinstance(windows, int) or windows < 1:
        raise ValueError(f"windows must be an integer >= 1, got {windows!r}")
    started = time.perf_counter()
    all_windows = token_windows(llm.tokenizer, corpus_text(text_path), seq_len)
    train, heldout = split_windows(all_windows, heldout_fraction)
    heldout = evenly_spaced(heldout, windows)
    names = list(controllers) if controllers else default_controller_names(out)
    built = build_controllers(llm, names, budgets, train, heldout, progress=progress, **build_options)
    records = evaluate(llm, built, budgets, heldout, progress=progress)
    summary = (f"{len(heldout)} held-out windows of {seq_len} tokens ({len(train)} training "
               f"windows), {time.perf_counter() - started:.0f} s")
    if float_llm is not None:
        cost = weights_cost(llm, float_llm, heldout, progress)
        records[0].update(weights=llm.weights.weight_format, **cost)
        summary += (f"\nweights {llm.weights.weight_format} against fp32 at full depth: KL "
                    f"{cost['kl_vs_fp32']:.4f}, top-1 {cost['top1_vs_fp32']:.3f}")
    from .plots import plot_quality_vs_compute
    report(records, f"{format_table(records)}\n{summary}", json_path=json_path, plot_path=plot_path,
           plot=plot_quality_vs_compute, out=out)
    chat = {name: spec for name, spec in built.items() if name != "router"}
    if (chat_path or chat_set) and len(chat) < len(built):
        print("note: chat answers leave out the router (it routes held-out windows)", file=out)
    if chat_path:
        answers = chat_answers(llm, DEFAULT_PROMPTS, budgets, chat, max_tokens=chat_max_tokens,
                               progress=progress, prompt_budget=chat_prompt_budget)
        print(format_chat_summary(answers), file=out)
        print(f"chat answers: {write_text(chat_path, format_chat_markdown(answers))}", file=out)
    if chat_set:
        answers = chat_answers(llm, chat_set, budgets, chat, max_tokens=chat_max_tokens,
                               progress=progress, prompt_budget=chat_prompt_budget)
        print(f"chat set: {len(chat_set)} instructions\n{format_chat_summary(answers)}", file=out)
        if json_path:
            path = Path(json_path)
            written = write_json(path.with_name(f"{path.stem}_chat_set.json"), answers)
            print(f"chat set records: {written}", file=out)
    return records
