"""How generated text reads: distinct2 on known sequences, and evaluate()'s gen_ppl and distinct2
of the full model's own greedy continuations against transformers computed independently."""
import math

import pytest
import torch
from conftest import build_model, hf_logits, random_ids

from anee_fast import LLM
from anee_fast.eval.evaluation import evaluate, format_table
from anee_fast.eval.quality import continuation_nll, distinct2

LAYERS = 4
PREFIX, GEN = 12, 10


@pytest.fixture(scope="module")
def tiny():
    model = build_model("llama_gqa", num_layers=LAYERS)
    return model, LLM(model, backend="reference")


@pytest.mark.parametrize("n", [2, 3, 10])
def test_distinct2_of_one_token_repeated_is_one_over_n_minus_one(n):
    assert distinct2([7] * n) == pytest.approx(1 / (n - 1))


def test_distinct2_of_known_sequences():
    assert distinct2(range(12)) == 1.0
    assert distinct2([1, 2, 1, 2, 1]) == 0.5          # (1,2) (2,1) (1,2) (2,1)
    assert distinct2([3, 3, 4]) == 1.0                 # (3,3) (3,4)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        distinct2([5])


@torch.no_grad()
def _hf_greedy(model, prefix, n):
    ids = list(prefix)
    for _ in range(n):
        ids.append(int(hf_logits(model, ids)[-1].argmax()))
    return ids[len(prefix):]


def _hf_nll(model, prefix, continuation):
    logits = hf_logits(model, list(prefix) + list(continuation))
    log_p = torch.log_softmax(logits[len(prefix) - 1:-1], dim=-1)
    return -log_p[torch.arange(len(continuation)), torch.tensor(continuation)]


def test_continuation_nll_scores_only_the_continuation(tiny):
    model, llm = tiny
    prefixes = [random_ids(model, n, seed=n).tolist() for n in (5, 9)]
    continuations = [random_ids(model, n, seed=10 + n).tolist() for n in (1, 6)]
    for got, p, c in zip(continuation_nll(llm, prefixes, continuations, progress=False),
                         prefixes, continuations):
        assert got.shape == (len(c),)
        assert torch.allclose(got, _hf_nll(model, p, c), atol=1e-4)
    with pytest.raises(ValueError, match="at least one token"):
        continuation_nll(llm, [[1]], [[]], progress=False)


def test_gen_ppl_and_distinct2_of_the_full_model_match_an_independent_computation(tiny):
    model, llm = tiny
    windows = [random_ids(model, 24, seed=s).tolist() for s in range(3)]
    records = evaluate(llm, {"budget": "budget", "skip-all": [0, 0] + [1] * (LAYERS - 2)},
                       [1.0], windows, prefix_len=PREFIX, gen_tokens=GEN, progress=False)
    by = {r["controller"]: r for r in records}
    continuations = [_hf_greedy(model, w[:PREFIX], GEN) for w in windows]
    nll = torch.cat([_hf_nll(model, w[:PREFIX], c) for w, c in zip(windows, continuations)])
    assert by["full"]["gen_ppl"] == pytest.approx(math.exp(float(nll.mean())), rel=1e-4)
    assert by["full"]["distinct2"] == pytest.approx(
        sum(distinct2(c) for c in continuations) / len(continuations))
    # The budget controller at 1.0 runs every layer: the same continuation, the same figures.
    assert by["budget"]["gen_ppl"] == pytest.approx(by["full"]["gen_ppl"], rel=1e-5)
    assert by["budget"]["distinct2"] == by["full"]["distinct2"]
    # Skipping layers writes a continuation the full model finds less likely than its own
    # (45 against 30 here).
    assert by["skip-all"]["gen_ppl"] > by["full"]["gen_ppl"]
    assert 0 < by["skip-all"]["distinct2"] <= 1
    table = format_table(records)
    assert "gen_ppl" in table.splitlines()[0] and "dist2" in table.splitlines()[0]
    assert f"{by['full']['gen_ppl']:.4g}" in table.splitlines()[2]
    with pytest.raises(ValueError, match="gen_tokens must be >= 2"):
        evaluate(llm, {}, [1.0], windows, prefix_len=PREFIX, gen_tokens=1, progress=False)
