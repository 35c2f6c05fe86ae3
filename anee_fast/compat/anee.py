"""A drop-in for the ANEE 0.4 library (import name `ANEE`): `ANEEConfig` and `ANEEWrapper`.

Same names, fields and call signatures as ANEE 0.4, running on the anee_fast engine and current
transformers, with ANEE's bugs fixed:

- `generate(..., energy_budget=None)` uses the config's budget (ANEE ignored it);
- `temperature=0` is greedy decoding (ANEE had no greedy mode);
- EXIT keeps the KV cache complete, so decoding goes on after a token exits (ANEE crashed);
- SKIP writes the K/V of norm(h), as the layer itself would (ANEE dropped the norm);
- compute is measured from the loaded model's weights, not a hard-coded GPT-2 FLOP count.

`exit_budget_threshold` keeps ANEE's meaning: a token exits once the budget it has left (as a
fraction of a full forward) falls below the threshold, so at budget 1.0 the default 0.1 makes a
token of a 12-layer model exit at its last layer at the latest; 0 turns the rule off. Unlike
ANEE's, the heuristic controller does skip layers (see HeuristicController).

    config = ANEEConfig(model_name="gpt2", energy_budget=0.5)
    model = ANEEWrapper(config)
    text = model.generate(tokenizer, "The future of AI is", max_new_tokens=20)
    model.last_trace.summary()

    out = model.forward(ids)                                   # logits [B, T, vocab]
    out = model.forward(next_ids, past_key_values=out["past_key_values"])
    out["past_key_values"].close()                             # gives its KV blocks back
"""
import math
import os
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..actions import PROCESS
from ..control.anee_mlp import ANEEMLPController
from ..control.controllers import HeuristicController
from ..control.features import STATE_DIM
from ..control.registry import TRAINED_SUFFIXES
from ..control.trained import BudgetConditionedController
from ..engine.llm_engine import check_budget
from ..engine.sampling import SamplingParams
from ..llm import LLM

CONTROLLER_TYPES = ("heuristic", "learned")


def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


@dataclass
class ANEEConfig:
    model_name: Any                    # hub id, local directory, .gguf file, or a transformers model
    energy_budget: float = 1.0         # fraction of a full forward each token may spend, in [0, 1]
    min_layers: int = 2                # first layers every token runs
    exit_budget_threshold: float = 0.1 # exit once the budget left falls below this
    controller_type: str = "heuristic" # "heuristic" or "learned"
    state_dim: int = STATE_DIM         # the learned controller's input: ANEE 0.4's six features
    controller_hidden_dim: int = 32    # hidden width of an untrained learned controller
    controller_path: Optional[str] = None  # ANEE 0.4 weights (.pt) or a trained anee_fast controller
                                           # (directory, .json or .safetensors)
    # anee_fast additions (not in ANEE 0.4)
    device: Any = None                 # None: CUDA if available, else CPU
    dtype: Any = None                  # None: bfloat16 on CUDA, float32 on CPU
    block_size: int = 16               # tokens per KV-cache block
    num_kv_blocks: Optional[int] = None  # None: room for 8192 tokens

    def __post_init__(self):
        self.validate()
        if self.controller_path is not None and self.controller_type != "learned":
            warnings.warn("controller_path is only used with controller_type='learned'; the "
                          "heuristic controller ignores it", stacklevel=3)

    def validate(self) -> None:
        """Raises ValueError on any invalid field (run again by ANEEWrapper)."""
        if not isinstance(self.model_name, (str, os.PathLike, torch.nn.Module)) or \
                (isinstance(self.model_name, str) and not self.model_name):
            raise ValueError("model_name must be a hub id, a model directory, a .gguf file or a "
                             f"loaded transformers model, got {self.model_name!r}")
        check_budget(self.energy_budget)
        _check_int("min_layers", self.min_layers, 0)
        threshold = self.exit_budget_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or \
                not math.isfinite(threshold) or not 0.0 <= threshold <= 1.0:
            raise ValueError(f"exit_budget_threshold must be a number in [0, 1], got {threshold!r}")
        if self.controller_type not in CONTROLLER_TYPES:
            raise ValueError(f"controller_type must be one of {', '.join(CONTROLLER_TYPES)}, "
                             f"got {self.controller_type!r}")
        if isinstance(self.state_dim, bool) or not isinstance(self.state_dim, int) or \
                self.state_dim != STATE_DIM:
            raise ValueError(f"state_dim must be {STATE_DIM} (the ANEE 0.4 controller state), "
                             f"got {self.state_dim!r}")
        _check_int("controller_hidden_dim", self.controller_hidden_dim, 1)
        if self.controller_path is not None:
            if not isinstance(self.controller_path, (str, os.PathLike)) or not os.fspath(self.controller_path):
                raise ValueError(f"controller_path must be None or a file path, got "
                                 f"{self.controller_path!r}")
        _check_int("block_size", self.block_size, 1)
        if self.num_kv_blocks is not None:
            _check_int("num_kv_blocks", self.num_kv_blocks, 1)


