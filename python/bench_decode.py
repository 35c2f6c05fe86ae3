"""End-to-end greedy decode: anee_fast against transformers' `generate` (and the ANEE 0.4 library
where it runs) on the same model, device, dtype and tokens, in one run, with the roofline model's
ideal speedup next to every measured one. Prints a table and writes JSON and a PNG.

    python python/bench_decode.py --models gpt2-124m --budgets 1,0.75,0.5,0.25 --batches 1,8,64

Models: `gpt2-124m` and `llama-1b` build random-init models of those shapes (no download);
`smollm2` is the embedded SmolLM2-135M-Instruct; anything else is passed to `LLM(...)`.
--weights runs each weight format (LLM(weights=...): auto, fp32, bf16, int8, gguf) side by side.
For `smollm2` at batch 1, where llama-cpp-python is installed, llama.cpp decodes the same GGUF
file with the same prompt tokens and threads in the same run ("llama.cpp ms" and "vs llama"
columns; its tokens are checked against our full-depth ones). Its runs alternate with ours for
every row, so that a machine whose speed drifts (a shared VM can drift by 20% within a minute)
slows both sides of a ratio alike.
Decode ms/step = (run with N new tokens - run with 1) / (N - 1): the prefill is timed apart.
"vs full" is our speedup over our own full depth (budget 1.0, first --conditional-layers variant)
in the same run, its runs alternating with the row's own; "ideal" is the
speedup the roofline model (python/roofline.py) gives for the actions the run actually took;
"of ideal" = vs full / ideal.
J/token: decode energy per generated token from the GPU's NVML energy counter (needs
nvidia-ml-py), found as decode time is: (a run with N new tokens - a run with 1) / ((N - 1) x
batch), each run repeated over a window of at least 1 s; in brackets, the energy above the idle
power measured at the start (in the JSON header). Without a counter the column says
"unavailable" and the JSON header says why (see anee_fast/engine/energy.py).
The ANEE 0.4 library needs transformers <= 4.51.3: `make anee-env` builds .venv-anee, and
GPT-2 rows at batch 1 then also time it there (its controllers ignore batches; see --anee-python).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from anee_fast.engine.energy import EnergyMeter, energy_meter
from bench_results import BenchResults
from roofline import ideal_speedup, measure_peaks

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ANEE_PYTHON = os.path.join(HERE, "..", ".venv-anee", "bin", "python")


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
        from anee_fast.model.loader import load_hf
        model = load_hf(None if name == "smollm2" else name)[0]
    return model.to(device=device, dtype=dtype).eval()


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def prefill_and_decode(runs, new, repeats):
    """For each of `runs` (functions of a number of new tokens): (prefill s, decode s per step) =
    (median of run(1), (median of run(new) - median of run(1)) / (new - 1)). The runs take turns
    call by call, so that a drift in the machine's speed reaches all of them alike."""
    times = [{1: [], new: []} for _ in runs]
    for _ in range(repeats):
        for n in (1, new):
            for run, t in zip(runs, times):
                sync()
                start = time.perf_counter()
                run(n)
                sync()
                t[n].append(time.perf_counter() - start)
    medians = [{n: statistics.median(v) for n, v in t.items()} for t in times]
    return [(m[1], (m[new] - m[1]) / (new - 1)) for m in medians]


def llama_cpp_runner(prompt, max_new):
    """(run, None), run(n) -> the greedy tokens of n <= max_new new tokens from llama.cpp on the
    embedded model's GGUF file after `prompt`, with torch's threads; or (None, why) where it
    cannot run."""
    try:
        import llama_cpp
        import numpy as np
    except ImportError:
        return None, "llama-cpp-python is not installed"
    from anee_fast.model import default_model
    threads = torch.get_num_threads()
    model = llama_cpp.Llama(default_model.gguf_path(), n_threads=threads, n_threads_batch=threads,
                            n_ctx=len(prompt) + max_new + 8, verbose=False)
    vocab = model.n_vocab()

    def run(n):
        model.reset()
        model.eval(prompt)
        tokens = []
        for _ in range(n):
            logits = np.ctypeslib.as_array(model._ctx.get_logits(), shape=(vocab,))
            tokens.append(int(logits.argmax()))
            model.eval(tokens[-1:])
        return tokens

    run(2)                                                                # warm-up
    return run, None


