"""Load benchmark of the OpenAI-compatible server: requests/s, output tokens/s, time to first
token and inter-token latency percentiles at several concurrencies, with a mix of energy
budgets and the compute saving that mix measured. Prints a table and writes JSON and a PNG.

    python python/bench_serving.py --concurrency 1,4,16,64 --budgets 1.0,0.75,0.5 --max-tokens 16

Without --url the server runs in this process (a background thread) on the model given by
--model (default: the embedded SmolLM2-135M-Instruct); with --url it drives a running server.
Each concurrency level sends --num-requests requests (default max(4, 2 x concurrency)) from
that many concurrent streaming clients; requests take the budgets round-robin and generate
exactly --max-tokens tokens (ignore_eos), so levels are comparable. TTFT is measured by the
client from sending the request to the first streamed token; inter-token latency is the gap
between a request's consecutive streamed tokens.

A random --cancel-fraction of the requests (seeded by --seed) closes its stream after a random
number of tokens (0: as soon as the response starts), as clients that give up do; they are
left out of the timings. After each level the benchmark checks the server: no request failed
(an HTTP error, an error event, a stream without its end) and, once the server is idle, no KV
block is still in use (/metrics, summed over replicas). Otherwise it reports what went wrong and
exits with status 1.

With --replicas 1,2 the same load runs against each count of engine replicas on Ray Serve
(`anee-fast serve --replicas N`, started here on a local Ray), side by side in one table.
--kill-replica-after SECONDS kills one busy replica (SIGKILL) that long into each level of the
largest count: requests may then fail, but only with an OpenAI error body or error event (a
request lost any other way is a failure), and the level ends once Ray has replaced the replica
and every replica is idle with no KV block in use.
"""
import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import sys
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

PROMPTS = [
    "Explain in two sentences why the sky is blue.",
    "Write a short poem about the sea.",
    "What are the three primary colors?",
    "Give me a recipe for pancakes.",
    "Summarise the plot of Romeo and Juliet.",
    "Why do cats purr?",
    "List four planets of the solar system.",
    "How does a bicycle stay upright?",
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="base URL of a running server (default: start one "
                                                "in this process)")
    p.add_argument("--model", default=None, help="model for the in-process server (default: the "
                                                 "embedded SmolLM2-135M-Instruct)")
    p.add_argument("--api-key", default=None, help="API key of the server, if it needs one")
    p.add_argument("--concurrency", default="1,4,16,64", help="comma-separated levels")
    p.add_argument("--num-requests", type=int, default=None,
                   help="requests per level (default max(4, 2 x concurrency))")
    p.add_argument("--budgets", default="1.0,0.75,0.5", help="energy budgets, taken round-robin")
    p.add_argument("--controller", default="budget", help="controller of every request")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens generated per request")
    p.add_argument("--chat", action="store_true", help="use /v1/chat/completions")
    p.add_argument("--cancel-fraction", type=float, default=0.25,
                   help="fraction of requests whose client closes the stream early (default 0.25)")
    p.add_argument("--seed", type=int, default=0, help="seed of the cancellations (default 0)")
    p.add_argument("--replicas", default=None,
                   help="comma-separated counts of engine replicas on Ray Serve, each under the "
                        "same load (default: one engine in this process)")
    p.add_argument("--num-cpus-per-replica", type=float, default=1.0,
                   help="CPUs Ray reserves for each replica (default 1)")
    p.add_argument("--kill-replica-after", type=float, default=None, metavar="SECONDS",
                   help="kill one busy replica this long into each level of the largest "
                        "--replicas count")
    p.add_argument("--json", default="out/bench_serving.json", help="results file")
    p.add_argument("--plot", default="out/bench_serving.png", help="plot file")
    args = p.parse_args(argv)
    try:
        args.concurrency = [int(c) for c in args.concurrency.split(",")]
        args.budgets = [float(b) for b in args.budgets.split(",")]
        args.replicas = [int(r) for r in args.replicas.split(",")] if args.replicas else None
    except ValueError as e:
        p.error(f"--concurrency, --budgets and --replicas are comma-separated numbers: {e}")
    if args.replicas is not None and (min(args.replicas) < 1 or args.url is not None):
        p.error("--replicas counts must be >= 1, and start their own deployments (no --url)")
    if args.kill_replica_after is not None and (args.replicas is None
                                                or args.kill_replica_after < 0):
        p.error("--kill-replica-after needs --replicas and is a number of seconds >= 0")
    if not args.concurrency or min(args.concurrency) < 1:
        p.error("--concurrency levels must be >= 1")
    if any(not 0 <= b <= 1 for b in args.budgets):
        p.error("--budgets must be in [0, 1]")
    if args.max_tokens < 1 or (args.num_requests is not None and args.num_requests < 1):
        p.error("--max-tokens and --num-requests must be >= 1")
    if not 0 <= args.cancel_fraction < 1:
        p.error("--cancel-fraction must be in [0, 1)")
    return args


