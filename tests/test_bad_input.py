"""Bad input gets a clear error and changes nothing.

Every rejected call must raise a specific exception whose message says what was wrong, leave the
KV block pool and the scheduler exactly as they were, and leave the LLM working.
"""
import contextlib
import os

import numpy as np
import pytest
import torch
from torch import nn

from anee_fast import LLM, SamplingParams
from anee_fast.model.loader import ModelLoadError
from anee_fast.model.packing import UnsupportedModelError
from conftest import MAX_POSITIONS, build_model, hf_logits, random_ids

ARCH = "llama_gqa"
L = 3


@pytest.fixture(scope="module")
def llm():
    return LLM(build_model(ARCH, num_layers=L), block_size=8, num_kv_blocks=40)


@pytest.fixture(scope="module")
def good_ids():
    return random_ids(build_model(ARCH, num_layers=L), 9, seed=60)


def engine_state(llm):
    e = llm.engine
    return (e.block_manager.num_free, sorted(e.block_manager.free_blocks), dict(e.block_manager.tables),
            len(e.scheduler.waiting), len(e.scheduler.running))


@contextlib.contextmanager
def rejected(llm, exc, *fragments):
    """Expects `exc` with every fragment in its message (case-insensitive), and no state change."""
    before = engine_state(llm)
    with pytest.raises(exc) as info:
        yield info
    message = str(info.value).lower()
    for fragment in fragments:
        assert fragment.lower() in message, (fragment, str(info.value))
    assert engine_state(llm) == before
    assert not llm.engine.has_unfinished()


@pytest.fixture(autouse=True)
def still_works(llm, good_ids):
    """After each test the LLM still scores correctly and generates."""
    yield
    model = build_model(ARCH, num_layers=L)
    assert (llm.score(good_ids) - hf_logits(model, good_ids)).abs().max() <= 1e-4
    out = llm.generate(good_ids.tolist(), SamplingParams(max_tokens=2, ignore_eos=True))
    assert len(out[0].token_ids) == 2
    assert llm.engine.block_manager.num_used == 0


# ---- energy budget --------------------------------------------------------------------------------

BAD_BUDGETS = [float("nan"), float("inf"), -0.1, -1, 1.0001, 2, "0.5", None, True, [0.5]]


@pytest.mark.parametrize("budget", BAD_BUDGETS, ids=repr)
def test_bad_budget_score(llm, good_ids, budget):
    with rejected(llm, ValueError, "energy_budget", "[0, 1]"):
        llm.score(good_ids, energy_budget=budget)


# generate() reads a list as one budget per prompt: [0.5] for one prompt is valid there.
@pytest.mark.parametrize("budget", BAD_BUDGETS[:-1], ids=repr)
def test_bad_budget_generate(llm, good_ids, budget):
    with rejected(llm, ValueError, "energy_budget"):
        llm.generate(good_ids.tolist(), SamplingParams(max_tokens=3), energy_budget=budget)


def test_one_bad_budget_in_a_list_queues_nothing(llm, good_ids):
    prompts = [good_ids.tolist(), good_ids[:3].tolist(), good_ids[:5].tolist()]
    with rejected(llm, ValueError, "energy_budget", "nan"):
        llm.generate(prompts, SamplingParams(max_tokens=3), energy_budget=[0.5, float("nan"), 1.0])
    with rejected(llm, ValueError, "3 prompts", "2 values of energy_budget"):
        llm.generate(prompts, SamplingParams(max_tokens=3), energy_budget=[0.5, 1.0])


# ---- prompts ---------------------------------------------------------------------------------------

def test_empty_prompt(llm):
    with rejected(llm, ValueError, "empty"):
        llm.score([])
    with rejected(llm, ValueError, "empty"):
        llm.score(torch.zeros(0, dtype=torch.long))
    with rejected(llm, ValueError, "empty"):
        llm.generate([[]], SamplingParams(max_tokens=3))
    with rejected(llm, ValueError, "no prompts"):
        llm.generate([], SamplingParams(max_tokens=3))


def test_text_prompt_without_tokenizer(llm):
    with rejected(llm, ValueError, "tokenizer"):
        llm.generate("hello there", SamplingParams(max_tokens=3))


