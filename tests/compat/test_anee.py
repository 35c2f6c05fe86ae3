"""The ANEE 0.4 drop-in: `ANEEConfig` / `ANEEWrapper` on the anee_fast engine, bugs fixed.

A random 12-layer GPT-2 (12 layers, so ANEE's default exit threshold 0.1 bites at the last one)
and a byte-level BPE tokenizer trained offline are saved to a tmp dir and loaded by path, as a
researcher would load "gpt2".
"""
import dataclasses
import gc
import math

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from anee_fast import EXIT, PROCESS, SKIP, ANEEConfig, ANEEWrapper
from anee_fast.compat.anee import ANEECache

NUM_LAYERS = 12
PROMPT = "The future of artificial intelligence is"
ANEE_FIELDS = ["model_name", "energy_budget", "min_layers", "exit_budget_threshold",
               "controller_type", "state_dim", "controller_hidden_dim", "controller_path"]
ANEE_DEFAULTS = dict(energy_budget=1.0, min_layers=2, exit_budget_threshold=0.1,
                     controller_type="heuristic", state_dim=6, controller_hidden_dim=32,
                     controller_path=None)


def make_tokenizer():
    text = ["The future of artificial intelligence is bright and uncertain.",
            "The quick brown fox jumps over the lazy dog.",
            "Energy budgets decide how many layers each token may run."] * 4
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """(model directory, tokenizer, the transformers model)."""
    tokenizer = make_tokenizer()
    torch.manual_seed(1)
    eos = tokenizer.eos_token_id
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=64, n_layer=NUM_LAYERS,
                        n_head=4, initializer_range=0.2, bos_token_id=eos, eos_token_id=eos,
                        pad_token_id=eos)
    model = GPT2LMHeadModel(config).eval()
    path = tmp_path_factory.mktemp("anee_gpt2")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path), tokenizer, model


@pytest.fixture(scope="module")
def wrapper(assets):
    """wrapper(**config fields) -> an ANEEWrapper on the test model (one per distinct config)."""
    made = {}

    def get(**kwargs):
        key = tuple(sorted(kwargs.items()))
        if key not in made:
            made[key] = ANEEWrapper(ANEEConfig(model_name=assets[0], **kwargs))
        return made[key]
    return get


def floor_of(w) -> float:
    """The least a token can spend: min_layers PROCESS, the rest SKIP."""
    m, L = w.config.min_layers, w.num_layers
    return (m + (L - m) * w.skip_cost) / L


# ---- config --------------------------------------------------------------------------------------

def test_config_fields_and_defaults():
    config = ANEEConfig(model_name="gpt2")
    names = [f.name for f in dataclasses.fields(ANEEConfig)]
    assert names[:len(ANEE_FIELDS)] == ANEE_FIELDS
    assert all(f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
               for f in dataclasses.fields(ANEEConfig)[1:])   # only model_name is required
    assert {k: getattr(config, k) for k in ANEE_DEFAULTS} == ANEE_DEFAULTS
    with pytest.raises(TypeError):
        ANEEConfig()


@pytest.mark.parametrize("field, value", [
    ("energy_budget", 1.5), ("energy_budget", -0.1), ("energy_budget", math.nan),
    ("energy_budget", math.inf), ("energy_budget", "0.5"), ("energy_budget", True),
    ("min_layers", -1), ("min_layers", 1.5),
    ("exit_budget_threshold", -0.1), ("exit_budget_threshold", 1.1),
    ("exit_budget_threshold", math.nan),
    ("controller_type", "rl"), ("controller_type", None),
    ("state_dim", 7), ("state_dim", 6.0), ("controller_hidden_dim", 0), ("controller_hidden_dim", 2.0),
    ("controller_path", 3), ("model_name", ""), ("model_name", None),
    ("block_size", 0), ("num_kv_blocks", 0),
])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        ANEEConfig(**{"model_name": "gpt2", field: value})


def test_config_warns_that_heuristic_ignores_controller_path():
    with pytest.warns(UserWarning, match="controller_path"):
        ANEEConfig(model_name="gpt2", controller_path="controller.pt")


