"""Chat answers per controller and budget, read against the full model's answers.

KL and perplexity on held-out prose do not show whether a chat answer still reads as one. Here
each prompt goes through the tokenizer's chat template exactly as `anee-fast generate` (and
`make run`) sends it, and is answered greedily (stop at EOS) by the full model and by each
controller at each budget, the prompt read at `prompt_budget` (1.0 as `make run` does: full
depth; None: at the budget too). Per answer: its text and tokens, the mean compute of its run
(`compute`, prompt included, and `answer_compute`, the tokens after the prompt), `ppl_under_full` (the full model's perplexity of the answer's tokens, the stop token
included, given the prompt), `ppl_ratio` (that over the full model's own answer's), `ends_early`
(empty, or stopped within ENDS_EARLY_TOKENS tokens where the full model did not), `distinct2`
(None under 2 tokens) and `loops` (distinct2 under LOOP_FRACTION of the full model's answer's: a
repetition the full model does not make). A loop of one token can be likelier to the full model
than its own answer (ppl_ratio < 1), so read ppl_ratio beside distinct2 and loops.
"""
import math
import statistics

from ..actions import PROCESS
from ..engine.sampling import SamplingParams
from .quality import continuation_nll, distinct2

DEFAULT_PROMPTS = (
    "Write a haiku about autumn.",
    "What is the capital of France?",
    "Give three tips for staying focused while studying.",
    "Explain what a hash table is in two sentences.",
    "Summarise the plot of Romeo and Juliet in one paragraph.",
    "How do I make a cup of tea?",
)
ENDS_EARLY_TOKENS = 5
LOOP_FRACTION = 0.5
FULL = "full"


def chat_prompt_ids(tokenizer, prompt: str, chat=None):
    """(token ids, whether the chat template was used) of a user prompt, as `anee-fast generate`
    sends it (its --chat: None uses the template when the tokenizer has one); the template's text
    holds its own special tokens, so it is encoded without adding more."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat and not has_template:
        raise ValueError("--chat: this model's tokenizer has no chat template (use --no-chat)")
    chat = has_template if chat is None else chat
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             add_generation_prompt=True, tokenize=False)
        ids = tokenizer.encode(text, add_special_tokens=False)
    else:
        ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError("the prompt encodes to no tokens")
    return [int(t) for t in ids], chat


def _stops_within(num_tokens: int, finish_reason: str, limit: int = ENDS_EARLY_TOKENS) -> bool:
    """Whether an answer stopped by itself (EOS) after at most `limit` tokens."""
    return finish_reason == "stop" and num_tokens <= limit


def ends_early(text: str, num_tokens: int, finish_reason: str, full_tokens: int,
               full_finish_reason: str) -> bool:
    """An answer that is empty, or that stops within ENDS_EARLY_TOKENS tokens where the full
    model's answer to the same prompt does not: a controller cutting the answer short."""
    return not text.strip() or (_stops_within(num_tokens, finish_reason)
                                and not _stops_within(full_tokens, full_finish_reason))


def loops(distinct2, full_distinct2) -> bool:
    """Whether an answer repeats itself where the full model's answer does not: its distinct
    2-grams under LOOP_FRACTION of the full answer's (False when either has under 2 tokens)."""
    if distinct2 is None or full_distinct2 is None:
        return False
    return distinct2 < LOOP_FRACTION * full_distinct2


def _controller_at(name, value, budget):
    """One controller spec at a budget: value is a spec or a callable budget -> spec."""
    spec = value(budget) if callable(value) else value
    if isinstance(spec, list) and spec and not isinstance(spec[0], int):
        raise ValueError(f"controller {name!r} gives one controller per held-out window; chat "
                         "answers need one per budget")
    return spec


def chat_answers(llm, prompts, budgets, controllers, max_tokens: int = 96,
                 progress: bool = True, prompt_budget=1.0) -> list:
    """Records (see the module doc) of the full model's answers, then of each controller's at each
    budget, prompts innermost. controllers: names or specs, or a dict label -> spec or callable
    budget -> spec (evaluate()'s form, one spec per budget)."""
    if llm.tokenizer is None:
        raise ValueError("chat answers need the model's tokenizer")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    if not isinstance(controllers, dict):
        controllers = {str(c): c for c in controllers}
    budgets = [float(b) for b in budgets]
    ids = [chat_prompt_ids(llm.tokenizer, p)[0] for p in prompts]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    runs = [(FULL, 1.0, [PROCESS] * llm.num_layers)]
    runs += [(name, b, _controller_at(name, value, b)) for name, value in controllers.items()
             for b in budgets]
    from tqdm import tqdm
    outputs = []
    for name, budget, spec in tqdm(runs, desc="chat answers", unit="run", disable=not progress):
        answers = llm.generate(ids, params, energy_budget=budget, controller=spec,
                               prompt_budget=prompt_budget)
        outputs += [(name, budget, prompt, out) for prompt, out in zip(prompts, answers)]
    nll = continuation_nll(llm, ids * len(runs), [out.token_ids for *_, out in outputs],
                           progress=progress)
    records = []
    for i, ((name, budget, prompt, out), token_nll) in enumerate(zip(outputs, nll)):
        record = {"prompt": prompt, "controller": name, "budget": budget, "text": out.text,
                  "token_ids": list(out.token_ids), "tokens": len(out.token_ids),
                  "finish_reason": out.finish_reason, "compute": out.trace.mean_compute,
                  "answer_compute": out.trace.generated_compute,
                  "prompt_budget": out.trace.prompt_budget,
                  "ppl_under_full": math.exp(float(token_nll.mean())),
                  "distinct2": distinct2(out.token_ids) if len(out.token_ids) > 1 else None}
        full = records[i % len(prompts)] if i >= len(prompts) else record
        record["ends_early"] = ends_early(out.text, record["tokens"], out.finish_reason,
                                          full["tokens"], full["finish_reason"])
        record["ppl_ratio"] = record["ppl_under_full"] / full["ppl_under_full"]
        record["loops"] = loops(record["distinct2"], full["distinct2"])
        records.append(record)
    return records


