"""Decode speed against torch's CPU thread count, alone and beside a competing CPU-bound process:
what `LLM(threads=...)`, `--threads` and $ANEE_FAST_THREADS are for.

    python python/bench_threads.py --threads default,1,2 --loads 0,1

torch starts one intra-op thread per core, and each parallel op waits for its slowest thread; when
another process holds a core, the thread on that core only runs in its time slices, so every op
waits on it. For each number of competing processes (--loads; each a pure-Python busy loop, one
core, killed at the end), each thread setting generates --new-tokens tokens after a
--prompt-tokens prompt, greedy, batch 1, full budget, on the embedded SmolLM2-135M-Instruct
(or --model); tokens/s counts the generated tokens over generate()'s wall time (prefill
included), median of --repeats runs, the settings alternating within each repeat. Prints a table,
writes JSON and a PNG.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

BUSY_LOOP = "import time\nend = time.time() + {seconds}\nwhile time.time() < end:\n    pass\n"


def start_load(processes: int, seconds: float) -> list:
    """`processes` busy loops, each ending by itself after `seconds` should this script die."""
    return [subprocess.Popen([sys.executable, "-c", BUSY_LOOP.format(seconds=seconds)])
            for _ in range(processes)]


def stop_load(procs: list) -> None:
    for p in procs:
        p.kill()
        p.wait()


def tokens_per_s(llm, prompt, new_tokens) -> float:
    from anee_fast import SamplingParams
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    out = llm.generate(prompt, params)[0]
    return len(out.token_ids) / (time.perf_counter() - start)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--threads", default="default,1,2",
                   help="comma-separated thread counts; 'default' = torch's own (one per core)")
    p.add_argument("--loads", default="0,1", help="comma-separated numbers of competing processes")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="out/bench_threads")
    args = p.parse_args(argv)
    from anee_fast import LLM
    from anee_fast.llm import set_threads
    default = torch.get_num_threads()            # before anything sets it
    settings = [s.strip() for s in args.threads.split(",") if s.strip()]
    loads = [int(n) for n in args.loads.split(",")]
    llm = LLM(args.model, device="cpu", threads=default)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, llm.spec.vocab_size, (args.prompt_tokens,), generator=g).tolist()
    tokens_per_s(llm, prompt, 4)                 # warm-up: allocations, first-call costs
    load_average = os.getloadavg()[0]            # other work on the machine before this run's
    print(f"{llm.name}, cpu, {os.cpu_count()} cores (1-min load average before: "
          f"{load_average:.2f}), torch {torch.__version__} (default {default} threads), backend "
          f"{llm.backend}, {args.prompt_tokens} prompt + {args.new_tokens} new tokens, batch 1, "
          f"median of {args.repeats}")
    print(f"{'load':>4} {'threads':>8} {'tokens/s':>9} {'vs default':>10}")
    rows = []
    for load in loads:
        # Long enough for every run at a pessimistic 0.5 token/s; killed once they are done.
        procs = start_load(load, seconds=60 + 2 * args.repeats * len(settings) * args.new_tokens)
        try:
            time.sleep(0.5 if load else 0)       # the busy loops are running before timing
            runs = {s: [] for s in settings}
            for _ in range(args.repeats):
                for s in settings:
                    set_threads(default if s == "default" else int(s))
                    runs[s].append(tokens_per_s(llm, prompt, args.new_tokens))
        finally:
            stop_load(procs)
        base = statistics.median(runs["default"]) if "default" in runs else None
        for s in settings:
            rate = statistics.median(runs[s])
            count = default if s == "default" else int(s)
            rows.append(dict(load=load, threads=s, torch_threads=count, tokens_per_s=rate,
                             runs=runs[s]))
            versus = f"{rate / base:>9.2f}x" if base else f"{'':>10}"
            print(f"{load:>4} {s:>8} {rate:>9.1f} {versus}", flush=True)
    set_threads(default)

    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(dict(model=llm.name, cores=os.cpu_count(), load_average=load_average,
                       torch=torch.__version__,
                       default_threads=default, backend=llm.backend,
                       prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                       repeats=args.repeats, rows=rows), f, indent=1)
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    width = 0.8 / len(settings)
    for i, s in enumerate(settings):
        rates = [r["tokens_per_s"] for r in rows if r["threads"] == s]
        ax.bar([j + i * width for j in range(len(loads))], rates, width, label=f"threads {s}")
    ax.set_xticks([j + width * (len(settings) - 1) / 2 for j in range(len(loads))],
                  [f"{n} competing process{'es' if n != 1 else ''}" for n in loads])
    ax.set_ylabel("tokens/s (batch 1, prefill included)")
    ax.set_title(f"{llm.name} on {os.cpu_count()} cores: torch threads under load")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out + ".png", dpi=120)
    print(f"wrote {args.out}.json and {args.out}.png", file=sys.stderr)


if __name__ == "__main__":
    main()
