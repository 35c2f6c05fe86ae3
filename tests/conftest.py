"""Shared fixtures: small random-init transformers models of every supported architecture.

Sizes are deliberately odd (hidden 48 = 6 heads x 8, 2 or 3 KV heads, intermediate 83, vocab 97
or 101) so that no shape bug hides behind a power of two. Every 1-D parameter (norm weights,
biases) is perturbed away from its init value (ones / zeros), so a dropped bias or norm weight
shows up in the logits.
"""
import os

# No model hub on the CI machine: never let transformers try the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

# The test models are tiny: intra-op threads only add overhead (and thrash when several test
# processes share the machine's 2 cores). ANEE_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("ANEE_TEST_THREADS", "1")))
# Without a GPU the Triton kernels run in Triton's interpreter, which must be chosen before
# triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

MAX_POSITIONS = 64

_SMALL = dict(hidden_size=48, num_attention_heads=6, intermediate_size=83,
              max_position_embeddings=MAX_POSITIONS, initializer_range=0.08,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _config(arch: str, num_layers: int):
    if arch == "gpt2":
        return GPT2Config(n_embd=48, n_head=6, n_layer=num_layers, n_inner=83, vocab_size=97,
                          n_positions=MAX_POSITIONS, initializer_range=0.08,
                          bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "llama_gqa":       # grouped-query attention, untied LM head
        return LlamaConfig(num_key_value_heads=2, vocab_size=101, num_hidden_layers=num_layers,
                           tie_word_embeddings=False, **_SMALL)
    if arch == "llama_tied":      # tied LM head, 3 KV heads
        return LlamaConfig(num_key_value_heads=3, vocab_size=97, num_hidden_layers=num_layers,
                           tie_word_embeddings=True, rope_theta=500.0, **_SMALL)
    if arch == "llama_variants":  # o/MLP biases, head_dim != hidden/heads, YaRN RoPE (scaled cos/sin)
        return LlamaConfig(num_key_value_heads=2, vocab_size=101, num_hidden_layers=num_layers,
                           tie_word_embeddings=False, attention_bias=True, mlp_bias=True, head_dim=16,
                           rope_scaling={"rope_type": "yarn", "factor": 2.0,
                                         "original_max_position_embeddings": 32}, **_SMALL)
    if arch == "qwen2":           # q/k/v biases
        return Qwen2Config(num_key_value_heads=2, vocab_size=101, num_hidden_layers=num_layers,
                           tie_word_embeddings=False, **_SMALL)
    if arch == "qwen2_window":    # sliding window on every layer but the first
        return Qwen2Config(num_key_value_heads=2, vocab_size=101, num_hidden_layers=num_layers,
                           use_sliding_window=True, sliding_window=4, max_window_layers=1, **_SMALL)
    if arch == "mistral_window":  # a sliding window much shorter than the test sequences
        return MistralConfig(num_key_value_heads=2, vocab_size=97, num_hidden_layers=num_layers,
                             sliding_window=5, tie_word_embeddings=False, **_SMALL)
    raise KeyError(arch)


_CLASSES = {"gpt2": GPT2LMHeadModel, "llama_gqa": LlamaForCausalLM, "llama_tied": LlamaForCausalLM,
            "llama_variants": LlamaForCausalLM,
            "qwen2": Qwen2ForCausalLM, "qwen2_window": Qwen2ForCausalLM,
            "mistral_window": MistralForCausalLM}

ARCHS = list(_CLASSES)
# The four families once each, for the slower tests.
CORE_ARCHS = ["gpt2", "llama_gqa", "qwen2", "mistral_window"]

_cache = {}


def build_model(arch: str, num_layers: int = 3, seed: int = 0):
    """A random-init eval-mode causal LM (cached: tests must not modify it)."""
    key = (arch, num_layers, seed)
    if key not in _cache:
        torch.manual_seed(seed)
        model = _CLASSES[arch](_config(arch, num_layers)).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 1:   # norm weights ~ 1, biases ~ 0: make both matter
                    base = 1.0 if name.endswith("weight") else 0.0
                    p.copy_(base + 0.2 * torch.randn_like(p))
        _cache[key] = model
    return _cache[key]


def vocab_of(model) -> int:
    return model.config.vocab_size


def num_layers_of(model) -> int:
    return model.config.num_hidden_layers


def random_ids(model, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_of(model), (length,), generator=g)


def random_actions(length: int, num_layers: int, seed: int, probs=(0.5, 0.35, 0.15)) -> torch.Tensor:
    """int8 [T, L] with codes 0/1/2 drawn with the given probabilities."""
    g = torch.Generator().manual_seed(seed)
    return torch.multinomial(torch.tensor(probs), length * num_layers, replacement=True,
                             generator=g).reshape(length, num_layers).to(torch.int8)


@torch.no_grad()
def hf_logits(model, ids) -> torch.Tensor:
    """transformers' own float32 logits [T, vocab] for one sequence."""
    return model(torch.as_tensor(ids)[None]).logits[0].float()


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture(params=CORE_ARCHS)
def core_arch(request):
    return request.param


def tiny_tokenizer():
    """A WordLevel tokenizer of a few words, with a chat template (the model's vocab is 101)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["hello world the sky is blue user assistant"],
                            trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")
    fast.chat_template = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                          "{% if add_generation_prompt %}assistant{% endif %}")
    return fast
