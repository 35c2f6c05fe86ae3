"""The engine's own cost per decode step, outside the model: scheduling, building the step's
inputs, the copies to and from the device, sampling and bookkeeping. A fixed cost per step that
skipping layers does not shrink, so it bounds every speedup of adaptive depth.

    python python/bench_host.py --batches 1,8,64

Runs a tiny GPT-2 (2 layers, hidden 64, vocabulary 1000 unless --vocab), whose compute is
negligible, greedy unless --temperature, through the decode path a GPU takes: steps from the
static buffers of cuda_graphs.DecodeGraphs, captured and replayed on a GPU, run eagerly on the
CPU (the same host work, without the waits for the device; sampling then runs on the CPU too). Per batch, medians over the timed steps: the wall time of an engine step, of the model
step inside it (the step graph's run: inputs copied in, the graph replayed or the layers run;
on a GPU with a synchronisation after it), and of their difference in each step, the host's own
part. Prints a table and writes JSON.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

PROMPT_TOKENS, BLOCK_SIZE = 8, 16
STEPS_BEFORE = 10       # decode steps before timing: the bucket's graph is built, caches warm


def tiny_model(vocab_size=1000):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=1024, vocab_size=vocab_size,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_batch(llm, batch, steps, device, temperature=0.0):
    """Median (engine step, model step, host part) in us over `steps` decode steps at `batch`
    sequences; the host part is each step's time less its model step's, so both come from the
    same steps."""
    from anee_fast import SamplingParams
    from anee_fast.engine.cuda_graphs import bucket_for
    engine = llm.engine
    g = torch.Generator().manual_seed(batch)
    prompts = torch.randint(1, llm.spec.vocab_size, (batch, PROMPT_TOKENS), generator=g).tolist()
    params = SamplingParams(max_tokens=STEPS_BEFORE + steps + 2, ignore_eos=True,
                            temperature=temperature)
    seqs = [engine.add_request(p, params, 1.0, "budget") for p in prompts]
    engine.step()                                              # the prefill
    for _ in range(STEPS_BEFORE):
        engine.step()
    graphs = engine.runner.graphs
    key = (bucket_for(batch, graphs.max_rows), id(seqs[0].controller))
    if key not in graphs.graphs:
        raise RuntimeError(f"batch {batch} did not take the graph step (largest bucket "
                           f"{graphs.max_rows}): choose smaller batches")
    step_graph, model_s = graphs.graphs[key], []

    def timed_model_step(*inputs):
        sync(device)
        start = time.perf_counter()
        out = graph_run(*inputs)
        sync(device)
        model_s.append(time.perf_counter() - start)
        return out

    graph_run, step_graph.run = step_graph.run, timed_model_step
    preemptions, step_s = engine.scheduler.num_preemptions, []
    try:
        for _ in range(steps):
            sync(device)
            start = time.perf_counter()
            engine.step()
            sync(device)
            step_s.append(time.perf_counter() - start)
    finally:
        del step_graph.run                                     # back to the class's method
    if engine.scheduler.num_preemptions != preemptions or len(model_s) != steps:
        raise RuntimeError("a timed step was not a plain graph step (preempted or not replayed)")
    for seq in seqs:
        engine.abort(seq)
    median_us = lambda xs: statistics.median(xs) * 1e6
    return (median_us(step_s), median_us(model_s),
            median_us([a - b for a, b in zip(step_s, model_s)]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--steps", type=int, default=100, help="decode steps timed per batch")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default="auto")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; else sampled")
    p.add_argument("--vocab", type=int, default=1000, help="the tiny model's vocabulary")
    p.add_argument("--out", default="out/bench_host")
    args = p.parse_args(argv)
    from anee_fast import LLM
    device = torch.device(args.device)
    batches = [int(b) for b in args.batches.split(",")]
    tokens = PROMPT_TOKENS + STEPS_BEFORE + args.steps + 2                 # per sequence, at most
    blocks = max(batches) * -(-tokens // BLOCK_SIZE)
    llm = LLM(tiny_model(args.vocab), backend=args.backend, device=device, min_layers=0,
              block_size=BLOCK_SIZE, num_kv_blocks=blocks)
    if device.type != "cuda":
        llm.engine.use_decode_graphs(capture=False)
    how = "CUDA graphs replayed" if device.type == "cuda" else "graph step run eagerly"
    print(f"{device}, torch {torch.__version__}, backend {llm.backend}, {how}, tiny GPT-2 "
          f"(2 layers, hidden 64, vocabulary {args.vocab}), temperature {args.temperature}, "
          f"median of {args.steps} decode steps")
    print(f"{'batch':>5} {'step us':>9} {'model us':>9} {'host us':>9}")
    rows = []
    for batch in batches:
        step_us, model_us, host_us = bench_batch(llm, batch, args.steps, device, args.temperature)
        rows.append(dict(batch=batch, step_us=step_us, model_us=model_us, host_us=host_us))
        print(f"{batch:>5} {step_us:>9.1f} {model_us:>9.1f} {host_us:>9.1f}", flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(dict(device=str(device), torch=torch.__version__, backend=llm.backend,
                       captured=device.type == "cuda", steps=args.steps, vocab=args.vocab,
                       temperature=args.temperature, rows=rows), f, indent=1)
    print(f"wrote {args.out}.json", file=sys.stderr)


if __name__ == "__main__":
    main()
