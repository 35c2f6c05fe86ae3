"""Skip adapters: their file, their cost in the budget, and the engine's SKIP path with them on
every variant of the layer loop."""
import json

import pytest
import torch

from anee_fast import LLM, SamplingParams
from anee_fast.model.adapters import SkipAdapter, check_adapters, load_adapters, save_adapters
from anee_fast.ops.backends import backends
from conftest import build_model, random_actions, random_ids

CPU_BACKENDS = ["reference"] + (["native"] if backends("cpu")["native"] is True else [])


def random_adapters(num_layers, hidden, rank, seed, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    return [SkipAdapter(scale * torch.randn(rank, hidden, generator=g) / hidden ** 0.5,
                        scale * torch.randn(hidden, rank, generator=g) / rank ** 0.5,
                        scale * torch.randn(hidden, generator=g)) for _ in range(num_layers)]


def zero_adapters(num_layers, hidden, rank):
    return [SkipAdapter(torch.zeros(rank, hidden), torch.zeros(hidden, rank), torch.zeros(hidden))
            for _ in range(num_layers)]


def test_the_file_round_trips_and_bad_files_say_why(tmp_path):
    adapters = random_adapters(3, 16, 4, seed=0)
    path = save_adapters(adapters, tmp_path / "a", "tiny", {"fitted": "test"})
    assert path == tmp_path / "a" / "adapters.json"
    loaded, config = load_adapters(tmp_path / "a", 3, 16)
    assert config["rank"] == 4 and config["fitted"] == "test"
    for a, b in zip(adapters, loaded):
        assert all(torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors()))
    with pytest.raises(ValueError, match="fitted for 'tiny' \\(3 layers, hidden size 16\\)"):
        load_adapters(path, 4, 16)
    with pytest.raises(FileNotFoundError, match="skip adapters not found"):
        load_adapters(tmp_path / "missing", 3, 16)
    config = json.loads(path.read_text())
    path.write_text(json.dumps(dict(config, rank=5)))
    with pytest.raises(ValueError, match="tensors do not match"):
        load_adapters(path, 3, 16)
    path.write_text(json.dumps(dict(config, format="something else")))
    with pytest.raises(ValueError, match="is not a skip adapters config"):
        load_adapters(path, 3, 16)


def test_adapters_stored_as_q8_0_blocks_load_as_those_blocks_and_requantize_to_them(tmp_path):
    """q8_0 storage: the file holds the blocks a GGUF model runs its adapters in (store_adapters
    quantizes them again, to the same bytes) in about half float16's bytes."""
    from anee_fast.ops.weight_formats import dequantize, quantize
    adapters = random_adapters(3, 64, 32, seed=2)
    half = save_adapters(adapters, tmp_path / "f16", "tiny", dtype=torch.float16)
    path = save_adapters(adapters, tmp_path / "q8", "tiny", matrices="q8_0")
    assert json.loads(path.read_text())["matrices"] == "q8_0"
    size = lambda p: p.with_suffix(".safetensors").stat().st_size
    assert size(path) < 0.6 * size(half)
    loaded, _ = load_adapters(path, 3, 64)
    for a, b in zip(adapters, loaded):
        for x, y in ((a.down, b.down), (a.up, b.up)):
            assert torch.equal(y, dequantize(quantize(x, "q8_0")))
            assert torch.equal(quantize(y, "q8_0").data, quantize(x, "q8_0").data)
        assert torch.equal(b.bias, a.bias)
    with pytest.raises(ValueError, match="matrices must be one of"):
        save_adapters(adapters, tmp_path / "bad", "tiny", matrices="q5_k")
    with pytest.raises(ValueError, match="divisible by 32"):
        save_adapters(random_adapters(3, 16, 4, seed=0), tmp_path / "odd", "tiny", matrices="q8_0")
    config = json.loads(path.read_text())
    path.write_text(json.dumps(dict(config, matrices="q4_1")))
    with pytest.raises(ValueError, match="tensors do not match"):
        load_adapters(path, 3, 64)


def test_every_layer_needs_an_adapter_of_one_rank():
    adapters = random_adapters(3, 16, 4, seed=0)
    with pytest.raises(ValueError, match="one skip adapter per layer"):
        check_adapters(adapters[:2], 3, 16)
    adapters[1] = random_adapters(1, 16, 5, seed=1)[0]
    with pytest.raises(ValueError, match="skip adapter 1"):
        check_adapters(adapters, 3, 16)