def test_wrapper_revalidates_config_and_checks_min_layers(assets):
    config = ANEEConfig(model_name=assets[0])
    config.energy_budget = 2.0          # edited after construction
    with pytest.raises(ValueError, match="energy_budget"):
        ANEEWrapper(config)
    with pytest.raises(ValueError, match="min_layers"):
        ANEEWrapper(ANEEConfig(model_name=assets[0], min_layers=NUM_LAYERS + 1))
    with pytest.raises(TypeError):
        ANEEWrapper({"model_name": assets[0]})


# ---- generate ------------------------------------------------------------------------------------

def test_greedy_full_budget_matches_hf_generate(assets, wrapper):
    path, tokenizer, model = assets
    w = wrapper(exit_budget_threshold=0.0)
    text = w.generate(tokenizer, PROMPT, max_new_tokens=12, energy_budget=1.0, temperature=0)
    ids = tokenizer.encode(PROMPT)
    hf = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                        pad_token_id=tokenizer.eos_token_id)[0]
    assert w.last_output.token_ids == hf[len(ids):].tolist()
    assert len(set(w.last_output.token_ids)) > 2          # a continuation worth comparing
    assert text == tokenizer.decode(hf, skip_special_tokens=True)
    assert text.startswith(PROMPT)
    trace = w.last_trace
    assert trace.actions.shape == (len(ids) + 11, NUM_LAYERS)
    assert (trace.actions == PROCESS).all()
    torch.testing.assert_close(trace.compute, torch.ones(len(ids) + 11))
    assert w.last_stats["mean_compute"] == pytest.approx(1.0)


@pytest.mark.parametrize("threshold, exit_layer", [(0.1, 11), (0.2, 10)])
def test_exit_threshold_exits_near_last_layer(assets, wrapper, threshold, exit_layer):
    """ANEE's rule at budget 1.0: exit once the budget left, (L - l) / L, is below the threshold."""
    w = wrapper(exit_budget_threshold=threshold)
    w.generate(assets[1], PROMPT, max_new_tokens=6, temperature=0)
    actions = w.last_trace.actions
    assert (actions[:, :exit_layer] == PROCESS).all()
    assert (actions[:, exit_layer:] == EXIT).all()
    L, skipped = NUM_LAYERS, NUM_LAYERS - exit_layer
    expected = (exit_layer + skipped * w.skip_cost) / L
    torch.testing.assert_close(w.last_trace.compute, torch.full_like(w.last_trace.compute, expected))
    assert w.last_stats["layers_processed"].eq(exit_layer).all()


def test_config_budget_used_unless_overridden(assets, wrapper):
    tokenizer = assets[1]
    w = wrapper(energy_budget=0.4, exit_budget_threshold=0.0)
    w.generate(tokenizer, PROMPT, max_new_tokens=6, temperature=0)       # energy_budget=None
    trace = w.last_trace
    assert trace.budget == 0.4 and w.last_stats["budget"] == 0.4
    assert trace.compute.max() <= max(0.4, floor_of(w)) + 1e-6
    assert (trace.actions != PROCESS).any()
    w.generate(tokenizer, PROMPT, max_new_tokens=6, temperature=0, energy_budget=1.0)
    assert w.last_trace.budget == 1.0
    assert (w.last_trace.actions == PROCESS).all()
    with pytest.raises(ValueError, match="energy_budget"):
        w.generate(tokenizer, PROMPT, energy_budget=1.2)


def test_temperature_zero_is_greedy_and_sampling_follows_torch_seed(assets, wrapper):
    tokenizer = assets[1]
    w = wrapper()
    greedy = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        greedy.append(w.generate(tokenizer, PROMPT, max_new_tokens=8, temperature=0, top_k=50))
    assert greedy[0] == greedy[1]

    def sampled(seed):
        torch.manual_seed(seed)
        return w.generate(tokenizer, PROMPT, max_new_tokens=8, temperature=1.5, top_k=0)
    assert sampled(3) == sampled(3)                     # torch.manual_seed makes it repeatable
    assert len({sampled(s) for s in range(4)} | {greedy[0]}) > 2
    with pytest.raises(ValueError, match="temperature"):
        w.generate(tokenizer, PROMPT, temperature=-1.0)


