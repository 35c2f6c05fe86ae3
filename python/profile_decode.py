"""Where a decode step's time goes: kernels per step, by name, from torch.profiler.

    python python/profile_decode.py --model gpt2-124m --batch 1 --budget 1.0 --steps 8

Runs greedy decode eagerly (CUDA graphs off, so every kernel is visible), profiles `--steps`
decode steps after a warm-up, and prints per step: the number of kernel launches, the device
time by kernel name (on a GPU; on the CPU the host time of the top-level ops: aten and anee_fast).
The launch count is what a CUDA graph replays and what fusion would cut. On the CPU, `--masked`
runs the layer loop's GPU variant (every block on every row) and the ops that are views (no
kernel on a GPU) are counted apart, while dtype casts that copy (`aten::_to_copy`) count as
kernels, also inside our own ops: with `--dtype bfloat16` the count stands for a GPU's
launches. `--graph-step` profiles only what a CUDA graph of the decode step records (the
static-buffer step run without capture), not the host's input building and sampling around it.
Writes JSON.
"""
import argparse
import json
import os
import sys
from collections import defaultdict

import torch

from bench_decode import build

# Top-level ops that launch no kernel on a GPU: views, metadata, no-op dtype casts.
NO_KERNEL = {"aten::slice", "aten::select", "aten::view", "aten::squeeze", "aten::unsqueeze",
             "aten::reshape", "aten::expand", "aten::as_strided", "aten::t", "aten::transpose",
             "aten::permute", "aten::chunk", "aten::split", "aten::narrow", "aten::detach",
             "aten::detach_", "aten::alias", "aten::_unsafe_view", "aten::unbind", "aten::to",
             "aten::lift_fresh", "aten::contiguous", "aten::result_type", "aten::resolve_conj",
             "aten::resolve_neg", "aten::empty", "aten::empty_like", "aten::new_empty",
             "aten::empty_strided"}
COPY = "aten::_to_copy"     # a cast that copies: a kernel, wherever it is called from


def kernel_ops(event) -> int:
    """Kernels a top-level CPU op would launch on a GPU: 1 unless it is a view or a no-op cast,
    plus the copying casts inside our own ops (e.g. weights converted to float32)."""
    if event.name in NO_KERNEL:
        return int(any(c.name == COPY for c in event.cpu_children))
    nested = 0
    if event.name.startswith("anee_fast::"):
        stack = list(event.cpu_children)
        while stack:
            child = stack.pop()
            nested += child.name == COPY
            stack.extend(child.cpu_children)
    return 1 + nested


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2-124m", help="gpt2-124m, llama-1b, smollm2 or a path")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--budget", type=float, default=1.0)
    p.add_argument("--controller", default="budget")
    p.add_argument("--backend", default="auto")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=8, help="decode steps profiled")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"))
    p.add_argument("--top", type=int, default=25, help="kernel names printed")
    p.add_argument("--masked", action="store_true",
                   help="on the CPU: run every block on every row, as a GPU does (default: the "
                        "CPU's compacted variant)")
    p.add_argument("--graph-step", action="store_true",
                   help="profile only the step a CUDA graph records (cuda_graphs.DecodeGraphs, run "
                        "without capture), repeated on the same inputs")
    p.add_argument("--out", default="out/profile_decode.json")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch < 1:
        p.error("--steps and --batch must be >= 1")

    from anee_fast import LLM, SamplingParams
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if gpu else torch.float32)
    model = build(args.model, device, dtype)
    llm = LLM(model, backend=args.backend, device=device, dtype=dtype, min_layers=0,
              cuda_graphs=False if gpu else None)
    engine = llm.engine
    if args.masked:
        engine.runner.compact = False
    if args.graph_step:
        engine.use_decode_graphs(capture=False)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, llm.spec.vocab_size, (args.batch, args.prompt_tokens), generator=g)
    params = SamplingParams(max_tokens=args.steps + 3, ignore_eos=True)
    for prompt in prompts.tolist():
        engine.add_request(prompt, params, args.budget, args.controller)
    engine.step()                                     # prefill
    engine.step()                                     # one decode step: warm-up (Triton compiles)
    step = engine.step
    if args.graph_step:                               # the decode step's static-buffer step
        (graph_step,) = engine.runner.graphs.graphs.values()
        step = lambda: graph_step.forward(graph_step.layer_guard)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        if gpu:
            torch.cuda.synchronize()
    while engine.has_unfinished():
        engine.step()

    per_name = defaultdict(lambda: [0, 0.0, 0])       # name -> [calls, microseconds, kernels]
    for e in prof.events():
        if gpu and e.device_type.name == "CUDA":
            per_name[e.name][0] += 1
            per_name[e.name][1] += e.device_time
        elif not gpu and e.device_type.name == "CPU" and "::" in e.name and e.cpu_parent is None:
            per_name[e.name][0] += 1
            per_name[e.name][1] += e.cpu_time
            per_name[e.name][2] += kernel_ops(e)
    rows = sorted(({"name": n, "calls_per_step": c / args.steps, "us_per_step": t / args.steps,
                    "kernels_per_step": k / args.steps}
                   for n, (c, t, k) in per_name.items()), key=lambda r: -r["us_per_step"])
    launches = sum(r["calls_per_step"] for r in rows)
    kernels = sum(r["kernels_per_step"] for r in rows)
    busy = sum(r["us_per_step"] for r in rows)
    layers = llm.num_layers
    what = "kernels" if gpu else "top-level ops"
    print(f"{args.model}, {device}, {str(dtype)[6:]}, backend {llm.backend}, batch {args.batch}, "
          f"budget {args.budget}, controller {args.controller}, {args.steps} decode steps, eager, "
          f"{'masked' if args.masked or gpu else 'compacted'} blocks"
          f"{', the graph step only' if args.graph_step else ''}")
    print(f"{what} per step: {launches:.0f} ({launches / layers:.1f} per layer), "
          f"{'device' if gpu else 'host'} time in them {busy:.0f} us per step")
    if not gpu:
        print(f"kernels they would launch on a GPU (views and no-op casts left out, copying "
              f"casts inside our ops counted): {kernels:.0f} ({kernels / layers:.1f} per layer)")
    print(f"{'us/step':>9} {'calls/step':>10} {'kernels':>8}  name")
    for r in rows[:args.top]:
        k = r["kernels_per_step"] if not gpu else r["calls_per_step"]
        print(f"{r['us_per_step']:>9.1f} {r['calls_per_step']:>10.1f} {k:>8.1f}  {r['name'][:100]}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(model=args.model, device=str(device), dtype=str(dtype)[6:], backend=llm.backend,
                       batch=args.batch, budget=args.budget, controller=args.controller,
                       steps=args.steps, layers=layers, masked=args.masked or gpu,
                       graph_step=args.graph_step,
                       launches_per_step=launches,
                       kernel_ops_per_step=None if gpu else kernels,
                       busy_us_per_step=busy, by_name=rows), f, indent=1)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