def test_a_skip_costs_its_adapter_bytes_too():
    model = build_model("llama_gqa", num_layers=4)
    llm = LLM(model, backend="reference")
    plain = llm.depth.skip_cost
    layer = llm.weights.layers[0]
    total = sum(t.numel() for t in layer.tensors())
    llm.set_adapters(zero_adapters(4, model.config.hidden_size, 6))
    extra = (2 * 6 + 1) * model.config.hidden_size / total
    assert llm.depth.skip_cost == pytest.approx(plain + extra)
    assert llm.engine.runner.depth is llm.depth
    llm.set_adapters(None)
    assert llm.depth.skip_cost == plain


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_adapters_that_add_nothing_change_no_bit(backend):
    model = build_model("llama_gqa", num_layers=4)
    plain = LLM(model, backend=backend, block_size=8)
    zero = LLM(model, backend=backend, block_size=8)
    zero.set_adapters(zero_adapters(4, model.config.hidden_size, 3))
    seqs = [random_ids(model, n, seed=n) for n in (5, 17)]
    acts = [random_actions(len(s), 4, seed=len(s)) for s in seqs]
    for a, b in zip(plain.score(seqs, acts), zero.score(seqs, acts)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("arch", ["gpt2", "llama_gqa", "mistral_window"])
def test_masked_guarded_and_compacted_agree_with_adapters(backend, arch):
    model = build_model(arch, num_layers=4)
    adapters = random_adapters(4, model.config.hidden_size, 5, seed=2)
    llms = [LLM(model, block_size=8, backend=backend) for _ in range(3)]
    for llm in llms:
        llm.set_adapters(adapters)
    compacted, masked, guarded = llms
    compacted.engine.runner.compact = True
    masked.engine.runner.compact = False
    guarded.engine.runner.compact = False
    seqs = [random_ids(model, n, seed=n) for n in (1, 9, 23)]
    acts = [random_actions(len(s), 4, seed=len(s)) for s in seqs]
    expected = compacted.score(seqs, acts)
    plain = LLM(model, block_size=8, backend=backend).score(seqs, acts)
    assert any((a - b).abs().max() > 1e-3 for a, b in zip(expected, plain))   # adapters matter
    for a, b in zip(expected, masked.score(seqs, acts, chunk_size=1)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # a layer guard that runs every body: the in-place variant of the masked loop
    from anee_fast.engine.cuda_graphs import DecodeGraphs
    runner = guarded.engine.runner
    runner.graphs = DecodeGraphs(runner, max_rows=8, width=8, capture=False,
                                 layer_guard=lambda pred, body: body())
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    prompts = [s.tolist() for s in seqs]
    for controller, budget in (("heuristic", 0.7), ("budget", 0.4)):
        outs = [llm.generate(prompts, params, energy_budget=budget, controller=controller)
                for llm in llms]
        for other in outs[1:]:
            assert [o.token_ids for o in other] == [o.token_ids for o in outs[0]]


def test_adapters_change_only_between_requests():
    model = build_model("llama_gqa", num_layers=4)
    llm = LLM(model, backend="reference")
    llm.engine.add_request([1, 2, 3], SamplingParams(max_tokens=2))
    with pytest.raises(RuntimeError, match="only between requests"):
        llm.set_adapters(None)


def test_auto_means_none_for_a_model_other_than_the_embedded_one(tmp_path):
    model = build_model("llama_gqa", num_layers=4)
    assert LLM(model, backend="reference").weights.adapters is None
    with pytest.raises(ValueError, match="adapters must be None, 'auto' or a path"):
        LLM(model, backend="reference", adapters=3)
    path = save_adapters(random_adapters(4, model.config.hidden_size, 2, seed=0), tmp_path / "a", "t")
    llm = LLM(model, backend="reference", adapters=path)
    assert llm.adapters_path == path and llm.weights.adapters[0].down.shape == (2, model.config.hidden_size)


def test_the_shipped_adapters_fit_the_embedded_model_and_its_controller_names_them():
    from anee_fast.control.trained import BudgetConditionedController, shipped_controller_path
    from anee_fast.model.adapters import shipped_adapters_path
    adapters, config = load_adapters(shipped_adapters_path(), 30, 576)
    assert config["model"] == "SmolLM2-135M-Instruct" and config["rank"] == adapters[0].down.shape[0]
    controller = BudgetConditionedController.load(shipped_controller_path())
    named = (shipped_controller_path().parent / controller.config["adapters"]).resolve()
    assert named == shipped_adapters_path().resolve()


def test_a_float16_file_loads_in_the_models_dtype(tmp_path):
    adapters = random_adapters(2, 16, 4, seed=3)
    path = save_adapters(adapters, tmp_path / "half.json", "tiny", dtype=torch.float16)
    loaded, _ = load_adapters(path, 2, 16, dtype=torch.float32)
    for a, b in zip(adapters, loaded):
        assert all(y.dtype == torch.float32 and torch.equal(x.half().float(), y)
                   for x, y in zip(a.tensors(), b.tensors()))
