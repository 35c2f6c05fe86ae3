"""sample_batch draws every row of a step together: the frequencies match the distribution that
temperature, top-k and top-p define (computed here, one row at a time, as the reference), a
seeded row draws the same token in any batch, and greedy and None rows mix with sampled ones."""
import math

import pytest
import torch

from anee_fast.engine.sampling import SamplingParams, sample_batch

LOGITS = torch.tensor([2.0, 1.5, 1.5, 0.3, -0.7, float("-inf"), -2.0])


def reference_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The distribution of one row, written out step by step in float64."""
    x = logits.double() / p.temperature
    if p.top_k:
        kth = x.sort(descending=True).values[min(p.top_k, x.numel()) - 1]
        x = torch.where(x < kth, -math.inf, x)
    probs = torch.softmax(x, dim=0)
    if p.top_p < 1.0:
        order = probs.argsort(descending=True)
        kept, mass = torch.zeros_like(probs), 0.0
        for i in order.tolist():             # the most likely tokens until their mass >= top_p
            if mass >= p.top_p:
                break
            kept[i], mass = probs[i], mass + float(probs[i])
        probs = kept / kept.sum()
    return probs


def seeded(n, first_seed=0):
    return [torch.Generator().manual_seed(first_seed + i) for i in range(n)]


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.3, top_k=3),
    SamplingParams(temperature=1.0, top_p=0.6),
    SamplingParams(temperature=0.9, top_k=4, top_p=0.8),
    SamplingParams(temperature=2.5, top_k=100),          # k beyond the vocabulary: every token
], ids=str)
def test_frequencies_match_the_reference_distribution(params):
    n = 20000
    tokens = sample_batch(LOGITS.expand(n, -1), [params] * n, seeded(n))
    counts = torch.bincount(torch.tensor(tokens), minlength=LOGITS.numel()).double()
    expected = reference_probs(LOGITS, params)
    assert torch.all(counts[expected == 0] == 0)          # a token of probability 0: never
    sigma = (expected * (1 - expected) / n).sqrt()
    assert torch.all((counts / n - expected).abs() <= 5 * sigma + 1e-3), (counts / n, expected)


def test_a_seeded_row_draws_the_same_token_in_any_batch():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 50, generator=g)
    params = [SamplingParams(temperature=0.8), None, SamplingParams(temperature=1.7, top_k=5),
              SamplingParams(), SamplingParams(temperature=1.0, top_p=0.5)]
    batch = sample_batch(logits, params, [torch.Generator().manual_seed(40 + i) for i in range(5)])
    for i, p in enumerate(params):
        alone = sample_batch(logits[i:i + 1], [p], [torch.Generator().manual_seed(40 + i)])
        assert alone == [batch[i]]
    assert batch[1] is None and batch[3] == int(logits[3].argmax())


def test_a_generator_advances_one_draw_per_sampled_token():
    params = SamplingParams(temperature=1.0)
    g, twin = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    draws = [sample_batch(LOGITS[None], [params], [g])[0] for _ in range(30)]
    again = [sample_batch(LOGITS[None], [params], [twin])[0] for _ in range(30)]
    assert draws == again and len(set(draws)) > 1


# ---- what SamplingParams refuses -------------------------------------------------------------------

@pytest.mark.parametrize("seed", [-1, 2**63, 2**70, "abc", True, 1.5], ids=repr)
def test_a_seed_is_a_non_negative_int64(seed):
    """torch's generator reads -1 as 2**64 - 1, fails on 2**70 with an overflow and on a string
    with a RuntimeError only when sampling starts: each is refused up front."""
    with pytest.raises(ValueError, match=r"seed must be None or an integer in \[0, 2\*\*63\)"):
        SamplingParams(temperature=1.0, seed=seed)


def test_the_largest_seed_samples_reproducibly():
    params = SamplingParams(temperature=1.0, seed=2**63 - 1)
    draws = [sample_batch(LOGITS[None], [params], [params.make_generator()])[0] for _ in range(2)]
    assert draws[0] == draws[1]


@pytest.mark.parametrize("stops", ["x", 7, None, [1.5], [True], [3, "4"], {2: 3}], ids=repr)
def test_stop_token_ids_are_a_list_of_integers(stops):
    with pytest.raises(ValueError, match="stop_token_ids must be a list or tuple of integer"):
        SamplingParams(stop_token_ids=stops)


def test_stop_token_ids_as_a_list_or_tuple():
    assert SamplingParams(stop_token_ids=(3, 4)).stop_token_ids == (3, 4)
    assert SamplingParams(stop_token_ids=[]).stop_token_ids == []
