"""Per-token independent depth decisions against a batch-aware policy (ConsensusController), at
batch 8 and 64: decode throughput and the quality cost (KL to the full model) of each.

    python python/bench_batch_policies.py --batches 8,64 --budgets 0.75,0.5 --controllers heuristic

Model: the embedded SmolLM2-135M-Instruct (a real model, so KL means something). Prompts are
held-out windows of the offline corpus (anee_fast.eval.corpus). Throughput: greedy generation of
--new-tokens tokens for the whole batch; decode ms/step = (N tokens - 1 token) / (N - 1).
Quality: every prompt + its full-depth greedy continuation is scored through the decode path
(chunk_size=1, the batch's sequences in one step each) under the policy; KL(full || policy)
and top-1 agreement are averaged over all positions. Prints a table, writes JSON and a PNG.
"""
import argparse
import statistics
import sys
import time

import torch


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="8,64")
    p.add_argument("--budgets", default="0.75,0.5")
    p.add_argument("--controllers", default="heuristic",
                   help="per-token controllers; each also runs wrapped in a ConsensusController")
    p.add_argument("--quorum", type=float, default=0.5)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default="out/bench_batch_policies")
    args = p.parse_args(argv)

    from anee_fast import LLM, SamplingParams
    from anee_fast.control.batch_policies import ConsensusController
    from anee_fast.eval.corpus import corpus_text, split_windows, token_windows
    from anee_fast.eval.quality import token_metrics
    from anee_fast.eval.report import write_json

    llm = LLM(max_num_seqs=256, num_kv_blocks=2048)
    batches = [int(b) for b in args.batches.split(",")]
    windows = split_windows(token_windows(llm.tokenizer, corpus_text(), args.prompt_tokens))[1]
    if len(windows) < max(batches):
        sys.exit(f"only {len(windows)} held-out prompts of {args.prompt_tokens} tokens")
    new = args.new_tokens
    rows = []
    print(f"SmolLM2-135M, cpu, {llm.backend}, {args.prompt_tokens} prompt + {new} new tokens, "
          f"quorum {args.quorum}")
    print(f"{'batch':>5} {'budget':>6} {'policy':<22} {'compute':>7} {'ms/step':>8} {'tok/s':>7} "
          f"{'vs full':>7} {'KL':>7} {'top1':>6}")
    for batch in batches:
        prompts = windows[:batch]

        def generate(n, budget, controller):
            return llm.generate(prompts, SamplingParams(max_tokens=n, ignore_eos=True),
                                energy_budget=budget, controller=controller)

        def decode_seconds(budget, controller):
            prefill = timed(lambda: generate(1, budget, controller), args.repeats)
            return (timed(lambda: generate(new, budget, controller), args.repeats) - prefill) / (new - 1)

        full_outs = generate(new, 1.0, "budget")
        texts = [o.prompt_token_ids + o.token_ids[:-1] for o in full_outs]
        full = llm.score(texts)
        full_decode = decode_seconds(1.0, "budget")
        for budget in (float(b) for b in args.budgets.split(",")):
            for name in args.controllers.split(","):
                for policy, controller in ((f"{name} (per token)", name),
                                           (f"{name} (consensus)", ConsensusController(name, args.quorum))):
                    logits, traces = llm.score(texts, energy_budget=budget, controller=controller,
                                               chunk_size=1, return_trace=True)
                    kl, top1 = [], []
                    for f, q in zip(full, logits):
                        m = token_metrics(f, q)
                        kl.append(m["kl"])
                        top1.append(m["top1"].float())
                    decode = decode_seconds(budget, controller)
                    row = dict(batch=batch, budget=budget, policy=policy, quorum=args.quorum,
                               compute=float(torch.cat([t.compute for t in traces]).mean()),
                               ms_per_step=1e3 * decode, tokens_per_s=batch / decode,
                               speedup_vs_full=full_decode / decode,
                               kl=float(torch.cat(kl).mean()), top1=float(torch.cat(top1).mean()))
                    rows.append(row)
                    print(f"{batch:>5} {budget:>6.2f} {policy:<22} {row['compute']:>7.3f} "
                          f"{row['ms_per_step']:>8.1f} {row['tokens_per_s']:>7.1f} "
                          f"{row['speedup_vs_full']:>6.2f}x {row['kl']:>7.3f} {row['top1']:>6.3f}",
                          flush=True)

    write_json(args.out + ".json", rows)
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for policy in sorted({r["policy"] for r in rows}):
        for batch in batches:
            pts = [r for r in rows if r["policy"] == policy and r["batch"] == batch]
            ax.plot([r["kl"] for r in pts], [r["speedup_vs_full"] for r in pts], "o-",
                    label=f"{policy}, batch {batch}")
            for r in pts:
                ax.annotate(f"{r['budget']:g}", (r["kl"], r["speedup_vs_full"]), fontsize=7)
    ax.set_xlabel("KL to the full model (lower is better)")
    ax.set_ylabel("decode speedup over full depth")
    ax.legend(fontsize=7)
    ax.set_title("batch-aware vs per-token decisions (labels: budget)")
    fig.tight_layout()
    fig.savefig(args.out + ".png", dpi=120)
    print(f"wrote {args.out}.json and {args.out}.png", file=sys.stderr)


if __name__ == "__main__":
    main()