def _runs(records) -> dict:
    """(controller, budget) -> its records, in the order they were run."""
    runs = {}
    for r in records:
        runs.setdefault((r["controller"], r["budget"]), []).append(r)
    return runs


def format_chat_summary(records) -> str:
    """Per controller and budget: mean compute (prompt included, and of the answer's tokens),
    answers that end early and that loop, the median ppl_ratio, the mean distinct2 (of answers
    with 2 tokens or more) and the mean answer length, as a table."""
    head = f"{'controller':<16}{'budget':>7}{'compute':>9}{'answer':>8}{'answers':>9}{'early':>7}" \
           f"{'loops':>7}{'ppl_ratio':>11}{'dist2':>7}{'tokens':>8}"
    lines = [head, "-" * len(head)]
    for (name, budget), rows in _runs(records).items():
        d2 = [r["distinct2"] for r in rows if r["distinct2"] is not None]
        lines.append(f"{name:<16}{budget:>7.2f}{statistics.fmean(r['compute'] for r in rows):>9.3f}"
                     f"{statistics.fmean(r['answer_compute'] for r in rows):>8.3f}"
                     f"{len(rows):>9}{sum(r['ends_early'] for r in rows):>7}"
                     f"{sum(r['loops'] for r in rows):>7}"
                     f"{statistics.median(r['ppl_ratio'] for r in rows):>11.3g}"
                     f"{f'{statistics.fmean(d2):.3f}' if d2 else '-':>7}"
                     f"{statistics.fmean(r['tokens'] for r in rows):>8.1f}")
    return "\n".join(lines)


def format_chat_markdown(records) -> str:
    """Per prompt, the full model's answer, then each controller's at each budget with its
    figures and flags, each answer quoted as it was written."""
    prompt_budgets = sorted({r["prompt_budget"] for r in records if r["controller"] != FULL})
    read = ("the prompt read at its answer's budget" if not prompt_budgets else
            f"the prompt read at prompt budget {', '.join(f'{b:g}' for b in prompt_budgets)}")
    lines = ["# Chat answers", "",
             f"Greedy, stop at EOS, {read}; `compute` includes the prompt, `answer` is the answer's "
             "tokens' alone. `ppl` is the full model's perplexity of the answer (its stop "
             "token included) given the prompt; `x` that over the full model's own answer's; "
             "`dist2` the answer's distinct 2-grams over all its 2-grams; "
             f"**ENDS EARLY**: empty, or stopped within {ENDS_EARLY_TOKENS} tokens where the full "
             f"model did not; **LOOPS**: `dist2` under {LOOP_FRACTION:g} of the full model's "
             "answer's.", "", "## Summary", "", "```", format_chat_summary(records), "```"]
    by_prompt = {}
    for r in records:
        by_prompt.setdefault(r["prompt"], []).append(r)
    for number, (prompt, rows) in enumerate(by_prompt.items(), 1):
        lines += ["", f"## {number}. {prompt}"]
        for r in rows:
            label = r["controller"] if r["controller"] == FULL else \
                f"{r['controller']} @ {r['budget']:g}"
            flags = [f"compute {r['compute']:.3f} (answer {r['answer_compute']:.3f})",
                     f"{r['tokens']} tokens",
                     "stopped" if r["finish_reason"] == "stop" else "cut at max_tokens",
                     f"ppl {r['ppl_under_full']:.3g} (x{r['ppl_ratio']:.2f})"]
            if r["distinct2"] is not None:
                flags.append(f"dist2 {r['distinct2']:.2f}")
            if r["ends_early"]:
                flags.append("**ENDS EARLY**")
            if r["loops"]:
                flags.append("**LOOPS**")
            quoted = [f"> {line}" if line else ">" for line in r["text"].strip().splitlines()]
            lines += ["", f"**{label}** · " + " · ".join(flags), ""] + (quoted or ["> *(empty)*"])
    return "\n".join(lines) + "\n"