def test_prompt_longer_than_positions(llm):
    too_long = [1] * (MAX_POSITIONS + 1)
    with rejected(llm, ValueError, f"{MAX_POSITIONS + 1} tokens", f"{MAX_POSITIONS} positions"):
        llm.score(too_long)
    with rejected(llm, ValueError, f"{MAX_POSITIONS} positions"):
        llm.generate(too_long, SamplingParams(max_tokens=1))
    # Exactly the model's positions is fine.
    assert llm.score([1] * MAX_POSITIONS).shape == (MAX_POSITIONS, 101)


@pytest.mark.parametrize("bad", [[5, 101], [5, -1], [10 ** 6]], ids=repr)
def test_out_of_vocab_ids(llm, bad):
    with rejected(llm, ValueError, "token ids", "[0, 101)"):
        llm.score(bad)
    with rejected(llm, ValueError, "[0, 101)"):
        llm.generate(bad, SamplingParams(max_tokens=2))


def test_two_dimensional_token_tensor(llm, good_ids):
    with rejected(llm, ValueError, "1-d"):
        llm.score(good_ids[None])
    with rejected(llm, ValueError, "prompts must be 1-d", "[1, 9]"):    # a batch is a list
        llm.generate(good_ids[None], SamplingParams(max_tokens=2))


@pytest.mark.parametrize("bad, shown", [([1.7, 2.2], "1.7 (float)"), ([3, True], "true (bool)"),
                                        ([3, "4"], "'4' (str)"), ([3, None], "none"),
                                        (torch.tensor([1.0, 2.0]), "1.0 (float)"),
                                        (np.array([1.5, 2.0]), "1.5 (float)"),
                                        (torch.tensor([True, False]), "true (bool)")], ids=repr)
def test_token_ids_that_are_not_integers(llm, bad, shown):
    """int() used to truncate 1.7 to 1 and read True as 1 and "3" as 3: now each is refused."""
    with rejected(llm, ValueError, "token_ids must hold integer token ids", shown):
        llm.score(bad)
    with rejected(llm, ValueError, "token_ids[1] must hold integer token ids", shown):
        llm.score([[1, 2], bad])
    with rejected(llm, ValueError, "prompts must hold integer token ids", shown):
        llm.generate(bad, SamplingParams(max_tokens=2))
    with rejected(llm, ValueError, "prompts[1] must hold integer token ids", shown):
        llm.generate([[1, 2], bad], SamplingParams(max_tokens=2))


def test_text_given_to_score(llm):
    with rejected(llm, ValueError, "token_ids must be token ids, not text", "'hello'", "tokenizer"):
        llm.score("hello")
    with rejected(llm, ValueError, "token_ids[0] must be token ids, not text"):
        llm.score(["hello", "there"])


@pytest.mark.parametrize("as_given", [
    lambda ids: [np.int64(t) for t in ids], lambda ids: np.array(ids, dtype=np.int32),
    lambda ids: [torch.tensor(t) for t in ids], lambda ids: torch.tensor(ids),
    lambda ids: tuple(ids)], ids=["numpy ints", "numpy array", "torch scalars", "tensor", "tuple"])
def test_numpy_and_torch_integers_are_token_ids(llm, good_ids, as_given):
    """Integers of any kind work in score and generate, alone and in a batch, as the same ids."""
    ids = good_ids.tolist()
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    expected_logits, expected_tokens = llm.score(ids), llm.generate(ids, params)[0].token_ids
    assert torch.equal(llm.score(as_given(ids)), expected_logits)
    assert torch.allclose(llm.score([as_given(ids), ids])[0], expected_logits, atol=1e-5)
    alone = llm.generate(as_given(ids), params)
    assert len(alone) == 1 and alone[0].prompt_token_ids == ids
    assert alone[0].token_ids == expected_tokens
    batch = llm.generate([as_given(ids), ids[:4]], params)
    assert batch[0].prompt_token_ids == ids and batch[0].token_ids == expected_tokens


def test_request_larger_than_the_kv_cache():
    small = LLM(build_model(ARCH, num_layers=L), block_size=4, num_kv_blocks=3)   # 12 slots
    with rejected(small, ValueError, "kv cache", "num_kv_blocks"):
        small.generate([1] * 10, SamplingParams(max_tokens=5))
    with rejected(small, ValueError, "kv cache", "num_kv_blocks"):
        small.score([1] * 13)