def anee_library_rows(model, args, budgets):
    """ms/step of the ANEE 0.4 library at each budget (GPT-2 only), or a reason it cannot run."""
    python = args.anee_python
    if not os.path.exists(python):
        return {"error": f"no ANEE environment at {python} (make anee-env builds it)"}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, out = os.path.join(tmp, "model"), os.path.join(tmp, "anee.json")
        model.save_pretrained(model_dir)
        cmd = [python, os.path.join(HERE, "bench_anee_library.py"), "--model-dir", model_dir,
               "--budgets", ",".join(map(str, budgets)), "--prompt-tokens", str(args.prompt_tokens),
               "--new-tokens", str(args.new_tokens - 1), "--repeats", str(args.repeats),
               "--json", out]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            return {"error": f"the ANEE run failed: {done.stderr.strip().splitlines()[-1:]}"}
        with open(out) as f:
            return {r["budget"]: r for r in json.load(f)}


CONDITIONAL = {"off": False, "on": True, "compacted": "compacted"}


def decode_energy(meter, run, new, batch):
    """J per generated token of decode, total and above idle, as decode time is found: (a run of
    `new` tokens - a run of 1) / ((new - 1) * batch); None for both without a meter."""
    if not isinstance(meter, EnergyMeter):
        return dict(joules_per_token=None, joules_per_token_above_idle=None)
    tokens = (new - 1) * batch
    many = meter.measure(lambda: run(new)).per_token(tokens)
    one = meter.measure(lambda: run(1)).per_token(tokens)
    return dict(joules_per_token=many.joules - one.joules,
                joules_per_token_above_idle=many.above_idle_joules - one.above_idle_joules)