def test_exit_keeps_cache_complete_for_later_steps(assets, wrapper):
    """ANEE crashed on the step after an EXIT; here decoding goes on, on a complete cache."""
    tokenizer = assets[1]
    w = wrapper(energy_budget=0.0)         # floor: the 2 min_layers, then EXIT
    w.generate(tokenizer, PROMPT, max_new_tokens=10, temperature=0)
    out, trace = w.last_output, w.last_trace
    assert len(out.token_ids) == 10
    assert (trace.actions[:, :2] == PROCESS).all() and (trace.actions[:, 2:] == EXIT).all()
    # Every generated token is the argmax of scoring the whole sequence with the same actions
    # in one prefill: each decode step saw the K/V of every earlier token at every layer.
    ids = out.prompt_token_ids + out.token_ids
    logits = w.llm.score(ids[:-1], actions=trace.actions)
    assert logits[len(out.prompt_token_ids) - 1:].argmax(-1).tolist() == out.token_ids
    # forward() the same way: prompt, then one token per step through past_key_values.
    step = w.forward(torch.tensor([out.prompt_token_ids]))
    tokens = []
    for _ in range(10):
        tokens.append(int(step["logits"][0, -1].argmax()))
        step = w.forward(torch.tensor([[tokens[-1]]]), past_key_values=step["past_key_values"])
        assert (step["stats"]["actions"][0, 0, 2:] == EXIT).all()
    step["past_key_values"].close()
    assert tokens == out.token_ids


# ---- forward -------------------------------------------------------------------------------------

def test_forward_matches_hf_logits(assets, wrapper):
    path, tokenizer, model = assets
    w = wrapper(exit_budget_threshold=0.0)
    ids = torch.randint(0, len(tokenizer), (2, 9), generator=torch.Generator().manual_seed(0))
    out = w(ids)                                          # __call__ is forward, as in ANEE
    with torch.no_grad():
        expected = model(ids).logits
    assert out["logits"].dtype == torch.float32 and out["logits"].shape == (2, 9, len(tokenizer))
    torch.testing.assert_close(out["logits"], expected, atol=1e-4, rtol=1e-4)
    stats = out["stats"]
    assert stats["actions"].shape == (2, 9, NUM_LAYERS) and stats["actions"].dtype == torch.int8
    assert stats["compute"].shape == (2, 9) and stats["mean_compute"] == pytest.approx(1.0)
    assert stats["layers_processed"].eq(NUM_LAYERS).all()
    assert stats["budget"] == 1.0 and 0 < stats["skip_cost"] < 1
    out["logits"][0, 0] /= 2                              # plain tensors, editable in place
    stats["compute"] *= 2
    out["past_key_values"].close()


def test_forward_accepts_a_loaded_transformers_model(assets):
    model = assets[2]
    w = ANEEWrapper(ANEEConfig(model_name=model, exit_budget_threshold=0.0))
    ids = [3, 14, 15, 92, 65]
    with w.forward(ids)["past_key_values"] as cache:     # a 1-D input is one row
        logits = w.forward([[35]], past_key_values=cache)["logits"]
    with torch.no_grad():
        expected = model(torch.tensor([ids + [35]])).logits[:, -1:]
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("controller_type, budget", [
    ("heuristic", None), ("heuristic", 0.45), ("learned", 0.45)])
def test_forward_in_pieces_equals_one_forward(assets, wrapper, controller_type, budget):
    w = wrapper(controller_type=controller_type)
    ids = torch.randint(0, len(assets[1]), (2, 14), generator=torch.Generator().manual_seed(1))
    whole = w.forward(ids, energy_budget=budget)
    whole["past_key_values"].close()
    cache, logits, actions, compute = None, [], [], []
    for a, b in ((0, 5), (5, 6), (6, 14)):
        out = w.forward(ids[:, a:b], energy_budget=budget, past_key_values=cache)
        assert cache is None or out["past_key_values"] is cache     # updated in place
        cache = out["past_key_values"]
        assert cache.get_seq_length() == b
        logits.append(out["logits"])
        actions.append(out["stats"]["actions"])
        compute.append(out["stats"]["compute"])
    cache.close()
    torch.testing.assert_close(torch.cat(logits, 1), whole["logits"], atol=1e-5, rtol=1e-5)
    assert torch.equal(torch.cat(actions, 1), whole["stats"]["actions"])
    torch.testing.assert_close(torch.cat(compute, 1), whole["stats"]["compute"])
    assert (whole["stats"]["actions"] != PROCESS).any()   # the controller and budget did act
    if budget is not None:
        assert whole["stats"]["compute"].max() <= budget + 1e-6