def percentile(values, q):
    """Nearest-rank percentile (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def one_request(client, args, model, index, cancel_after):
    """Streams one request; returns its timings, token count and the server's `anee` stats, and
    `error` (what failed, else None). With cancel_after (a token count) the client closes the
    stream once that many tokens arrived, and the result is marked `cancelled`."""
    budget = args.budgets[index % len(args.budgets)]
    prompt = PROMPTS[index % len(PROMPTS)]
    body = {"model": model, "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "energy_budget": budget, "controller": args.controller}
    if args.chat:
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": prompt}]
    else:
        path, body["prompt"] = "/v1/completions", prompt
    result = {"budget": budget, "start": time.perf_counter(), "token_times": [], "anee": None,
              "cancelled": False, "error": None, "error_body": False}
    try:
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                text = await response.aread()
                result["error"] = f"{path} answered {response.status_code}: {text[:300]!r}"
                with contextlib.suppress(ValueError):
                    result["error_body"] = "message" in json.loads(text)["error"]
                return result
            # Leaving the block early closes the connection: the server aborts the request.
            if cancel_after == 0:
                result["cancelled"] = True
                return result
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    return result
                if not line.startswith("data: "):
                    continue
                chunk = json.loads(line[len("data: "):])
                if "error" in chunk:
                    result["error"] = f"error event: {chunk['error']['message']}"
                    result["error_body"] = True
                    return result
                for choice in chunk["choices"]:
                    result["token_times"] += [time.perf_counter()] * len(choice["token_ids"])
                result["anee"] = chunk.get("anee", result["anee"])
                if cancel_after is not None and len(result["token_times"]) >= cancel_after:
                    result["cancelled"] = True
                    return result
        result["error"] = "the stream ended without data: [DONE]"
    except httpx.HTTPError as e:
        result["error"] = f"{type(e).__name__}: {e}"
    return result


async def run_level(url, headers, args, model, concurrency, progress, kill_after=None):
    """Runs one concurrency level (killing a busy replica `kill_after` seconds in, if given);
    returns its results, its seconds, and the KV blocks still in use once the server is idle."""
    n = args.num_requests or max(4, 2 * concurrency)
    rng = random.Random(args.seed + concurrency)
    cancel_after = [rng.randrange(args.max_tokens) if rng.random() < args.cancel_fraction
                    else None for _ in range(n)]
    pending = asyncio.Queue()
    for i in range(n):
        pending.put_nowait(i)
    results = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600,
                                 limits=limits) as client:
        async def worker():
            while not pending.empty():
                i = pending.get_nowait()
                results.append(await one_request(client, args, model, i, cancel_after[i]))
                progress.update(1)

        start = time.perf_counter()
        killing = asyncio.ensure_future(kill_a_busy_replica(client, kill_after)) \
            if kill_after is not None else None
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - start
        if killing is not None:
            await killing
        blocks = await kv_blocks_in_use_when_idle(client, 60.0 if killing is None else 180.0)
    return results, seconds, blocks


async def kill_a_busy_replica(client, after: float) -> None:
    """SIGKILLs, `after` seconds from now, a replica that is running requests (/health gives
    every replica's pid; the local Ray runs them on this machine)."""
    await asyncio.sleep(after)
    while True:
        replicas = (await client.get("/health")).json()["replicas"]
        busy = [r for r in replicas if r.get("running")]
        if busy:
            os.kill(busy[0]["pid"], signal.SIGKILL)
            print(f"\nkilled replica {busy[0]['replica']} (pid {busy[0]['pid']}) running "
                  f"{busy[0]['running']} requests", file=sys.stderr)
            return
        await asyncio.sleep(0.05)


async def kv_blocks_in_use_when_idle(client, seconds: float = 60.0) -> int:
    """The server's KV blocks in use (summed over replicas) once it is healthy, no request runs
    or waits and none holds a block (the aborts of closed streams land between engine steps),
    or as they are after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        healthy = (await client.get("/health")).json()["status"] == "ok"
        gauges = {}
        for family in text_string_to_metric_families((await client.get("/metrics")).text):
            for sample in family.samples:
                gauges[sample.name] = gauges.get(sample.name, 0.0) + sample.value
        blocks = int(gauges["anee_kv_blocks_in_use"])
        idle = gauges["anee_running_requests"] == gauges["anee_queue_depth"] == 0
        if (healthy and idle and blocks == 0) or time.monotonic() > deadline:
            return blocks
        await asyncio.sleep(0.1)


def problems(results, blocks, killed: bool = False) -> list:
    """What a level did wrong: failed requests (with a replica killed: those failed without an
    error body or event), KV blocks left in use, nothing to time."""
    found = [r["error"] for r in results
             if r["error"] is not None and not (killed and r["error_body"])]
    if blocks:
        found.append(f"{blocks} KV blocks still in use with the server idle")
    if not any(r["error"] is None and not r["cancelled"] for r in results):
        found.append("no request completed: lower --cancel-fraction or raise --num-requests")
    return found


def summarise(all_results, concurrency, seconds, replicas=None):
    """Timings of the requests that completed (cancelled and failed ones cut theirs short)."""
    results = [r for r in all_results if not r["cancelled"] and r["error"] is None]
    ttft = [r["token_times"][0] - r["start"] for r in results if r["token_times"]]
    itl = [b - a for r in results for a, b in zip(r["token_times"], r["token_times"][1:])]
    tokens = sum(len(r["token_times"]) for r in results)
    # The mix's compute: every request's mean compute per token, weighted by its tokens run.
    runs = [(r["anee"]["compute"], r["anee"]["tokens_run"]) for r in results]
    compute = sum(c * n for c, n in runs) / sum(n for _, n in runs)
    by_budget = {}
    for r in results:
        by_budget.setdefault(r["budget"], []).append(r["anee"]["compute"])
    failed = sum(r["error"] is not None for r in all_results)
    row = {"replicas": replicas, "concurrency": concurrency, "requests": len(results),
           "cancelled": len(all_results) - len(results) - failed, "failed": failed,
           "seconds": seconds,
           "requests_per_s": len(results) / seconds, "output_tokens_per_s": tokens / seconds,
           "compute": compute, "compute_saved": 1.0 - compute,
           "compute_by_budget": {str(b): sum(v) / len(v) for b, v in sorted(by_budget.items())}}
    for name, values in (("ttft", ttft), ("itl", itl)):
        for q in (50, 90, 99):
            row[f"{name}_p{q}_ms"] = 1000 * percentile(values, q / 100)
    return row


def table(rows) -> str:
    head = (f"{'repl':>4} {'conc':>4} {'reqs':>4} {'cncl':>4} {'fail':>4} {'req/s':>6} "
            f"{'tok/s':>7} {'TTFT p50':>9} {'p90':>7} {'p99':>7} {'ITL p50':>8} {'p90':>7} "
            f"{'p99':>7} {'saved':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['replicas'] or '-':>4} {r['concurrency']:>4} {r['requests']:>4} "
                     f"{r['cancelled']:>4} {r['failed']:>4} "
                     f"{r['requests_per_s']:>6.2f} "
                     f"{r['output_tokens_per_s']:>7.1f} {r['ttft_p50_ms']:>9.0f} "
                     f"{r['ttft_p90_ms']:>7.0f} {r['ttft_p99_ms']:>7.0f} {r['itl_p50_ms']:>8.0f} "
                     f"{r['itl_p90_ms']:>7.0f} {r['itl_p99_ms']:>7.0f} {r['compute_saved']:>6.1%}")
    return "\n".join(lines) + ("\n(repl: engine replicas on Ray Serve, '-': one in-process "
                               "server; reqs: completed, cncl: closed early by the client, fail: "
                               "answered with an error body after a replica was killed, all left "
                               "out of the timings; times in ms; saved = compute saved by the "
                               "budget mix)")


def plot(rows, path, title):
    """Throughput and latency against concurrency, one line per replica count; with a single
    concurrency level and several replica counts, against the replica count."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator
    levels = sorted({r["concurrency"] for r in rows})
    counts = sorted({r["replicas"] or 0 for r in rows})
    if len(levels) == 1 and len(counts) > 1:
        x_of, xlabel, series = (lambda r: r["replicas"]), "engine replicas", {levels[0]: rows}
    else:
        x_of, xlabel = (lambda r: r["concurrency"]), "concurrent clients"
        series = {n: [r for r in rows if (r["replicas"] or 0) == n] for n in counts}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key, group in series.items():
        name = "" if len(series) == 1 else f"{key} replicas, " if key else "in-process, "
        xs = [x_of(r) for r in group]
        ax1.plot(xs, [r["output_tokens_per_s"] for r in group], "o-", label=name.rstrip(", "))
        for metric in ("ttft", "itl"):
            for q, style in ((50, "o-"), (99, "s--")):
                ax2.plot(xs, [r[f"{metric}_p{q}_ms"] for r in group], style,
                         label=f"{name}{metric.upper()} p{q}")
    ticks = sorted({x_of(r) for r in rows})
    for ax in (ax1, ax2):
        ax.set(xscale="log", xlabel=xlabel)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.xaxis.set_minor_locator(NullLocator())
    ax1.set(ylabel="output tokens/s", title="throughput")
    ax2.set(yscale="log", ylabel="ms", title="latency")
    if len(series) > 1:
        ax1.legend()
    ax2.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def servers(args):
    """(replica count or None, base URL) of each server to load, started and stopped here: one
    in-process server or --url, or a Ray Serve deployment per --replicas count."""
    if args.url is not None:
        yield None, args.url.rstrip("/")
        return
    max_num_seqs = max(64, max(args.concurrency))
    if args.replicas is None:
        from anee_fast import LLM
        from anee_fast.serving.server import ServerThread
        llm = LLM(args.model, max_num_seqs=max_num_seqs)
        with ServerThread(llm, api_key=args.api_key) as server:
            yield None, server.url
        return
    import ray
    from ray import serve

    from anee_fast.serving import ray_serve
    ray.init(num_cpus=max(args.replicas) * args.num_cpus_per_replica, include_dashboard=False,
             log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        for n in args.replicas:
            app = ray_serve.deployment({"model": args.model, "max_num_seqs": max_num_seqs},
                                       {"api_key": args.api_key}, replicas=n,
                                       num_cpus=args.num_cpus_per_replica)
            ray_serve.start(app, port=port)
            yield n, f"http://127.0.0.1:{port}"
            serve.delete(ray_serve.APP_NAME)
    finally:
        serve.shutdown()
        ray.shutdown()


def main(argv=None) -> int:
    from tqdm import tqdm
    args = parse_args(argv)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    rows = []
    targets = servers(args)
    with contextlib.closing(targets):
        for replicas, url in targets:
            model = httpx.get(url + "/v1/models", headers=headers).json()["data"][0]["id"]
            kill_after = args.kill_replica_after \
                if replicas is not None and replicas == max(args.replicas) else None
            total = sum(args.num_requests or max(4, 2 * c) for c in args.concurrency)
            label = "requests" if replicas is None else f"{replicas} replicas"
            with tqdm(total=total, desc=label, unit="req") as progress:
                for c in args.concurrency:
                    results, seconds, blocks = asyncio.run(
                        run_level(url, headers, args, model, c, progress, kill_after))
                    found = problems(results, blocks, killed=kill_after is not None)
                    if found:
                        print(f"{label}, concurrency {c}: {len(found)} problems, the first ones:",
                              *found[:10], sep="\n  ", file=sys.stderr)
                        return 1
                    rows.append(summarise(results, c, seconds, replicas))
    print(f"model {model}, budgets {args.budgets} round-robin, controller {args.controller}, "
          f"{args.max_tokens} tokens per request, cancel fraction {args.cancel_fraction}; every "
          "level: no request failed (but with an error body, after a killed replica), no KV "
          "block in use afterwards")
    print(table(rows))
    for path in (args.json, args.plot):
        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"model": model, "budgets": args.budgets, "controller": args.controller,
                   "max_tokens": args.max_tokens, "chat": args.chat,
                   "cancel_fraction": args.cancel_fraction, "seed": args.seed,
                   "replicas": args.replicas, "kill_replica_after": args.kill_replica_after,
                   "argv": sys.argv[1:], "rows": rows}, f, indent=1)
    plot(rows, args.plot, f"{model}: budgets {args.budgets}, {args.max_tokens} tokens/request")
    print(f"wrote {args.json} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