def test_scoring_more_than_the_kv_cache_holds_at_once():
    """Two 8-token sequences need 4 blocks of a 3-block cache: the scheduler runs them one after
    the other, each scored as alone, and every block comes back."""
    model = build_model(ARCH, num_layers=L)
    small = LLM(model, block_size=4, num_kv_blocks=3)
    steps = []
    run = small.engine.runner.run
    small.engine.runner.run = lambda chunks, *a, **k: steps.append(len(chunks)) or run(chunks, *a, **k)
    a, b = random_ids(model, 8, seed=1), random_ids(model, 8, seed=2)
    together = small.score([a, b])
    assert steps == [1, 1]
    roomy = LLM(model)
    for got, ids in zip(together, (a, b)):
        assert torch.allclose(got, roomy.score(ids), atol=1e-5)
    assert small.engine.block_manager.num_used == 0


# ---- sampling parameters --------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,fragment", [
    (dict(max_tokens=-1), "max_tokens"), (dict(max_tokens=2.5), "max_tokens"),
    (dict(temperature=-0.5), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=-3), "top_k"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(max_tokens=True), "max_tokens"), (dict(temperature=True), "temperature"),
    (dict(top_k=True), "top_k"), (dict(top_p="0.5"), "top_p"),
], ids=str)
def test_bad_sampling_params(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        SamplingParams(**kwargs)


# ---- models ----------------------------------------------------------------------------------------

def test_unsupported_architectures():
    from transformers import BertConfig, BertForMaskedLM, OPTConfig, OPTForCausalLM
    torch.manual_seed(0)
    bert = BertForMaskedLM(BertConfig(hidden_size=48, num_attention_heads=6, num_hidden_layers=2,
                                      intermediate_size=83, vocab_size=97)).eval()
    opt = OPTForCausalLM(OPTConfig(hidden_size=48, num_attention_heads=6, num_hidden_layers=2,
                                   ffn_dim=83, vocab_size=97, word_embed_proj_dim=48)).eval()
    for model, name in ((bert, "bert"), (opt, "opt")):
        with pytest.raises(UnsupportedModelError) as info:
            LLM(model)
        message = str(info.value)
        assert repr(name) in message
        for supported in ("gpt2", "llama", "qwen2", "mistral"):
            assert supported in message
        assert isinstance(info.value, ValueError)


def test_not_a_model():
    with pytest.raises(ModelLoadError, match="no .config"):
        LLM(nn.Linear(3, 3))
    with pytest.raises(ModelLoadError, match="hub id, a directory"):
        LLM(12345)


def test_missing_or_corrupt_weights(tmp_path):
    with pytest.raises(ModelLoadError) as info:
        LLM(str(tmp_path / "no_such_model_dir"))
    assert "no_such_model_dir" in str(info.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="could not load"):
        LLM(str(empty))
    corrupt = tmp_path / "corrupt"
    build_model(ARCH, num_layers=L).config.save_pretrained(corrupt)
    (corrupt / "model.safetensors").write_bytes(os.urandom(4096))
    with pytest.raises(ModelLoadError) as info:
        LLM(str(corrupt))
    assert str(corrupt) in str(info.value)
    bad_config = tmp_path / "bad_config"
    bad_config.mkdir()
    (bad_config / "config.json").write_text("{ not json")
    with pytest.raises(ModelLoadError):
        LLM(str(bad_config))
    with pytest.raises(ModelLoadError, match="missing.gguf does not exist"):
        LLM(str(tmp_path / "missing.gguf"))
    plain_file = tmp_path / "weights.bin"
    plain_file.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="is a file"):
        LLM(str(plain_file))