def test_cache_frees_blocks_and_rejects_misuse(assets, wrapper):
    w = wrapper()
    manager = w.llm.engine.block_manager
    free = manager.num_free
    out = w.forward(torch.zeros((3, 20), dtype=torch.long))
    cache = out["past_key_values"]
    assert isinstance(cache, ANEECache) and cache.batch_size == 3
    assert manager.num_free == free - 3 * 2               # 20 tokens = 2 blocks of 16, per row
    with pytest.raises(ValueError, match="rows"):
        w.forward(torch.zeros((2, 1), dtype=torch.long), past_key_values=cache)
    with pytest.raises(ValueError, match=r"\[0, "):
        w.forward(torch.full((3, 1), 10_000), past_key_values=cache)
    assert cache.get_seq_length() == 20                   # failed calls changed nothing
    with pytest.raises(ValueError, match="another"):
        wrapper(exit_budget_threshold=0.0).forward([[1]], past_key_values=cache)
    with pytest.raises(TypeError):
        w.forward([[1]], past_key_values=((torch.zeros(1), torch.zeros(1)),))
    cache.close()
    assert manager.num_free == free and cache.closed
    with pytest.raises(ValueError, match="closed"):
        w.forward(torch.zeros((3, 1), dtype=torch.long), past_key_values=cache)
    w.forward(torch.zeros((1, 40), dtype=torch.long))     # dropped at once: collected, freed
    gc.collect()
    assert manager.num_free == free
    with pytest.raises(ValueError, match="input_ids"):
        w.forward(torch.zeros((1, 0), dtype=torch.long))


# ---- controllers ---------------------------------------------------------------------------------

class ANEEController(torch.nn.Module):
    """The module ANEE 0.4 saves: `net` = Linear(6, 32) -> ReLU -> Linear(32, 3)."""

    def __init__(self, state_dim=6, hidden_dim=32):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(state_dim, hidden_dim), torch.nn.ReLU(),
                                       torch.nn.Linear(hidden_dim, 3))


def test_anee_controller_file_drives_the_engine(assets, tmp_path):
    controller = ANEEController()
    with torch.no_grad():                  # always prefer SKIP: logits (0, 5, 0) whatever the state
        controller.net[2].weight.zero_()
        controller.net[2].bias.copy_(torch.tensor([0.0, 5.0, 0.0]))
    state = controller.state_dict()
    assert sorted(state) == ["net.0.bias", "net.0.weight", "net.2.bias", "net.2.weight"]
    path = tmp_path / "controller.pt"
    torch.save(state, path)
    w = ANEEWrapper(ANEEConfig(model_name=assets[0], controller_type="learned",
                               controller_path=str(path), exit_budget_threshold=0.0))
    torch.testing.assert_close(w.controller.net[0].weight, state["net.0.weight"])
    w.generate(assets[1], PROMPT, max_new_tokens=4, temperature=0)
    actions = w.last_trace.actions
    assert (actions[:, :2] == PROCESS).all()            # min_layers
    assert (actions[:, 2:] == SKIP).all()


def test_missing_controller_file_raises(assets, tmp_path):
    config = ANEEConfig(model_name=assets[0], controller_type="learned",
                        controller_path=str(tmp_path / "nope.pt"))
    with pytest.raises(FileNotFoundError):
        ANEEWrapper(config)


def test_untrained_learned_controller_is_fixed_and_leaves_torch_rng_alone(assets):
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    a = ANEEWrapper(ANEEConfig(model_name=assets[0], controller_type="learned",
                               controller_hidden_dim=16))
    assert torch.equal(torch.rand(3), expected)
    b = ANEEWrapper(ANEEConfig(model_name=assets[0], controller_type="learned",
                               controller_hidden_dim=16))
    assert a.controller.net[0].weight.shape == (16, 6)
    for p, q in zip(a.controller.net.parameters(), b.controller.net.parameters()):
        assert torch.equal(p, q)
