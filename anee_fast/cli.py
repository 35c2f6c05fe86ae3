"""The `anee-fast` command line.

One subcommand per job, each a `_add_<name>(subparsers)` that registers its arguments and a
`_cmd_<name>(args) -> int` that runs it: `generate` is here; `serve`, `eval` and
`train-controller` go into `SUBCOMMANDS` the same way. Library errors (ValueError, OSError,
RuntimeError) become one line on stderr and a non-zero exit; set ANEE_FAST_DEBUG=1 for the
traceback instead.
"""
import argparse
import contextlib
import json
import math
import os
import sys
import time

PROG = "anee-fast"
EXIT_ERROR = 1
DTYPES = ("float32", "float16", "bfloat16")


class _Error(ValueError):
    """A bad command-line value, reported like a library error."""


# ---- generate ------------------------------------------------------------------------------------

def _add_generate(subparsers):
    p = subparsers.add_parser(
        "generate", help="generate text with adaptive depth under an energy budget",
        description="Generate a continuation of PROMPT, letting a controller choose per token and "
                    "layer to PROCESS, SKIP or EXIT within an energy budget, and report the compute "
                    "spent.")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--model", default=None, metavar="PATH_OR_ID",
                   help="local model directory, .gguf file or hub id (default: the embedded "
                        "SmolLM2-135M-Instruct)")
    p.add_argument("--budget", type=float, default=0.5,
                   help="energy budget: fraction of a full forward one token may spend, in [0, 1] "
                        "(default 0.5)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--controller", default="budget", metavar="budget|heuristic|PATH",
                   help="depth controller: 'budget', 'heuristic' or the path of a trained "
                        "(ANEE 0.4 format) controller file (default budget)")
    p.add_argument("--min-layers", type=int, default=2,
                   help="first layers every token always processes (default 2)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default 0)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the K likeliest tokens")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--ignore-eos", action="store_true",
                   help="keep generating past the end-of-sequence token (for timing)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap the prompt in the tokenizer's chat template (default: on when the "
                        "tokenizer has one)")
    p.add_argument("--backend", default="auto", help="reference | triton | native | auto (default)")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: cuda "
                                                  "when available)")
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="weight dtype (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--heatmap", metavar="OUT.png", help="write the token x layer execution heatmap")
    p.add_argument("--compute-plot", metavar="OUT.png", help="write the per-token compute plot")
    p.add_argument("--depth-plot", metavar="OUT.png", help="write the per-layer depth profile")
    p.add_argument("--json", metavar="OUT.json",
                   help="write text, token ids, per-token actions and compute, budget as JSON")
    p.set_defaults(func=_cmd_generate)


def _cmd_generate(args) -> int:
    # Check everything cheap before loading a model (loading can take a while).
    from .controllers import make_controller
    from .depth_policy import budget_floor
    from .engine import check_budget
    from .model_loader import ModelLoadError, check_local_path, default_device
    from .sampling import SamplingParams
    try:
        budget = check_budget(args.budget)
    except ValueError as e:
        raise _Error(f"--budget: {e}") from None
    if args.min_layers < 0:
        raise _Error(f"--min-layers must be >= 0, got {args.min_layers}")
    if not args.prompt:
        raise _Error("the prompt is empty")
    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, seed=args.seed, ignore_eos=args.ignore_eos)
    try:
        controller = make_controller(args.controller)
    except (ValueError, OSError) as e:
        raise _Error(f"--controller: {e}") from None
    try:
        model = None if args.model is None else check_local_path(args.model)
    except ModelLoadError as e:
        raise _Error(f"--model: {e}") from None
    try:
        default_device(args.device)
    except ValueError as e:
        raise _Error(f"--device: {e}") from None

    from .llm import LLM
    with _no_progress_bars():
        llm = LLM(model, backend=args.backend, device=args.device, dtype=args.dtype,
                  min_layers=args.min_layers)
    tokenizer = llm.tokenizer
    if tokenizer is None:
        raise _Error(f"the model {llm.name!r} comes without a tokenizer: save one next to it")
    prompt_ids, chat = _encode(tokenizer, args.prompt, args.chat)

    start = time.perf_counter()
    out = llm.generate(prompt_ids, params, energy_budget=budget, controller=controller)[0]
    seconds = time.perf_counter() - start

    trace = out.trace
    L = llm.num_layers
    runner = llm.engine.runner
    floor = budget_floor(L, trace.skip_cost, runner.min_layers, runner.always_last)
    stats = _stats(trace, len(out.token_ids), seconds)
    print(out.text, flush=True)
    print()
    print(_summary(llm, args, out, stats, budget, floor, chat), flush=True)

    all_ids = list(out.prompt_token_ids) + list(out.token_ids)
    written = []
    if args.heatmap or args.compute_plot or args.depth_plot:
        from . import plots
        if args.heatmap:
            tokens = [tokenizer.decode([t]) for t in all_ids[:trace.actions.shape[0]]]
            written.append(("heatmap", plots.plot_heatmap(trace, args.heatmap, tokens=tokens)))
        if args.compute_plot:
            written.append(("compute plot", plots.plot_compute(trace, args.compute_plot, floor=floor)))
        if args.depth_plot:
            written.append(("depth plot", plots.plot_depth_profile(trace, args.depth_plot)))
    if args.json:
        record = {
            "model": llm.name, "num_layers": L, "backend": llm.backend,
            "controller": args.controller, "prompt": args.prompt, "chat": chat,
            "text": out.text, "prompt_token_ids": list(out.prompt_token_ids),
            "token_ids": list(out.token_ids), "finish_reason": out.finish_reason,
            "budget": budget, "skip_cost": trace.skip_cost, "min_layers": args.min_layers,
            "floor": floor, "num_prompt_tokens": trace.num_prompt_tokens,
            "actions": trace.actions.tolist(), "compute": trace.compute.tolist(),
            "sampling": {"max_new_tokens": params.max_tokens, "temperature": params.temperature,
                         "top_k": params.top_k, "seed": params.seed,
                         "ignore_eos": params.ignore_eos},
            "summary": stats,
        }
        written.append(("json", _write_json(args.json, record)))
    for what, path in written:
        print(f"wrote {what}: {path}")
    return 0