def test_good_weights_directory_loads(tmp_path):
    """The counterpart of the corrupt directory: a saved model loads and matches transformers."""
    model = build_model(ARCH, num_layers=L)
    model.save_pretrained(tmp_path / "good")
    loaded = LLM(str(tmp_path / "good"))
    ids = random_ids(model, 7, seed=61)
    assert (loaded.score(ids) - hf_logits(model, ids)).abs().max() <= 1e-4


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_threads_setting(restore_threads, monkeypatch):
    """threads= sets torch's CPU threads; None takes $ANEE_FAST_THREADS, else changes nothing."""
    model = build_model(ARCH, num_layers=L)
    monkeypatch.delenv("ANEE_FAST_THREADS", raising=False)
    torch.set_num_threads(3)
    LLM(model, threads=1)
    assert torch.get_num_threads() == 1
    LLM(model, threads=2)
    assert torch.get_num_threads() == 2
    LLM(model)
    assert torch.get_num_threads() == 2
    monkeypatch.setenv("ANEE_FAST_THREADS", "1")
    LLM(model)
    assert torch.get_num_threads() == 1
    LLM(model, threads=2)                          # an explicit setting wins over the variable
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("threads", [0, -1, 1.5, True, "2"], ids=repr)
def test_bad_threads(restore_threads, threads):
    with pytest.raises(ValueError, match=r"threads must be None or an integer >= 1"):
        LLM(build_model(ARCH, num_layers=L), threads=threads)
    assert torch.get_num_threads() == 1            # conftest's setting, unchanged


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_bad_threads_variable(restore_threads, monkeypatch, value):
    monkeypatch.setenv("ANEE_FAST_THREADS", value)
    with pytest.raises(ValueError, match=r"\$ANEE_FAST_THREADS must be an integer >= 1"):
        LLM(build_model(ARCH, num_layers=L))
    assert torch.get_num_threads() == 1


def test_bad_engine_settings():
    model = build_model(ARCH, num_layers=L)
    with pytest.raises(ValueError, match="backend"):
        LLM(model, backend="warp-drive")
    with pytest.raises(ValueError, match="block_size"):
        LLM(model, block_size=0)
    with pytest.raises(ValueError, match="num_kv_blocks"):
        LLM(model, num_kv_blocks=0)
    with pytest.raises(ValueError, match="max_num_seqs"):
        LLM(model, max_num_seqs=0)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        LLM(model, max_num_batched_tokens=1.5)
    with pytest.raises(ValueError, match="min_layers"):
        LLM(model, min_layers=-1)
    with pytest.raises(ValueError, match="min_layers"):
        LLM(model, min_layers=L + 1)


# ---- controllers -----------------------------------------------------------------------------------

class _ANEEController(nn.Module):
    def __init__(self, state_dim=6, hidden=32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(state_dim, hidden), nn.ReLU(), nn.Linear(hidden, 3))


def test_missing_controller_file(llm, good_ids, tmp_path):
    missing = tmp_path / "nope" / "controller.pt"
    with rejected(llm, FileNotFoundError, "controller file not found", str(missing)):
        llm.score(good_ids, controller=str(missing))
    with rejected(llm, FileNotFoundError, "controller file not found"):
        llm.generate(good_ids.tolist(), SamplingParams(max_tokens=2), controller="missing_ctrl.pt")


def test_unknown_controller_names(llm, good_ids):
    with rejected(llm, ValueError, "unknown controller", "budget", "heuristic"):
        llm.score(good_ids, controller="fancy")
    with rejected(llm, ValueError, "trained for", f"{L} layers"):   # the shipped one: SmolLM2
        llm.score(good_ids, controller="learned")
    with rejected(llm, ValueError, "0/1/2"):
        llm.score(good_ids, controller=[0, 5, 1])
    with rejected(llm, ValueError, "unknown controller"):
        llm.score(good_ids, controller=3.5)


def test_static_controller_of_wrong_length(llm, good_ids):
    with rejected(llm, ValueError, "2 actions", f"{L}-layer"):
        llm.score(good_ids, controller=[0, 1], energy_budget=0.5)
    with rejected(llm, ValueError, f"{L}-layer"):
        llm.generate([good_ids.tolist()] * 2, SamplingParams(max_tokens=3), energy_budget=0.5,
                     controller=[0, 1])