class ANEECache:
    """`past_key_values` of `ANEEWrapper.forward`: B sequences whose K/V live in the engine's
    paged cache. Each forward call that is given it appends its tokens and updates it in place
    (like a transformers DynamicCache). `close()` (or garbage collection) frees its KV blocks.
    """

    def __init__(self, engine, sequences):
        self.engine = engine
        self.sequences = sequences
        self._release = weakref.finalize(self, _free_blocks, engine.block_manager,
                                         [s.seq_id for s in sequences])

    @property
    def batch_size(self) -> int:
        return len(self.sequences)

    def get_seq_length(self) -> int:
        """Tokens already in the cache (per row; every row has the same length)."""
        return self.sequences[0].num_computed

    @property
    def closed(self) -> bool:
        return not self._release.alive

    def close(self) -> None:
        self._release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        state = "closed" if self.closed else f"{self.get_seq_length()} tokens"
        return f"ANEECache(batch_size={self.batch_size}, {state})"


def _free_blocks(block_manager, seq_ids):
    for seq_id in seq_ids:
        block_manager.free(seq_id)


def _stats(actions, compute, budget, skip_cost) -> dict:
    return {"actions": actions,                                   # int8 [..., L]
            "compute": compute,                                   # fraction of a full forward
            "layers_processed": (actions == PROCESS).sum(dim=-1),
            "mean_compute": float(compute.mean()) if compute.numel() else 0.0,
            "budget": budget,
            "skip_cost": skip_cost}