def bench_model(name, args, device, dtype, peaks, budgets, results, meter):
    """Rows of one model: per batch, transformers once, then every conditional-layers variant at
    every budget ("vs full" against the first variant's full depth, so variants compare)."""
    from anee_fast import LLM, SamplingParams
    model = build(name, device, dtype)
    graphs = None if device.type == "cpu" else args.cuda_graphs == "on"
    llms = {}         # variant -> LLM, for the variants that could be built

    def build_llm(variant, weights):
        source = None if name == "smollm2" else model      # the embedded GGUF keeps its blocks
        llms[variant, weights] = LLM(source, backend=args.backend, device=device, dtype=dtype,
                                     min_layers=0, cuda_graphs=graphs,
                                     conditional_layers=CONDITIONAL[variant], weights=weights)

    for v in args.conditional_layers:
        for w in args.weights:
            results.attempt(dict(model=name, conditional_layers=CONDITIONAL[v], weights=w),
                            lambda: build_llm(v, w))
    if not llms:
        return
    spec = next(iter(llms.values())).spec
    new = args.new_tokens
    anee = None
    if name == "gpt2-124m" and device.type == "cpu" and dtype == torch.float32:
        anee = anee_library_rows(model, args, budgets)
    for batch in args.batches:
        g = torch.Generator().manual_seed(1)
        prompts = torch.randint(0, spec.vocab_size, (batch, args.prompt_tokens), generator=g)

        def hf(n):
            with torch.inference_mode():
                model.generate(prompts.to(device), attention_mask=torch.ones_like(prompts, device=device),
                               max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

        hf(2)                                                             # warm-up
        [(hf_prefill, hf_decode)] = prefill_and_decode([hf], new, args.repeats)
        base = dict(model=name, device=str(device), dtype=str(dtype).removeprefix("torch."),
                    controller=args.controller, cuda_graphs=bool(graphs), batch=batch,
                    hf_ms_per_step=hf_decode * 1e3, hf_prefill_ms=hf_prefill * 1e3)
        full = []             # the first variant's full-depth run, timed beside every later row
        llama = None
        if name == "smollm2" and batch == 1 and device.type == "cpu":
            llama, why = llama_cpp_runner(prompts[0].tolist(), new)
            if llama is None:
                print(f"llama.cpp: {why}", file=sys.stderr)

        def variant_rows(llm, variant, weights):
            """One layer-loop variant's rows at every budget ("vs full": full[0]'s decode time,
            measured beside the row, over the row's)."""
            def ours(n, budget):
                return llm.generate(prompts.tolist(), SamplingParams(max_tokens=n, ignore_eos=True),
                                    energy_budget=budget, controller=args.controller)

            ours(2, 1.0)                                                  # warm-up, graph capture
            for budget in budgets:
                outs = ours(new, budget)
                traces = [o.trace for o in outs]
                compute = statistics.mean(float(t.compute[t.num_prompt_tokens:].mean()) for t in traces)
                bytes_per_weight = llm.weights.nbytes() / sum(p.numel() for p in model.parameters())
                model_full_ms, ideal = ideal_speedup(spec, traces, peaks, bytes_per_weight)
                run = lambda n, budget=budget: ours(n, budget)     # noqa: E731
                first = not full
                if first:
                    full.append(run)
                runs = [run] + ([] if first else full) + ([llama] if llama is not None else [])
                (prefill, decode), *beside = prefill_and_decode(runs, new, args.repeats)
                full_decode = decode if first else beside.pop(0)[1]
                row = dict(base, backend=llm.backend, conditional_layers=CONDITIONAL[variant],
                           weights=weights, weight_bytes=llm.weights.nbytes(),
                           budget=budget, compute=compute, ms_per_step=decode * 1e3,
                           tokens_per_s=batch / decode, speedup_vs_hf=hf_decode / decode,
                           speedup_vs_full=full_decode / decode, ideal_speedup=ideal,
                           fraction_of_ideal=(full_decode / decode) / ideal,
                           roofline_full_ms=model_full_ms, prefill_ms=prefill * 1e3,
                           **decode_energy(meter, lambda n: ours(n, budget), new, batch))
                if beside:
                    row["llama_cpp_ms_per_step"] = beside[0][1] * 1e3
                    row["speedup_vs_llama_cpp"] = beside[0][1] / decode
                    if budget == 1.0:
                        row["same_tokens_as_llama_cpp"] = outs[0].token_ids == llama(new)
                if anee is not None and batch == 1:
                    r = anee if "error" in anee else anee[budget]
                    row["anee_ms_per_step"] = r.get("ms_per_step")
                    row["anee_note"] = r.get("error", f"controller {r.get('controller')}, "
                                                      f"{r.get('layers_executed_last_step')} layers run")
                results.add(row)

        for (variant, weights), llm in llms.items():
            results.attempt(dict(model=name, conditional_layers=CONDITIONAL[variant],
                                 weights=weights, batch=batch),
                            lambda: variant_rows(llm, variant, weights))


HEADER = (f"{'model':<10} {'cond':<9} {'weights':<7} {'MB':>6} {'batch':>5} {'budget':>6} "
          f"{'compute':>7} {'ms/step':>8} {'tok/s':>8} "
          f"{'HF ms':>8} {'vs HF':>6} {'llama ms':>8} {'vs llama':>8} {'vs full':>7} {'ideal':>6} "
          f"{'of ideal':>8} {'roof ms':>7} "
          f"{'prefill':>8} {'HF pre':>8} {'ANEE ms':>8} {'J/tok (>idle)':>17}")


def print_row(r):
    anee = f"{r['anee_ms_per_step']:>8.2f}" if r.get("anee_ms_per_step") is not None else f"{'-':>8}"
    cond = {False: "off", True: "on", "compacted": "compacted"}[r["conditional_layers"]]
    energy = ("unavailable" if r["joules_per_token"] is None else
              f"{r['joules_per_token']:.3g} ({r['joules_per_token_above_idle']:.3g})")
    llama = (f"{r['llama_cpp_ms_per_step']:>8.2f} {r['speedup_vs_llama_cpp']:>7.2f}x"
             if r.get("llama_cpp_ms_per_step") is not None else f"{'-':>8} {'-':>8}")
    print(f"{r['model']:<10} {cond:<9} {r['weights']:<7} {r['weight_bytes'] / 1e6:>6.0f} "
          f"{r['batch']:>5} {r['budget']:>6.2f} {r['compute']:>7.3f} "
          f"{r['ms_per_step']:>8.2f} {r['tokens_per_s']:>8.1f} {r['hf_ms_per_step']:>8.2f} "
          f"{r['speedup_vs_hf']:>5.2f}x {llama} {r['speedup_vs_full']:>6.2f}x {r['ideal_speedup']:>5.2f}x "
          f"{r['fraction_of_ideal']:>7.0%} {r['roofline_full_ms']:>7.2f} {r['prefill_ms']:>8.1f} "
          f"{r['hf_prefill_ms']:>8.1f} {anee} {energy:>17}", flush=True)


def plot(rows, path):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(11, 4))
    left, right = fig.subplots(1, 2)
    def key_of(r):
        return r["model"], r["batch"], str(r["conditional_layers"]), r["weights"]

    for key in sorted({key_of(r) for r in rows}):
        pts = [r for r in rows if key_of(r) == key]
        label = (f"{key[0]}, batch {key[1]}, weights {key[3]}"
                 + (f", conditional {key[2]}" if key[2] != "False" else ""))
        left.plot([r["budget"] for r in pts], [r["speedup_vs_hf"] for r in pts], "o-", label=label)
        right.plot([r["ideal_speedup"] for r in pts], [r["speedup_vs_full"] for r in pts], "o",
                   label=label)
    left.axhline(1.0, color="grey", lw=0.8)
    left.set_xlabel("energy budget")
    left.set_ylabel("decode speedup over transformers")
    top = max(max(r["ideal_speedup"], r["speedup_vs_full"]) for r in rows) * 1.05
    right.plot([1, top], [1, top], color="grey", lw=0.8, label="achieved = ideal")
    right.set_xlabel("ideal speedup over own full depth (roofline model)")
    right.set_ylabel("achieved speedup over own full depth")
    for ax in (left, right):
        ax.legend(fontsize=7)
    graphs = ", CUDA graphs" if rows[0]["cuda_graphs"] else ""
    fig.suptitle(f"greedy decode, {rows[0]['device']}, {rows[0]['dtype']}, backend {rows[0]['backend']}{graphs}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="gpt2-124m")
    p.add_argument("--budgets", default="1,0.75,0.5,0.25", help="1.0 is always run first")
    p.add_argument("--batches", default="1")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--controller", default="budget")
    p.add_argument("--backend", default="auto")
    p.add_argument("--cuda-graphs", default="on", choices=("on", "off"),
                   help="on a GPU: replay decode steps from CUDA graphs (on) or launch eagerly (off)")
    p.add_argument("--conditional-layers", default="off",
                   help="comma list of off, on, compacted, timed side by side (on and compacted "
                        "need CUDA graphs): each layer's block a conditional node that runs only "
                        "when some row processes the layer; compacted: on the PROCESS rows only, "
                        "at a quarter, a half or all of the bucket's rows")
    p.add_argument("--weights", default="auto",
                   help="comma list of weight formats (LLM(weights=...)) timed side by side: "
                        "auto, fp32, bf16, int8, gguf")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"))
    p.add_argument("--anee-python", default=DEFAULT_ANEE_PYTHON,
                   help="python of the environment with the ANEE 0.4 library")
    p.add_argument("--out", default="out/bench_decode")
    args = p.parse_args(argv)
    if args.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (decode time is N new tokens minus 1)")
    args.batches = [int(b) for b in args.batches.split(",")]
    args.conditional_layers = args.conditional_layers.split(",")
    args.weights = args.weights.split(",")
    from anee_fast.model.weight_storage import WEIGHTS
    if any(w not in WEIGHTS for w in args.weights):
        p.error(f"--weights: a comma list of {', '.join(WEIGHTS)}, got {','.join(args.weights)}")
    unknown = [v for v in args.conditional_layers if v not in CONDITIONAL]
    if unknown or len(set(args.conditional_layers)) != len(args.conditional_layers):
        p.error(f"--conditional-layers: a comma list of distinct {', '.join(CONDITIONAL)}, got "
                f"{','.join(args.conditional_layers)}")
    budgets = [1.0] + [b for b in (float(x) for x in args.budgets.split(",")) if b != 1.0]

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    meter = energy_meter(device)
    if isinstance(meter, EnergyMeter):     # before any work: the device is idle now
        energy = dict(idle_watts=meter.measure_idle(3 * meter.min_window_s))
        energy_note = f"idle {energy['idle_watts']:.1f} W"
    else:
        energy = dict(unavailable=meter)
        energy_note = f"energy unavailable: {meter}"
    peaks = measure_peaks(device, dtype)
    print(f"{device}, {str(dtype).removeprefix('torch.')}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.prompt_tokens} prompt + {args.new_tokens} new "
          f"tokens, controller {args.controller}; {peaks.describe()}; {energy_note}")
    print(HEADER)
    results = BenchResults(args.out, print_row, peaks=vars(peaks), energy=energy)
    for name in args.models.split(","):
        bench_model(name, args, device, dtype, peaks, budgets, results, meter)
    if results.rows:
        plot(results.rows, args.out + ".png")
        print(f"wrote {args.out}.json and {args.out}.png", file=sys.stderr)
    results.finish()


if __name__ == "__main__":
    main()
