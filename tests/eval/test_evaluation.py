"""Baselines, static-set search, category routing and the evaluation records, on a tiny model;
one slow smoke run of `anee-fast eval` on the embedded SmolLM2."""
import json

import pytest
import torch
from conftest import build_model, random_ids

from anee_fast import LLM
from anee_fast.eval import static_search
from anee_fast.eval.baselines import (RandomSkipController, random_skip_prob,
                                            untrained_learned_controller)
from anee_fast.eval.category_router import CategoryRouter, kmeans, prompt_embeddings
from anee_fast.control.controllers import StaticController
from anee_fast.eval.category_router import nearest

from anee_fast.eval.evaluation import evaluate, format_table, weights_cost
from anee_fast.eval.plots import plot_quality_vs_compute
from anee_fast.eval.quality import full_logits, score_windows, token_kl
from anee_fast.eval.static_search import (best_static_sets, greedy_path,
                                     skip_set_actions, skip_set_compute)

LAYERS = 6


@pytest.fixture(scope="module")
def tiny():
    model = build_model("llama_gqa", num_layers=LAYERS)
    llm = LLM(model, backend="reference")
    windows = [random_ids(model, 40, seed=s).tolist() for s in range(4)]
    return llm, windows


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ANEE_FAST_CACHE", str(tmp_path / "cache"))


def test_random_skip_prob_closed_form():
    assert random_skip_prob(1.0, 30, 0.0626, 2) == 0.0
    assert random_skip_prob(0.0, 30, 0.0626, 2) == 1.0
    p = random_skip_prob(0.5, 30, 0.0626, 2)
    expected = (2 + 28 * (1 - p * (1 - 0.0626))) / 30
    assert abs(expected - 0.5) < 1e-9
    with pytest.raises(ValueError, match="skip_prob"):
        RandomSkipController(1.5)


def test_random_controller_is_seeded_and_lands_near_its_budget():
    model = build_model("llama_gqa", num_layers=16)
    llm = LLM(model, backend="reference")
    windows = [random_ids(model, 48, seed=s).tolist() for s in range(4)]
    depth = llm.depth
    budget = 0.6
    p = random_skip_prob(budget, 16, depth.skip_cost, depth.min_layers)

    def run(seed):
        _, traces = score_windows(llm, windows, energy_budget=budget,
                                  controller=RandomSkipController(p, seed), progress=False)
        return torch.cat([t.actions for t in traces]), torch.cat([t.compute for t in traces])

    actions, compute = run(0)
    assert torch.equal(actions, run(0)[0])
    assert not torch.equal(actions, run(1)[0])
    assert compute.max() <= budget + 1e-6
    # Tokens that draw more PROCESSes than the budget allows are cut, so the mean lands under it.
    assert budget - 0.1 < float(compute.mean()) <= budget
    assert (actions[:, :depth.min_layers] == 0).all()


def test_untrained_learned_controller_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, b = untrained_learned_controller(0), untrained_learned_controller(0)
    after = torch.rand(1)
    assert torch.equal(before, after)
    for pa, pb in zip(a.net.parameters(), b.net.parameters()):
        assert torch.equal(pa, pb)
    assert not torch.equal(next(untrained_learned_controller(1).net.parameters()),
                           next(a.net.parameters()))


def test_skip_set_compute_and_actions():
    assert skip_set_compute([], 10, 0.1) == 1.0
    assert abs(skip_set_compute([3, 4], 10, 0.1) - 0.82) < 1e-9
    assert skip_set_actions([1, 3], 4) == [0, 1, 0, 1]
    with pytest.raises(ValueError, match="outside"):
        skip_set_actions([4], 4)