class ANEEWrapper:
    """ANEE 0.4's wrapper: `generate(tokenizer, prompt, ...)` and `forward(input_ids, ...)`."""

    def __init__(self, config: ANEEConfig):
        if not isinstance(config, ANEEConfig):
            raise TypeError(f"ANEEWrapper needs an ANEEConfig, got {type(config).__name__}")
        config.validate()
        self.config = config
        self.controller = self._make_controller()   # before the model: a bad path fails fast
        self.llm = LLM(config.model_name, device=config.device, dtype=config.dtype,
                       block_size=config.block_size, num_kv_blocks=config.num_kv_blocks,
                       min_layers=config.min_layers)
        if isinstance(self.controller, ANEEMLPController):
            self.controller.to(self.llm.weights.device)
        self.last_output = None   # RequestOutput of the last generate()
        self.last_trace = None    # its Trace: actions [tokens, L] and compute of every token
        self.last_stats = None    # stats of the last generate() or forward()

    def _make_controller(self):
        config = self.config
        threshold = float(config.exit_budget_threshold)
        if config.controller_type == "heuristic":
            return HeuristicController(exit_threshold=threshold)
        if config.controller_path is not None:
            path = os.fspath(config.controller_path)
            if os.path.isdir(path) or path.endswith(TRAINED_SUFFIXES):
                return BudgetConditionedController.load(path, exit_threshold=threshold)
            return ANEEMLPController.from_file(path, exit_threshold=threshold)
        # ANEE runs an untrained controller when given no weights; ours is the same every time.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return ANEEMLPController(hidden_dim=config.controller_hidden_dim,
                                     state_dim=config.state_dim, exit_threshold=threshold)

    @property
    def num_layers(self) -> int:
        return self.llm.num_layers

    @property
    def skip_cost(self) -> float:
        return self.llm.depth.skip_cost

    def _budget(self, energy_budget) -> float:
        return check_budget(self.config.energy_budget if energy_budget is None else energy_budget)

    # ---- generation ----------------------------------------------------------------------------

    def generate(self, tokenizer, prompt, max_new_tokens=20, energy_budget=None, temperature=0.7,
                 top_k=50, seed=None) -> str:
        """The prompt followed by up to `max_new_tokens` generated tokens, decoded to text.

        energy_budget=None uses the config's; temperature=0 is greedy; top_k=0 or None keeps
        every token. Sampling draws its seed from torch's global generator unless `seed` is
        given, so `torch.manual_seed` makes runs repeatable, as it did in ANEE.
        """
        budget = self._budget(energy_budget)
        eos = getattr(tokenizer, "eos_token_id", None)
        params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature,
                                top_k=top_k or None, seed=seed,
                                stop_token_ids=[] if eos is None else [eos])
        if params.temperature > 0 and seed is None:
            params.seed = int(torch.randint(0, 2**62, (1,)))
        prompt_ids = tokenizer.encode(prompt)
        out = self.llm.generate(prompt_ids, params, energy_budget=budget,
                                controller=self.controller)[0]
        self.last_output, self.last_trace = out, out.trace
        self.last_stats = _stats(out.trace.actions, out.trace.compute, budget, self.skip_cost)
        return tokenizer.decode(out.prompt_token_ids + out.token_ids, skip_special_tokens=True)

    # ---- forward -------------------------------------------------------------------------------

    def forward(self, input_ids, energy_budget=None, past_key_values=None) -> dict:
        """Runs `input_ids` [B, T] (or [T]) after the tokens already in `past_key_values`.

        Returns {"logits": float32 [B, T, vocab], "past_key_values": ANEECache (the one given,
        updated, or a new one), "stats": per-token actions [B, T, L], compute [B, T], ...}.
        """
        budget = self._budget(energy_budget)
        rows = _as_rows(input_ids)
        T = len(rows[0])
        engine = self.llm.engine
        if past_key_values is None:
            cache = ANEECache(engine, [engine.new_sequence(r, SamplingParams(max_tokens=0), budget,
                                                           self.controller) for r in rows])
        else:
            cache = past_key_values
            self._check_cache(cache, rows)
            for seq, r in zip(cache.sequences, rows):
                seq.token_ids.extend(r)
        starts = [seq.num_computed for seq in cache.sequences]
        for seq in cache.sequences:
            seq.budget = budget
        try:
            logits = engine.compute(cache.sequences, keep_blocks=True)
        except BaseException:
            for seq, start in zip(cache.sequences, starts):   # leave the cache as it was
                del seq.token_ids[start:]
                seq.num_computed = min(seq.num_computed, start)
            if past_key_values is None:
                cache.close()
            raise
        actions = torch.stack([seq.actions[p:p + T] for seq, p in zip(cache.sequences, starts)])
        compute = torch.stack([seq.compute[p:p + T] for seq, p in zip(cache.sequences, starts)])
        # clone(): plain tensors, not inference-mode ones, so callers may edit them in place
        stats = _stats(actions.clone(), compute.clone(), budget, self.skip_cost)
        self.last_stats = stats
        logits = torch.stack(logits).clone()
        return {"logits": logits, "past_key_values": cache, "stats": stats}

    __call__ = forward

    def _check_cache(self, cache, rows) -> None:
        if not isinstance(cache, ANEECache):
            raise TypeError("past_key_values must be the object a previous ANEEWrapper.forward "
                            f"returned, got {type(cache).__name__}")
        if cache.engine is not self.llm.engine:
            raise ValueError("past_key_values belongs to another ANEEWrapper")
        if cache.closed:
            raise ValueError("past_key_values was closed: its KV blocks are gone")
        if cache.batch_size != len(rows):
            raise ValueError(f"past_key_values holds {cache.batch_size} sequences, input_ids has "
                             f"{len(rows)} rows")
        spec = self.llm.spec
        flat = [t for r in rows for t in r]
        if min(flat) < 0 or max(flat) >= spec.vocab_size:
            raise ValueError(f"token ids must be in [0, {spec.vocab_size}), got min {min(flat)}, "
                             f"max {max(flat)}")
        total = cache.get_seq_length() + len(rows[0])
        if total > spec.max_positions:
            raise ValueError(f"the sequence would have {total} tokens, more than the model's "
                             f"{spec.max_positions} positions")


def _as_rows(input_ids) -> list:
    """[B][T] lists of ints from a tensor or nested lists; a 1-D input is one row."""
    ids = torch.as_tensor(input_ids)
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
        raise ValueError(f"input_ids must be integer token ids, got {ids.dtype}")
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must have shape [batch, tokens] with both >= 1, got "
                         f"{list(ids.shape)}")
    return ids.tolist()