def test_corrupt_controller_files(llm, good_ids, tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(1000))
    with rejected(llm, ValueError, "cannot read controller file", str(garbage)):
        llm.score(good_ids, controller=str(garbage))

    wrong_keys = tmp_path / "wrong_keys.pt"
    torch.save(nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 3)).state_dict(), wrong_keys)
    with rejected(llm, ValueError, "not an anee controller", "net.0.weight", "0.weight"):
        llm.score(good_ids, controller=str(wrong_keys))

    wrong_shapes = tmp_path / "wrong_shapes.pt"
    torch.save(_ANEEController(state_dim=7).state_dict(), wrong_shapes)
    with rejected(llm, ValueError, "shapes", "[32, 7]"):
        llm.score(good_ids, controller=str(wrong_shapes))

    four_actions = tmp_path / "four_actions.pt"
    module = _ANEEController()
    module.net[2] = nn.Linear(32, 4)
    torch.save(module.state_dict(), four_actions)
    with rejected(llm, ValueError, "shapes", "[4, 32]"):
        llm.generate(good_ids.tolist(), SamplingParams(max_tokens=2), controller=str(four_actions))

    not_a_dict = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), not_a_dict)
    with rejected(llm, ValueError, "not an anee controller"):
        llm.score(good_ids, controller=str(not_a_dict))

    # The well-formed counterpart loads.
    good = tmp_path / "good.pt"
    torch.save(_ANEEController().state_dict(), good)
    assert llm.score(good_ids, controller=str(good)).shape == (9, 101)


# ---- actions and chunking --------------------------------------------------------------------------

def test_bad_action_matrices(llm, good_ids):
    T = len(good_ids)
    ok = torch.zeros(T, L, dtype=torch.int8)
    with rejected(llm, ValueError, "shape", f"[{T}, {L}]", f"[{T}, {L + 1}]"):
        llm.score(good_ids, actions=torch.zeros(T, L + 1, dtype=torch.int8))
    with rejected(llm, ValueError, "shape"):
        llm.score(good_ids, actions=torch.zeros(T - 1, L, dtype=torch.int8))
    with rejected(llm, ValueError, "shape"):
        llm.score(good_ids, actions=torch.zeros(T * L, dtype=torch.int8))
    with rejected(llm, ValueError, "integer", "float32"):
        llm.score(good_ids, actions=ok.float())
    with rejected(llm, ValueError, "integer", "bool"):
        llm.score(good_ids, actions=ok.bool())
    for code in (3, -1):
        bad = ok.clone()
        bad[2, 1] = code
        with rejected(llm, ValueError, "unknown action codes", f"[{code}]"):
            llm.score(good_ids, actions=bad)
    # Ragged batch: one bad matrix among good ones, or the wrong number of matrices.
    seqs = [good_ids, good_ids[:4]]
    with rejected(llm, ValueError, "unknown action codes"):
        llm.score(seqs, actions=[ok, torch.full((4, L), 7, dtype=torch.int8)])
    with rejected(llm, ValueError, "2 sequences but 1 action matrices"):
        llm.score(seqs, actions=[ok])


@pytest.mark.parametrize("chunk_size", [0, -2, 1.5, True, "4"], ids=repr)
def test_bad_chunk_size(llm, good_ids, chunk_size):
    with rejected(llm, ValueError, "chunk_size"):
        llm.score(good_ids, chunk_size=chunk_size)


# ---- one bad request among several -----------------------------------------------------------------

@pytest.mark.parametrize("bad_prompt", [[], [1] * (MAX_POSITIONS + 1), [3, 101, 4]], ids=["empty", "long", "vocab"])
def test_one_bad_prompt_queues_none(llm, good_ids, bad_prompt):
    prompts = [good_ids.tolist(), good_ids[:4].tolist(), bad_prompt, good_ids[:2].tolist()]
    with rejected(llm, ValueError):
        llm.generate(prompts, SamplingParams(max_tokens=3))


def test_one_bad_controller_queues_none(llm, good_ids, tmp_path):
    prompts = [good_ids.tolist(), good_ids[:4].tolist()]
    with rejected(llm, FileNotFoundError):
        llm.generate(prompts, SamplingParams(max_tokens=3), controller=["budget", str(tmp_path / "x.pt")])
    with rejected(llm, ValueError, "sampling_params"):
        llm.generate(prompts, [SamplingParams(max_tokens=3)])


def test_one_bad_sequence_in_a_score_batch(llm, good_ids):
    with rejected(llm, ValueError, "[0, 101)"):
        llm.score([good_ids, torch.tensor([1, 2, 500])])
    with rejected(llm, ValueError, "empty"):
        llm.score([good_ids, []])