def test_greedy_search_sets_fit_their_budgets(tiny):
    llm, windows = tiny
    budgets = [1.0, 0.8, 0.55, 0.3]
    sets = best_static_sets(llm, windows[:2], budgets, width=None, progress=False)
    assert sets[1.0]["skip"] == [] and sets[1.0]["kl"] == 0.0
    for budget, chosen in sets.items():
        assert chosen["compute"] <= llm.depth.effective_budget(budget) + 1e-9
        assert all(layer >= llm.depth.min_layers for layer in chosen["skip"])
    assert len(sets[0.3]["skip"]) > len(sets[0.8]["skip"]) > 0
    # The path's first step is the single layer whose skipping costs the least KL.
    path = greedy_path(llm, windows[:2], 0.3, width=None, progress=False)
    full = full_logits(llm, windows[:2], progress=False)
    single = {}
    for layer in range(2, LAYERS):
        acts = [torch.tensor(skip_set_actions([layer], LAYERS), dtype=torch.int8).expand(len(w), -1)
                for w in windows[:2]]
        logits, _ = score_windows(llm, windows[:2], acts, progress=False)
        single[layer] = float(torch.cat([token_kl(f, q) for f, q in zip(full, logits)]).mean())
    assert path[1]["skip"] == [min(single, key=single.get)]
    assert abs(path[1]["kl"] - min(single.values())) < 1e-5
    assert [len(step["skip"]) for step in path] == list(range(len(path)))


def test_greedy_search_is_cached(tiny, monkeypatch):
    llm, windows = tiny
    first = best_static_sets(llm, windows[:1], [0.5], width=2, progress=False)

    def no_scoring(*args, **kwargs):
        raise AssertionError("the cached search scored again")
    monkeypatch.setattr(static_search, "full_logits", no_scoring)
    assert best_static_sets(llm, windows[:1], [0.5], width=2, progress=False) == first
    with pytest.raises(AssertionError, match="scored again"):
        best_static_sets(llm, windows[1:2], [0.5], width=2, progress=False)


def test_kmeans_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[5.0, 0.0], [-5.0, 0.0], [0.0, 6.0]])
    x = torch.cat([c + 0.3 * torch.randn(40, 2, generator=g) for c in centres])
    assign = nearest(x, kmeans(x, 3, seed=1))
    for block in assign.split(40):                   # each true cluster is one found class
        assert (block == block[0]).all()
    assert len(set(assign.tolist())) == 3
    with pytest.raises(ValueError, match="k must be"):
        kmeans(x[:2], 3)


def test_router_embeds_routes_and_sizes_its_sets(tiny):
    llm, windows = tiny
    emb = prompt_embeddings(llm, windows, prefix_len=16)
    assert emb.shape == (4, llm.spec.hidden_size)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.allclose(prompt_embeddings(llm, windows[1:2], 16), emb[1:2], atol=1e-5)
    router = CategoryRouter.build(llm, windows, k=2, windows_per_category=1, prefix_len=16,
                                  progress=False)
    categories = router.route(llm, windows)
    assert set(categories) <= {0, 1}
    for category in range(2):
        assert len(router.importance[category]) == LAYERS - 2
        loose, tight = router.skip_set(llm, category, 0.8), router.skip_set(llm, category, 0.4)
        assert set(loose) <= set(tight)
        assert skip_set_compute(tight, LAYERS, llm.depth.skip_cost) <= 0.4 + 1e-9
        least = min(range(LAYERS - 2), key=lambda i: router.importance[category][i])
        assert router.layers[least] in loose
        assert router.skip_set(llm, category, 1.0) == []