@contextlib.contextmanager
def _no_progress_bars():
    """transformers' weight-loading bars would bury the one-line errors and the summary."""
    from transformers.utils import logging as hf_logging
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _encode(tokenizer, prompt, chat):
    """Token ids of the prompt; with chat, the chat template's text (it holds its own specials)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat and not has_template:
        raise _Error("--chat: this model's tokenizer has no chat template (use --no-chat)")
    chat = has_template if chat is None else chat
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             add_generation_prompt=True, tokenize=False)
        ids = tokenizer.encode(text, add_special_tokens=False)
    else:
        ids = tokenizer.encode(prompt)
    if not ids:
        raise _Error("the prompt encodes to no tokens")
    return [int(t) for t in ids], chat


def _stats(trace, num_generated, seconds) -> dict:
    runs = trace.layers_run.float()
    return {
        "tokens_traced": int(trace.actions.shape[0]),
        "generated_tokens": num_generated,
        "layers_run_mean": float(runs.mean()), "layers_run_min": int(runs.min()),
        "layers_run_max": int(runs.max()),
        "compute_mean": trace.mean_compute, "compute_max": float(trace.compute.max()),
        "compute_saved": trace.compute_saved,
        "seconds": seconds,
        "tokens_per_s": num_generated / seconds if seconds > 0 else math.inf,
    }


def _summary(llm, args, out, s, budget, floor, chat) -> str:
    L = llm.num_layers
    return "\n".join([
        f"--- {PROG}: {llm.name}, {L} layers, controller {args.controller}, backend {llm.backend}"
        f"{', chat template' if chat else ''} ---",
        f"tokens: {len(out.prompt_token_ids)} prompt + {s['generated_tokens']} generated "
        f"(finish: {out.finish_reason})",
        f"layers run per token: mean {s['layers_run_mean']:.1f} of {L} "
        f"(min {s['layers_run_min']}, max {s['layers_run_max']})",
        f"compute spent: {s['compute_mean']:.1%} of a full forward per token (max "
        f"{s['compute_max']:.1%}); energy budget {budget:.1%}, min_layers floor {floor:.1%}",
        f"compute saved: {s['compute_saved']:.1%}",
        f"speed: {s['generated_tokens']} tokens in {s['seconds']:.2f} s = "
        f"{s['tokens_per_s']:.1f} tokens/s (prefill included)",
    ])


def _write_json(path, record) -> str:
    path = os.fspath(path)
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    return path


# ---- entry point ---------------------------------------------------------------------------------

SUBCOMMANDS = (_add_generate,)   # later: _add_serve, _add_eval, _add_train_controller


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Adaptive-depth transformer decoding on a paged KV cache.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    if isinstance(error, OSError) and error.filename and str(error.filename) not in text:
        text = f"{text}: {error.filename}"
    return text or type(error).__name__


def main(argv=None) -> int:
    """Runs one subcommand; returns the exit status (also for argparse's usage errors)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:       # --help or a usage error argparse already reported
        return e.code if isinstance(e.code, int) else EXIT_ERROR
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as e:
        if os.environ.get("ANEE_FAST_DEBUG"):
            raise
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
