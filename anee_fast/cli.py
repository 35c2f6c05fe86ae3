"""The `anee-fast` command line.

One subcommand per job, each a `_add_<name>(subparsers)` that registers its arguments and a
`_cmd_<name>(args) -> int` that runs it: `generate` is here; `serve`, `eval`,
`train-controller`, `train-recurrent`, `eval-recurrent` and `build-corpus` go into `SUBCOMMANDS` the same way. Library errors (ValueError, OSError,
RuntimeError) become one line on stderr and a non-zero exit; set ANEE_FAST_DEBUG=1 for the
traceback instead.
"""
import argparse
import contextlib
import dataclasses
import math
import os
import sys
import time
import typing

from .control.registry import CONTROLLER_NAMES
from .eval.evaluation import DEFAULT_CONTROLLERS
from .ops.backends import BACKENDS
from .training.controller_training import TrainConfig, train_controller
from .training.recurrent_training import RecurrentTrainConfig, train_recurrent

PROG = "anee-fast"
EXIT_ERROR = 1
DTYPES = ("float32", "float16", "bfloat16")
WEIGHTS = ("auto", "fp32", "bf16", "int8", "gguf")    # model/weight_storage.py


class _Error(ValueError):
    """A bad command-line value, reported like a library error."""


# ---- options and checks every subcommand shares ------------------------------------------------

BACKEND_HELP = (f"execution backend: {' | '.join(BACKENDS)} | auto (default: $ANEE_FAST_BACKEND, "
                "else the fastest available)")


def _controller_help(what: str) -> str:
    """What --controller accepts, from the registry's names (make_controller takes no action
    list from a string)."""
    return (f"{what}: {', '.join(CONTROLLER_NAMES)}, or a controller file path (trained: "
            "directory/.json/.safetensors; ANEE 0.4: .pt) (default %(default)s)")


def _add_threads_option(p):
    """--threads, on every subcommand that computes (LLM's threads=, llm.set_threads)."""
    p.add_argument("--threads", type=_thread_count, default=None,
                   help="torch CPU threads of this process (default: $ANEE_FAST_THREADS, else "
                        "torch's: one per core); fewer than the cores when other work shares them")


def _thread_count(text: str) -> int:
    """argparse type of --threads: an integer >= 1, refused before anything is loaded."""
    if not text.strip().isdecimal() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return int(text)


def _add_model_options(p, runtime: bool = True):
    """--model, --min-layers and --threads; with runtime, also --backend, --device and --dtype."""
    p.add_argument("--model", default=None, metavar="PATH_OR_ID",
                   help="local model directory, .gguf file or hub id (default: the embedded "
                        "SmolLM2-135M-Instruct)")
    p.add_argument("--min-layers", type=int, default=2,
                   help="first layers every token always processes (default 2)")
    _add_threads_option(p)
    if runtime:
        p.add_argument("--adapters", default="auto", metavar="PATH|auto|none",
                       help="skip adapters: a file or directory from train-controller, 'none', or "
                            "'auto' (the shipped ones for the embedded model; default)")
        p.add_argument("--backend", default="auto", help=BACKEND_HELP)
        p.add_argument("--device", default=None,
                       help="torch device, e.g. cpu or cuda (default: cuda when available)")
        p.add_argument("--dtype", default=None, choices=DTYPES,
                       help="activation dtype (default: bfloat16 on GPU, float32 on CPU)")
        _add_weights_option(p, "how the weights are stored")


def _add_weights_option(p, what: str):
    p.add_argument("--weights", default="auto", choices=WEIGHTS,
                   help=f"{what}: 'auto' (a .gguf's own blocks, e.g. the embedded model's 4-bit "
                        "Q4_1; a float model's floats; default), 'fp32', 'bf16', 'int8' (per "
                        "channel) or 'gguf'")


def _checked_model(args):
    """The --model path (None: the embedded model), checked with --min-layers (and --device)
    before anything slow is loaded."""
    from .model.loader import ModelLoadError, check_local_path, default_device
    if args.min_layers < 0:
        raise _Error(f"--min-layers must be >= 0, got {args.min_layers}")
    if getattr(args, "device", None) is not None:
        try:
            default_device(args.device)
        except ValueError as e:
            raise _Error(f"--device: {e}") from None
    try:
        return None if args.model is None else check_local_path(args.model)
    except ModelLoadError as e:
        raise _Error(f"--model: {e}") from None


