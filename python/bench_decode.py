"""End-to-end greedy decode: anee_fast against transformers' `generate` on the same model, device,
dtype and tokens, in one run. Prints a table and writes JSON and a PNG.

    python python/bench_decode.py --model gpt2-124m --budgets 1,0.5 --batch 1 --new-tokens 64

Models: `gpt2-124m` and `llama-1b` build random-init models of those shapes (no download);
`smollm2` is the embedded SmolLM2-135M-Instruct; anything else is passed to `LLM(...)`.
Decode time is the whole run minus a run that generates one token (the prefill).
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch


def build(name, device, dtype):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    if name == "gpt2-124m":
        model = GPT2LMHeadModel(GPT2Config())
    elif name == "llama-1b":
        model = LlamaForCausalLM(LlamaConfig(hidden_size=2048, intermediate_size=8192,
                                             num_hidden_layers=16, num_attention_heads=32,
                                             num_key_value_heads=8, vocab_size=128256,
                                             tie_word_embeddings=True))
    else:
        from anee_fast.model_loader import load_hf
        model = load_hf(None if name == "smollm2" else name)[0]
    return model.to(device=device, dtype=dtype).eval()


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2-124m")
    p.add_argument("--budgets", default="1,0.75,0.5,0.25")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--controller", default="budget")
    p.add_argument("--backend", default="auto")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"))
    p.add_argument("--out", default="out/bench_decode")
    args = p.parse_args(argv)

    from anee_fast import LLM, SamplingParams
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = build(args.model, device, dtype)
    llm = LLM(model, backend=args.backend, device=device, dtype=dtype, min_layers=0)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt_tokens), generator=g)
    new = args.new_tokens

    def hf(n):
        with torch.inference_mode():
            model.generate(prompts.to(device), attention_mask=torch.ones_like(prompts, device=device),
                           max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=0)

    def ours(n, budget):
        llm.generate(prompts.tolist(), SamplingParams(max_tokens=n, ignore_eos=True),
                     energy_budget=budget, controller=args.controller)

    hf(2), ours(2, 1.0)                                                   # warm-up
    hf_prefill, hf_total = timed(lambda: hf(1), args.repeats), timed(lambda: hf(new), args.repeats)
    hf_decode = (hf_total - hf_prefill) / (new - 1)
    rows = []
    for budget in (float(b) for b in args.budgets.split(",")):
        out = llm.generate(prompts.tolist(), SamplingParams(max_tokens=new, ignore_eos=True),
                           energy_budget=budget, controller=args.controller)
        compute = statistics.mean(float(o.trace.compute[o.trace.num_prompt_tokens:].mean()) for o in out)
        prefill = timed(lambda: ours(1, budget), args.repeats)
        total = timed(lambda: ours(new, budget), args.repeats)
        decode = (total - prefill) / (new - 1)
        rows.append(dict(model=args.model, device=args.device, dtype=str(dtype).removeprefix("torch."),
                         backend=llm.backend, batch=args.batch, budget=budget, compute=compute,
                         ms_per_step=decode * 1e3, tokens_per_s=args.batch / decode,
                         hf_ms_per_step=hf_decode * 1e3, speedup_vs_hf=hf_decode / decode,
                         prefill_ms=prefill * 1e3, hf_prefill_ms=hf_prefill * 1e3))

    header = f"{'budget':>6} {'compute':>8} {'ms/step':>8} {'tok/s':>8} {'HF ms/step':>10} {'vs HF':>6} {'prefill ms':>10}"
    print(f"{args.model}, {args.device}, {rows[0]['dtype']}, backend {llm.backend}, batch {args.batch}, "
          f"{args.prompt_tokens} prompt + {new} new tokens, controller {args.controller}")
    print(header)
    for r in rows:
        print(f"{r['budget']:>6.2f} {r['compute']:>8.3f} {r['ms_per_step']:>8.2f} {r['tokens_per_s']:>8.1f} "
              f"{r['hf_ms_per_step']:>10.2f} {r['speedup_vs_hf']:>5.2f}x {r['prefill_ms']:>10.1f}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    from matplotlib.figure import Figure
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    ax.plot([r["budget"] for r in rows], [r["speedup_vs_hf"] for r in rows], "o-")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("energy budget")
    ax.set_ylabel("decode speedup over transformers")
    ax.set_title(f"{args.model}, batch {args.batch}, {args.device}")
    fig.tight_layout()
    fig.savefig(args.out + ".png", dpi=120)
    print(f"wrote {args.out}.json and {args.out}.png", file=sys.stderr)


if __name__ == "__main__":
    main()