def test_evaluate_records(tiny, tmp_path):
    llm, windows = tiny
    static = {1.0: StaticController([0] * LAYERS),
              0.5: StaticController(skip_set_actions([2, 3, 4, 5], LAYERS))}
    per_window = lambda b: [static[b], StaticController([0] * LAYERS)] * 2     # noqa: E731
    controllers = {"budget": "budget", "static": lambda b: static[b], "mixed": per_window}
    records = evaluate(llm, controllers, [1.0, 0.5], windows, prefix_len=16, gen_tokens=8,
                       progress=False)
    assert [(r["controller"], r["budget"]) for r in records] == [
        ("full", 1.0), ("budget", 1.0), ("budget", 0.5), ("static", 1.0), ("static", 0.5),
        ("mixed", 1.0), ("mixed", 0.5)]
    by = {(r["controller"], r["budget"]): r for r in records}
    for key in [("budget", 1.0), ("static", 1.0)]:
        r = by[key]
        assert r["kl"] < 1e-5 and r["top1"] == 1.0 and r["greedy_agreement"] == 1.0
        assert r["compute"] == 1.0 and abs(r["ppl"] - by[("full", 1.0)]["ppl"]) < 1e-3
    assert all(r["within_budget"] for r in records)
    for name in ("budget", "static", "mixed"):
        assert by[(name, 0.5)]["compute_max"] <= 0.5 + 1e-6
        assert by[(name, 0.5)]["kl"] > 1e-4
    expected_static = skip_set_compute([2, 3, 4, 5], LAYERS, llm.depth.skip_cost)
    assert abs(by[("static", 0.5)]["compute"] - expected_static) < 1e-5
    # Half the windows run the skip set, half run every layer until the budget cuts them.
    halves = (expected_static + by[("budget", 0.5)]["compute"]) / 2
    assert abs(by[("mixed", 0.5)]["compute"] - halves) < 1e-5
    assert records[0]["tokens"] == by[("budget", 0.5)]["tokens"] == 4 * 40
    table = format_table(records)
    assert all(name in table for name in ("full", "budget", "static", "mixed"))
    png = plot_quality_vs_compute(records, tmp_path / "q.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no evaluation records"):
        plot_quality_vs_compute([], tmp_path / "empty.png")
    with pytest.raises(ValueError, match="longer than prefix_len"):
        evaluate(llm, controllers, [0.5], windows, prefix_len=40, progress=False)


@pytest.mark.slow
def test_cli_eval_smoke_on_smollm2(tmp_path, monkeypatch):
    from anee_fast.cli import main
    monkeypatch.undo()       # the embedded model's converted copy lives in the real cache
    out = tmp_path / "q.json"
    rc = main(["eval", "--budgets", "0.5", "--windows", "1", "--seq-len", "48", "--no-progress",
               "--controllers", "budget,random,anee-untrained", "--json", str(out),
               "--plot", str(tmp_path / "q.png")])
    assert rc == 0
    records = json.loads(out.read_text())
    assert [r["controller"] for r in records] == ["full", "budget", "random", "anee-untrained"]
    for r in records:
        assert {"controller", "budget", "compute", "kl", "top1", "ppl", "greedy_agreement",
                "within_budget"} <= set(r)
        assert r["within_budget"] is True and r["tokens"] == 48
    assert all(r["compute_max"] <= 0.5 + 1e-6 for r in records[1:])
    assert records[1]["kl"] > 0 and (tmp_path / "q.png").stat().st_size > 0
    # The embedded model runs its GGUF blocks: the same function as fp32, up to summation order.
    assert records[0]["weights"] == "gguf" and records[0]["kl_vs_fp32"] < 1e-4
    assert records[0]["top1_vs_fp32"] == 1.0


def test_weights_cost_reports_what_int8_trades(tiny):
    llm, windows = tiny
    int8 = LLM(build_model("llama_gqa", num_layers=LAYERS),
               backend="reference", weights="int8")
    cost = weights_cost(int8, llm, windows[:2], progress=False)
    assert 0 < cost["kl_vs_fp32"] < 0.05 and 0.5 < cost["top1_vs_fp32"] <= 1.0
    assert weights_cost(llm, llm, windows[:2], progress=False) == {"kl_vs_fp32": 0.0,
                                                                   "top1_vs_fp32": 1.0}


@pytest.mark.parametrize("argv, message", [
    (["--budgets", "0.5,2"], "--budgets must be numbers in [0, 1]"),
    (["--budgets", "half"], "--budgets must be comma-separated numbers"),
    (["--seq-len", "16"], "--seq-len must be over 32"),
    (["--windows", "0"], "--windows must be >= 1"),
    (["--text", "/nonexistent/file.txt"], "does not exist"),
    (["--controllers", " , "], "--controllers is empty"),
])
def test_cli_eval_rejects_bad_options_before_loading_a_model(argv, message, capsys):
    from anee_fast.cli import main
    assert main(["eval", *argv]) == 1
    assert message in capsys.readouterr().err
