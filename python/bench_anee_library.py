"""Times the ANEE 0.4 library's own decode loop on a GPT-2 checkpoint directory. It needs
transformers <= 4.51.3, so it runs in its own environment (`make anee-env` makes .venv-anee);
bench_decode.py starts it there and puts its figures next to ours.

    .venv-anee/bin/python python/bench_anee_library.py --model-dir out/gpt2-124m --json out/anee.json

ANEE's `generate` samples (top-k, temperature > 0); for a greedy, like-for-like timing this
script drives `ANEEWrapper.forward` with an argmax, exactly as `generate` drives it otherwise.
Decode ms/step = (prefill + N steps - prefill) / N, median of the repeats.
"""
import argparse
import json
import statistics
import time

import torch


def decode(model, prompt, new_tokens, budget):
    out = model.forward(prompt, energy_budget=budget)
    past, token = out["past_key_values"], out["logits"][:, -1:].argmax(-1)
    for _ in range(new_tokens):
        out = model.forward(token, energy_budget=budget, past_key_values=past)
        past, token = out["past_key_values"], out["logits"][:, -1:].argmax(-1)
    return out["stats"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", required=True)
    p.add_argument("--budgets", default="1,0.75,0.5,0.25")
    p.add_argument("--controller", default="heuristic", choices=("heuristic", "learned"))
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)

    import ANEE
    import transformers
    from ANEE import ANEEConfig, ANEEWrapper
    torch.manual_seed(0)
    model = ANEEWrapper(ANEEConfig(model_name=args.model_dir, controller_type=args.controller))
    prompt = torch.randint(0, model.base_model.config.vocab_size, (1, args.prompt_tokens),
                           generator=torch.Generator().manual_seed(1))
    rows = []
    with torch.inference_mode():
        for budget in (float(b) for b in args.budgets.split(",")):
            row = dict(budget=budget, controller=args.controller, torch=torch.__version__,
                       transformers=transformers.__version__,
                       anee=getattr(ANEE, "__version__", "0.4"))
            try:
                stats = decode(model, prompt, 2, budget)                  # warm-up
                times = {}
                for n in (0, args.new_tokens):
                    runs = []
                    for _ in range(args.repeats):
                        t0 = time.perf_counter()
                        stats = decode(model, prompt, n, budget)
                        runs.append(time.perf_counter() - t0)
                    times[n] = statistics.median(runs)
                row.update(ms_per_step=1e3 * (times[args.new_tokens] - times[0]) / args.new_tokens,
                           layers_executed_last_step=stats["layers_executed"],
                           skipped_layers_last_step=stats["skipped_layers"])
            except Exception as e:      # the library's own failures are a result to report
                row["error"] = f"{type(e).__name__}: {e}"
            rows.append(row)
            print(row, flush=True)
    with open(args.json, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