def _checked_budget(value, flag="--budget", name="energy_budget") -> float:
    from .engine.llm_engine import check_budget
    try:
        return check_budget(value, name)
    except ValueError as e:
        raise _Error(f"{flag}: {e}") from None


def _checked_controller(value):
    from .control.registry import make_controller

    try:
        return make_controller(value)
    except (ValueError, OSError) as e:
        raise _Error(f"--controller: {e}") from None


def _llm_options(args, model, **engine_options) -> dict:
    """LLM's keyword arguments (`model` included) from the model options."""
    runtime = {k: getattr(args, k) for k in ("backend", "device", "dtype", "weights")
               if hasattr(args, k)}
    if hasattr(args, "adapters"):
        runtime["adapters"] = None if args.adapters == "none" else args.adapters
    return {"model": model, "min_layers": args.min_layers, "threads": args.threads,
            **runtime, **engine_options}


def _load_llm(args, model, **engine_options):
    """The LLM of the model options, quietly (loading bars would bury errors and summaries)."""
    from .llm import LLM
    with _no_progress_bars():
        return LLM(**_llm_options(args, model, **engine_options))


# ---- generate ------------------------------------------------------------------------------------

def _add_generate(subparsers):
    p = subparsers.add_parser(
        "generate", help="generate text with adaptive depth under an energy budget",
        description="Generate a continuation of PROMPT, letting a controller choose per token and "
                    "layer to PROCESS, SKIP or EXIT within an energy budget, and report the compute "
                    "spent.")
    p.add_argument("prompt", help="the prompt text")
    _add_model_options(p)
    p.add_argument("--budget", type=float, default=0.5,
                   help="energy budget: fraction of a full forward one token may spend, in [0, 1] "
                        "(default 0.5)")
    p.add_argument("--prompt-budget", type=float, default=1.0,
                   help="energy budget of the prompt's tokens, in [0, 1] (default 1.0: the prompt "
                        "is read at full depth and the budget saves on the generated tokens)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--controller", default="budget", metavar="NAME|PATH",
                   help=_controller_help("depth controller"))
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default 0)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the K likeliest tokens")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--ignore-eos", action="store_true",
                   help="keep generating past the end-of-sequence token (for timing)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap the prompt in the tokenizer's chat template (default: on when the "
                        "tokenizer has one)")
    p.add_argument("--heatmap", metavar="OUT.png", help="write the token x layer execution heatmap")
    p.add_argument("--compute-plot", metavar="OUT.png", help="write the per-token compute plot")
    p.add_argument("--depth-plot", metavar="OUT.png", help="write the per-layer depth profile")
    p.add_argument("--json", metavar="OUT.json",
                   help="write text, token ids, per-token actions and compute, budget as JSON")
    p.set_defaults(func=_cmd_generate)


def _cmd_generate(args) -> int:
    # Check everything cheap before loading a model (loading can take a while).
    from .engine.sampling import SamplingParams
    from .eval.chat_answers import chat_prompt_ids
    from .eval.report import write_json
    budget = _checked_budget(args.budget)
    prompt_budget = _checked_budget(args.prompt_budget, "--prompt-budget", "prompt_budget")
    if not args.prompt:
        raise _Error("the prompt is empty")
    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, seed=args.seed, ignore_eos=args.ignore_eos)
    controller = _checked_controller(args.controller)
    model = _checked_model(args)

    llm = _load_llm(args, model)
    tokenizer = llm.tokenizer
    if tokenizer is None:
        raise _Error(f"the model {llm.name!r} comes without a tokenizer: save one next to it")
    prompt_ids, chat = chat_prompt_ids(tokenizer, args.prompt, args.chat)

    start = time.perf_counter()
    out = llm.generate(prompt_ids, params, energy_budget=budget, controller=controller,
                       prompt_budget=prompt_budget)[0]
    seconds = time.perf_counter() - start

    trace = out.trace
    L = llm.num_layers
    floor = llm.depth.floor
    stats = _stats(trace, len(out.token_ids), seconds)
    print(out.text, flush=True)
    print()
    print(_summary(llm, args, out, stats, budget, floor, chat), flush=True)

    all_ids = list(out.prompt_token_ids) + list(out.token_ids)
    written = []
    if args.heatmap or args.compute_plot or args.depth_plot:
        from .eval import plots
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
            "budget": budget, "prompt_budget": prompt_budget, "skip_cost": trace.skip_cost,
            "min_layers": args.min_layers,
            "floor": floor, "num_prompt_tokens": trace.num_prompt_tokens,
            "actions": trace.actions.tolist(), "compute": trace.compute.tolist(),
            "sampling": {"max_new_tokens": params.max_tokens, "temperature": params.temperature,
                         "top_k": params.top_k, "seed": params.seed,
                         "ignore_eos": params.ignore_eos},
            "summary": stats,
        }
        written.append(("json", write_json(args.json, record)))
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


def _stats(trace, num_generated, seconds) -> dict:
    runs = trace.layers_run.float()
    return {
        "tokens_traced": int(trace.actions.shape[0]),
        "generated_tokens": num_generated,
        "layers_run_mean": float(runs.mean()), "layers_run_min": int(runs.min()),
        "layers_run_max": int(runs.max()),
        "compute_mean": trace.mean_compute, "compute_max": float(trace.compute.max()),
        "prompt_compute": float(trace.compute[:trace.num_prompt_tokens].mean()),
        "generated_compute": trace.generated_compute,
        "generated_compute_max": float(trace.compute[trace.num_prompt_tokens:].max())
        if trace.compute.shape[0] > trace.num_prompt_tokens else 0.0,
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
        f"  prompt tokens {s['prompt_compute']:.1%} (prompt budget {args.prompt_budget:.1%}), "
        f"generated tokens {s['generated_compute']:.1%} (max {s['generated_compute_max']:.1%})",
        f"compute saved: {s['compute_saved']:.1%}",
        f"speed: {s['generated_tokens']} tokens in {s['seconds']:.2f} s = "
        f"{s['tokens_per_s']:.1f} tokens/s (prefill included)",
    ])


# ---- serve ---------------------------------------------------------------------------------------

def _add_serve(subparsers):
    p = subparsers.add_parser(
        "serve", help="serve an OpenAI-compatible HTTP API with per-request energy budgets",
        description="Serve /v1/completions, /v1/chat/completions (streaming with server-sent "
                    "events), /v1/models, /health and /metrics. Requests may set energy_budget "
                    "and controller as extra fields.")
    _add_model_options(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: loopback only; any other address "
                        "needs --api-key or --allow-unauthenticated)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=os.environ.get("ANEE_FAST_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* and /metrics (default: "
                        "$ANEE_FAST_API_KEY; none when unset)")
    p.add_argument("--allow-unauthenticated", action="store_true",
                   help="serve a --host beyond loopback without an API key (warns): anyone who "
                        "can reach the address can run generations")
    p.add_argument("--served-model-name", default=None,
                   help="the model id clients must send (default: the model's name)")
    p.add_argument("--budget", type=float, default=1.0,
                   help="energy budget of requests that give none, in [0, 1] (default 1.0)")
    p.add_argument("--prompt-budget", type=float, default=None,
                   help="energy budget of the prompt's tokens of requests that give no "
                        "prompt_budget, in [0, 1] (default: the request's energy budget; 1.0 reads "
                        "prompts at full depth)")
    p.add_argument("--controller", default="budget", metavar="NAME|PATH",
                   help=_controller_help("controller of requests that name none"))
    p.add_argument("--max-body-bytes", type=int, default=1 << 20,
                   help="largest request body accepted; larger ones get 413 (default 1 MiB)")
    p.add_argument("--body-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="most seconds a request body's upload may take; slower ones get 408 "
                        "(default 30)")
    p.add_argument("--num-kv-blocks", type=int, default=None, help="KV cache blocks (default: 8192 "
                                                                   "tokens' worth)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="most sequences per step (default 64)")
    ray = p.add_argument_group(
        "scaling out on Ray Serve (pip install 'anee_fast[ray]')",
        "Any of these serves with Ray: several engine replicas, one LLM each, behind one "
        "endpoint on --host/--port.")
    ray.add_argument("--replicas", type=int, default=None,
                     help="engine replicas (default 1: one process, no Ray; with autoscaling, "
                          "the initial count, default --min-replicas)")
    ray.add_argument("--ray-address", default=None, metavar="ADDR",
                     help="join this Ray cluster ('auto': the one this machine is in, after "
                          "`ray start`); default: start a local Ray")
    ray.add_argument("--num-gpus-per-replica", type=float, default=0.0,
                     help="GPUs Ray reserves for each replica (default 0; 1 gives each its own GPU)")
    ray.add_argument("--num-cpus-per-replica", type=float, default=1.0,
                     help="CPUs Ray reserves for each replica (default 1)")
    ray.add_argument("--min-replicas", type=int, default=None,
                     help="autoscaling: fewest replicas (give --max-replicas too)")
    ray.add_argument("--max-replicas", type=int, default=None,
                     help="autoscaling: most replicas (give --min-replicas too)")
    ray.add_argument("--target-ongoing-requests", type=float, default=None,
                     help="autoscaling: requests per replica Ray aims at (default: half of "
                          "--max-num-seqs)")
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args) -> int:
    budget = _checked_budget(args.budget)
    prompt_budget = None if args.prompt_budget is None else _checked_budget(
        args.prompt_budget, "--prompt-budget", "prompt_budget")
    controller = _checked_controller(args.controller)
    if not 0 <= args.port <= 65535:
        raise _Error(f"--port must be in [0, 65535], got {args.port}")
    if args.max_body_bytes < 1:
        raise _Error(f"--max-body-bytes must be >= 1, got {args.max_body_bytes}")
    if not (math.isfinite(args.body_timeout) and args.body_timeout > 0):
        raise _Error(f"--body-timeout must be a number of seconds > 0, got {args.body_timeout}")
    if args.api_key is not None and not args.api_key:
        raise _Error("--api-key is empty")
    scaling = _checked_scaling(args)
    from .serving.server import check_exposure, serve
    check_exposure(args.host, args.api_key, args.allow_unauthenticated)    # before loading
    model = _checked_model(args)
    engine_options = {"num_kv_blocks": args.num_kv_blocks, "max_num_seqs": args.max_num_seqs}
    app_options = {"api_key": args.api_key, "model_name": args.served_model_name,
                   "max_body_bytes": args.max_body_bytes, "body_timeout_s": args.body_timeout,
                   "energy_budget": budget, "prompt_budget": prompt_budget}
    if scaling is not None:
        ray_serve = _import_ray_serve()
        # Each replica builds its own controller from the name or path (checked above).
        ray_serve.serve_replicas(_llm_options(args, model, **engine_options),
                                 {**app_options, "controller": args.controller}, host=args.host,
                                 port=args.port, allow_unauthenticated=args.allow_unauthenticated,
                                 **scaling)
        return 0
    llm = _load_llm(args, model, **engine_options)
    serve(llm, host=args.host, port=args.port, allow_unauthenticated=args.allow_unauthenticated,
          controller=controller, **app_options)
    return 0


def _checked_scaling(args):
    """serve_replicas' scaling options (ray_address, replicas, autoscaling, resources per
    replica), or None to serve in this process without Ray."""
    autoscaling = args.min_replicas is not None or args.max_replicas is not None
    replicas = args.replicas
    if replicas is not None and replicas < 1:
        raise _Error(f"--replicas must be >= 1, got {replicas}")
    if args.num_gpus_per_replica < 0 or args.num_cpus_per_replica < 0:
        raise _Error("--num-gpus-per-replica and --num-cpus-per-replica must be >= 0")
    if autoscaling:
        if args.min_replicas is None or args.max_replicas is None:
            raise _Error("autoscaling needs both --min-replicas and --max-replicas")
        if not 1 <= args.min_replicas <= args.max_replicas:
            raise _Error(f"need 1 <= --min-replicas <= --max-replicas, got {args.min_replicas} "
                         f"and {args.max_replicas}")
        replicas = args.min_replicas if replicas is None else replicas
        if not args.min_replicas <= replicas <= args.max_replicas:
            raise _Error(f"--replicas {replicas} is outside [--min-replicas, --max-replicas]")
    if args.target_ongoing_requests is not None and (not autoscaling
                                                     or args.target_ongoing_requests <= 0):
        raise _Error("--target-ongoing-requests is a number > 0 and needs --min-replicas and "
                     "--max-replicas")
    replicas = 1 if replicas is None else replicas
    if replicas == 1 and args.ray_address is None and not autoscaling:
        if args.num_gpus_per_replica or args.num_cpus_per_replica != 1.0:
            raise _Error("--num-gpus-per-replica and --num-cpus-per-replica need Ray: give "
                         "--replicas N > 1, --ray-address or --min/--max-replicas")
        return None
    return {"ray_address": args.ray_address, "replicas": replicas,
            "min_replicas": args.min_replicas, "max_replicas": args.max_replicas,
            "target_ongoing_requests": args.target_ongoing_requests,
            "num_cpus": args.num_cpus_per_replica, "num_gpus": args.num_gpus_per_replica}


def _import_ray_serve():
    """serving.ray_serve, or a one-line error saying how to install Ray Serve."""
    try:
        from .serving import ray_serve
    except ImportError as e:
        raise _Error(f"serving with Ray needs Ray Serve ({e}): pip install 'anee_fast[ray]'") \
            from None
    return ray_serve


# ---- eval ----------------------------------------------------------------------------------------

def _add_eval(subparsers):
    p = subparsers.add_parser(
        "eval", help="quality against compute of controllers on held-out text",
        description="Score held-out text with each controller at each budget and report realised "
                    "compute, mean KL to the full model, top-1 agreement, perplexity, greedy "
                    "32-token continuation agreement and how those continuations read (the full "
                    "model's perplexity of them, distinct 2-grams), as a table, JSON and a PNG. The "
                    "default text is Python's pydoc topics (offline); the last 20% of its windows "
                    "are held out.")
    p.add_argument("--budgets", default="1,0.75,0.5,0.25",
                   help="comma-separated energy budgets in [0, 1] (default 1,0.75,0.5,0.25)")
    p.add_argument("--text", default=None, metavar="PATH",
                   help="plain-text UTF-8 file to evaluate on (default: the pydoc topics)")
    p.add_argument("--json", default=None, metavar="OUT.json", help="write the records as JSON")
    p.add_argument("--plot", default=None, metavar="OUT.png",
                   help="write KL, top-1 agreement, continuation perplexity and distinct 2-grams "
                        "against realised compute")
    p.add_argument("--chat-answers", default=None, metavar="OUT.md",
                   help="also answer 6 fixed chat prompts (chat template, greedy, stop at EOS) with "
                        "the full model and every controller but the router at every budget; write "
                        "the answers as markdown and print answers ending early and the median "
                        "ratio of their perplexity under the full model to the full model's own")
    p.add_argument("--chat-max-tokens", type=int, default=96,
                   help="most tokens per chat answer (default 96)")
    p.add_argument("--chat-prompt-budget", type=float, default=1.0,
                   help="energy budget of the chat prompts' tokens, in [0, 1] (default 1.0, as "
                        "`generate` reads a prompt)")
    p.add_argument("--chat-set", default=None, metavar="PATH.jsonl",
                   help="also answer the instructions of a chat JSONL file (as build-corpus "
                        "writes: e.g. CORPUS/chat/heldout.jsonl) like the chat prompts, and print "
                        "their summary (answers that loop, end early, perplexity ratio); with "
                        "--json, their records go to <name>_chat_set.json beside it")
    p.add_argument("--chat-set-size", type=int, default=None, metavar="N",
                   help="answer only the file's first N instructions (default: all)")
    _add_model_options(p)
    others = [name for name in CONTROLLER_NAMES if name not in DEFAULT_CONTROLLERS]
    p.add_argument("--controllers", default=None, metavar="LIST",
                   help=f"comma-separated: {', '.join(DEFAULT_CONTROLLERS)} (the default, with "
                        f"'learned' when a trained controller is installed), {', '.join(others)}, "
                        "a controller file path, or NAME=PATH")
    p.add_argument("--windows", type=int, default=8, help="held-out windows scored (default 8)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per window (default 128)")
    p.add_argument("--search-windows", type=int, default=16,
                   help="training windows for the static-set search (default 16)")
    p.add_argument("--search-len", type=int, default=64,
                   help="tokens per search window (default 64)")
    p.add_argument("--search-width", type=int, default=6,
                   help="layers tried per greedy step after the first (default 6)")
    p.add_argument("--router-k", type=int, default=4, help="router categories (default 4)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_eval)


def _chat_set(path, size):
    """The instructions of a chat JSONL file (its first `size`), checked before any model loads."""
    if size is not None and size < 1:
        raise _Error(f"--chat-set-size must be >= 1, got {size}")
    if path is None:
        if size is not None:
            raise _Error("--chat-set-size needs --chat-set")
        return None
    from .training.chat_data import read_jsonl
    try:
        examples = read_jsonl(path)
    except (OSError, ValueError) as e:
        raise _Error(f"--chat-set: {e}") from None
    if not examples:
        raise _Error(f"--chat-set: {path} holds no examples")
    return [e["instruction"] for e in examples[:size]]


def _cmd_eval(args) -> int:
    from .eval.corpus import corpus_text
    try:
        budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    except ValueError:
        raise _Error(f"--budgets must be comma-separated numbers, got {args.budgets!r}") from None
    if not budgets or any(not 0.0 <= b <= 1.0 for b in budgets):
        raise _Error(f"--budgets must be numbers in [0, 1], got {args.budgets!r}")
    for name in ("windows", "seq_len", "search_windows", "search_len", "search_width", "router_k",
                 "chat_max_tokens"):
        if getattr(args, name) < 1:
            raise _Error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.seq_len <= 32:
        raise _Error(f"--seq-len must be over 32 (the greedy-continuation prefix), got {args.seq_len}")
    chat_prompt_budget = _checked_budget(args.chat_prompt_budget, "--chat-prompt-budget",
                                         "prompt_budget")
    chat_set = _chat_set(args.chat_set, args.chat_set_size)
    if args.text is not None:
        corpus_text(args.text)
    controllers = None
    if args.controllers is not None:
        controllers = [c.strip() for c in args.controllers.split(",") if c.strip()]
        if not controllers:
            raise _Error("--controllers is empty")
    model = _checked_model(args)

    from .eval.evaluation import run_eval
    llm = _load_llm(args, model)
    float_llm = None
    if llm.weights.weight_format not in ("float", "fp32"):      # what the format costs
        float_llm = _load_llm(args, model, weights="fp32")
    run_eval(llm, budgets=budgets, text_path=args.text, controllers=controllers,
             float_llm=float_llm,
             windows=args.windows, seq_len=args.seq_len, json_path=args.json, plot_path=args.plot,
             chat_path=args.chat_answers, chat_max_tokens=args.chat_max_tokens,
             chat_prompt_budget=chat_prompt_budget, chat_set=chat_set,
             progress=not args.no_progress, search_windows=args.search_windows,
             search_len=args.search_len, search_width=args.search_width, router_k=args.router_k)
    return 0


# ---- options made from a config dataclass (train-controller, train-recurrent) -----------------

def _add_config_options(p, cls):
    """One --field-name option per field of the dataclass `cls`, with the field's default and the
    help in its metadata (training/options.py), so each option is written in the dataclass only.
    A field that defaults to None or () says in its help what that means; any other default is
    appended."""
    types = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.metadata.get("help"):
            raise ValueError(f"{cls.__name__}.{f.name} has no help: declare it with options.option")
        shown = "" if f.default is None else f" (default {f.default})"
        p.add_argument(f"--{f.name.replace('_', '-')}", type=_option_type(f.name, types[f.name]),
                       default=f.default, help=f.metadata["help"] + shown)


def _option_type(name: str, annotation):
    """The argparse type of a field: its annotation, Optional[X] as X."""
    if typing.get_origin(annotation) is typing.Union:
        (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    if annotation in (int, float, str):
        return annotation
    raise TypeError(f"no command-line option type for field {name}: {annotation!r}")


def _config(cls, args):
    """The `cls` of the options `_add_config_options` made; validate() reports a bad value as a
    ValueError, which main prints as one line."""
    config = cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
    config.validate()
    return config


# ---- train-controller ------------------------------------------------------------------------------

def _add_train_controller(subparsers):
    p = subparsers.add_parser(
        "train-controller", help="train a budget-conditioned depth controller",
        description="Fit skip adapters and train the budget-conditioned controller on the KL to "
                    "the full model, on training text only: ridge adapters, the static order "
                    "with them, distillation of adapters and controller together, then the net "
                    "or its static set, whichever is better on set-aside training windows. "
                    "Writes OUT_DIR/adapters.json + .safetensors (--adapters OUT_DIR) and "
                    "controller.json + .safetensors (--controller OUT_DIR), checkpoints, "
                    "training_log.json and training_curve.png.")
    p.add_argument("out_dir", help="output directory (checkpoints and the trained controller)")
    p.add_argument("--resume", action="store_true", help="continue the run found in OUT_DIR")
    _add_model_options(p, runtime=False)
    _add_weights_option(p, "the weights the controller will run with, whose SKIP cost sets the "
                           "budgets (training reads the float copy)")
    _add_config_options(p, TrainConfig)
    p.set_defaults(func=_cmd_train_controller)


def _cmd_train_controller(args) -> int:
    config = _config(TrainConfig, args)
    model = _checked_model(args)
    llm = _load_llm(args, model)
    float_weights = None
    if llm.weights.weight_format not in ("float", "fp32"):
        from .model.loader import load_weights
        float_weights = load_weights(model, llm.weights.device, "float32", "fp32")[0]
    start = time.perf_counter()
    log = train_controller(llm, args.out_dir, config, resume=args.resume,
                           float_weights=float_weights)
    print(f"trained in {time.perf_counter() - start:.0f} s this run (stages: "
          + ", ".join(f"{k} {v:.0f} s" for k, v in log["timings_s"].items()) + ")")
    for row in log.get("heldout") or []:
        print(f"held-out {row['source']}, budget {row['budget']:.2f}: KL {row['kl']:.3f}, "
              f"top-1 {row['top1']:.3f}, "
              f"compute {row['compute']:.3f} (max {row['max_compute']:.3f})")
    selection = log["selection"]
    low, high = selection["net_min_budget"], selection["net_max_budget"]
    print("the net is trusted " + (f"from budget {low:.2f} to {high:.2f}" if low < 1.0 else
                                   "at no budget (the static set at every budget)")
          + "; KL on set-aside training windows, net / static set: "
          + ", ".join(f"{b:.2f}: {n:.3f} / {s:.3f}" for b, n, s in
                      zip(selection["budgets"], selection["kl_net"], selection["kl_static"])))
    print(f"adapters: {os.path.join(args.out_dir, 'adapters.json')}")
    print(f"controller: {os.path.join(args.out_dir, 'controller.json')}")
    return 0


# ---- train-recurrent and eval-recurrent (weight-tied models, halting) ---------------------------

def _add_train_recurrent(subparsers):
    p = subparsers.add_parser(
        "train-recurrent", help="train a small weight-tied model and its halting heads",
        description="Train a weight-tied (recurrent) transformer on chained modular arithmetic, with "
                    "a random number of iterations per token, then an early-allocation and an "
                    "online halting head on the frozen model, then fine-tunes the model on the "
                    "depths the heads pick and fits the heads again. Writes the model "
                    "(recurrent_config.json + model.safetensors, loadable with LLM(OUT_DIR)), "
                    "halting-*.safetensors, checkpoint.pt, policy_checkpoint.pt, "
                    "training_log.json, training_curve.png.")
    p.add_argument("out_dir", help="output directory")
    p.add_argument("--resume", action="store_true", help="continue the run found in OUT_DIR")
    _add_threads_option(p)
    _add_config_options(p, RecurrentTrainConfig)
    p.set_defaults(func=_cmd_train_recurrent)


def _cmd_train_recurrent(args) -> int:
    from .llm import set_threads
    config = _config(RecurrentTrainConfig, args)
    set_threads(args.threads)
    log = train_recurrent(args.out_dir, config, resume=args.resume)
    last = log["model_log"][-1] if log["model_log"] else None
    print(f"trained {log['parameters']} parameters in " + ", ".join(
        f"{k} {v:.0f} s" for k, v in log["timings_s"].items())
        + (f"; last training accuracy {last['accuracy']:.3f}" if last else ""))
    print(f"model and halting heads: {args.out_dir} (evaluate with {PROG} eval-recurrent {args.out_dir})")
    return 0


def _add_eval_recurrent(subparsers):
    p = subparsers.add_parser(
        "eval-recurrent", help="accuracy and compute of halting controllers against difficulty",
        description="Run early halting, online halting and every fixed depth on fresh chains "
                    "with 1..MAX_OPS operators (beyond the training range too) through the engine; "
                    "print accuracy and mean iterations of the answer token per L, the correlation "
                    "of allocated iterations with L, and fixed depth's accuracy at the same mean "
                    "iterations.")
    p.add_argument("model_dir", help="a directory written by train-recurrent")
    p.add_argument("--max-ops", type=int, default=10, help="largest number of operators (default 10)")
    p.add_argument("--examples", type=int, default=64, help="chains per L (default 64)")
    p.add_argument("--backend", default="auto", help=BACKEND_HELP)
    p.add_argument("--json", default=None, metavar="PATH", help="write the records and summary here")
    p.add_argument("--plot", default=None, metavar="PATH", help="write a PNG plot here")
    p.add_argument("--seed", type=int, default=0, help="seed of the chains (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_threads_option(p)
    p.set_defaults(func=_cmd_eval_recurrent)


def _cmd_eval_recurrent(args) -> int:
    from .eval.recurrent_eval import run_eval_recurrent
    if args.max_ops < 1:
        raise _Error(f"--max-ops must be >= 1, got {args.max_ops}")
    if args.examples < 1:
        raise _Error(f"--examples must be >= 1, got {args.examples}")
    run_eval_recurrent(args.model_dir, max_ops=args.max_ops, examples=args.examples,
                       backend=args.backend, json_path=args.json, plot_path=args.plot, seed=args.seed,
                       progress=not args.no_progress, threads=args.threads)
    return 0


# ---- build-corpus --------------------------------------------------------------------------------

def _add_build_corpus(subparsers):
    from .eval.text_sources import SOURCES
    p = subparsers.add_parser(
        "build-corpus", help="build a mixed English distillation corpus with chat answers",
        description="Write text sources read offline from this machine (pydoc topics, man pages, "
                    "Debian docs, fortunes), each capped and split into train.txt and heldout.txt "
                    "(the last documents by name held out whole), and the model's own greedy chat "
                    "answers to templated instructions (held-out topics unseen) as JSONL, with a "
                    "manifest.json of sizes and sha256s. Load it with "
                    "anee_fast.training.mixed_corpus.load_corpus.")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--sources", default=",".join(SOURCES), metavar="LIST",
                   help=f"comma-separated text sources of {', '.join(SOURCES)} (default: all; "
                        "one that is absent here is an error)")
    p.add_argument("--chat", type=int, default=0, metavar="N",
                   help="chat examples the model answers, 20%% of them held out (default 0)")
    p.add_argument("--max-new-tokens", type=int, default=128,
                   help="most tokens of a chat answer (default 128)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="chat prompts answered together; the KV cache is sized to hold them "
                        "(default 64)")
    p.add_argument("--max-chars", type=int, default=1_000_000,
                   help="characters per text source at most (default 1000000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the chat instructions (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_model_options(p, runtime=False)
    p.set_defaults(func=_cmd_build_corpus)


def _cmd_build_corpus(args) -> int:
    from .eval.text_sources import SOURCES
    from .training.mixed_corpus import build_corpus
    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        raise _Error(f"--sources: unknown source {unknown[0]!r}; known: {', '.join(SOURCES)}")
    if args.chat < 0:
        raise _Error(f"--chat must be >= 0, got {args.chat}")
    if args.max_new_tokens < 1:
        raise _Error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.max_chars < 1:
        raise _Error(f"--max-chars must be >= 1, got {args.max_chars}")
    if args.batch_size < 1:
        raise _Error(f"--batch-size must be >= 1, got {args.batch_size}")
    model = _checked_model(args)
    # Room for a batch of templated instructions (well under 128 tokens each) and their answers,
    # so no sequence is preempted and recomputed.
    block_size = 16
    llm = _load_llm(args, model, block_size=block_size,
                    num_kv_blocks=-(-args.batch_size * (128 + args.max_new_tokens) // block_size))
    start = time.perf_counter()
    manifest = build_corpus(args.out, llm, sources, args.chat, seed=args.seed,
                            max_chars=args.max_chars, max_new_tokens=args.max_new_tokens,
                            batch_size=args.batch_size, command=_build_corpus_command(args),
                            progress=not args.no_progress)
    for name, group in manifest["sources"].items():
        print(f"{name}: {group['train']['tokens']} train + {group['heldout']['tokens']} held-out "
              f"tokens ({group['train']['documents']} + {group['heldout']['documents']} documents)")
    if "chat" in manifest:
        chat = manifest["chat"]
        print(f"chat: {chat['train']['examples']} train + {chat['heldout']['examples']} held-out "
              f"examples ({chat['train']['answer_tokens'] + chat['heldout']['answer_tokens']} "
              "answer tokens)")
    print(f"built in {time.perf_counter() - start:.0f} s (backend {llm.backend}): "
          f"{os.path.join(args.out, 'manifest.json')}")
    return 0


def _build_corpus_command(args) -> str:
    """The command line of this build with every value it used, defaults included (main may have
    been given its argv directly, so sys.argv need not be it)."""
    import shlex
    words = [PROG, "build-corpus"]
    for name in ("out", "sources", "chat", "max_new_tokens", "batch_size", "max_chars", "seed",
                 "model", "min_layers", "threads"):
        if getattr(args, name) is not None:
            words += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return shlex.join(words)


# ---- entry point ---------------------------------------------------------------------------------

SUBCOMMANDS = (_add_generate, _add_serve, _add_eval, _add_train_controller, _add_train_recurrent,
               _add_eval_recurrent, _add_build_corpus)


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
