"""The public entry point: `LLM(model).score(...)` and `LLM(model).generate(...)`."""
import os
from dataclasses import dataclass

import torch

from .actions import validate_actions
from .engine.config import EngineConfig
from .engine.llm_engine import LLMEngine
from .engine.sampling import SamplingParams
from .model.adapters import load_adapters, shipped_adapters_path
from .model.loader import default_device, load_weights
from .ops.backends import ops_for, select_backend
from .trace import Trace

THREADS_ENV = "ANEE_FAST_THREADS"


@dataclass
class RequestOutput:
    prompt_token_ids: list
    token_ids: list            # generated tokens
    text: str
    finish_reason: str
    trace: Trace


class LLM:
    def __init__(self, model=None, backend: str = "auto", device=None, dtype=None, *,
                 tokenizer=None, block_size: int = 16, num_kv_blocks=None, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 2048, min_layers: int = 2, always_last: int = 0,
                 cuda_graphs=None, conditional_layers=False, threads=None, adapters="auto",
                 weights="auto"):
        """threads: torch's CPU threads for this process (set_threads); None = $ANEE_FAST_THREADS
        if set, else torch's default. adapters: skip adapters (model/adapters.py), a path to
        an adapter file, None for none (a SKIP adds nothing, as without adapters), or "auto": the
        shipped ones for the embedded model (when it is the one loaded), none for any other.
        weights: how the projections, embedding and LM head are stored: "auto" (a GGUF file's
        own blocks, e.g. the embedded model's 4-bit Q4_1; a float model's floats), "fp32",
        "bf16", "int8" (per output channel) or "gguf" (model/weight_storage.py). Fewer bytes
        per weight is faster decoding; `anee-fast eval --weights` reports what it costs."""
        set_threads(threads)
        self.backend = select_backend(backend, default_device(device).type)
        self.weights, loaded_tokenizer, self.name = load_weights(model, device, dtype, weights)
        self.tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
        config = EngineConfig(block_size=block_size, num_kv_blocks=num_kv_blocks,
                              max_num_seqs=max_num_seqs,
                              max_num_batched_tokens=max_num_batched_tokens,
                              min_layers=min_layers, always_last=always_last,
                              cuda_graphs=cuda_graphs, conditional_layers=conditional_layers)
        self.engine = LLMEngine(self.weights, ops_for(self.backend), config,
                                eos_token_id=getattr(self.tokenizer, "eos_token_id", None))
        self.set_adapters(_adapters_path(adapters, embedded=model is None))

    def set_adapters(self, adapters) -> None:
        """Skip adapters from now on: a path to an adapter file, a list of SkipAdapter (one per
        layer), or None for none. `adapters_path` says which file (None otherwise)."""
        self.adapters_path = None
        if isinstance(adapters, (str, os.PathLike)):
            spec = self.weights.spec
            self.adapters_path = adapters
            adapters, _ = load_adapters(adapters, spec.num_layers, spec.hidden_size)
        self.engine.set_adapters(adapters)

    @property
    def spec(self):
        return self.weights.spec

    @property
    def depth(self):
        """DepthAccounting: layers, SKIP cost, forced layers and the budget floor."""
        return self.engine.depth

    @property
    def num_layers(self) -> int:
        return self.weights.spec.num_layers

    # ---- scoring -------------------------------------------------------------------------------

    def score(self, token_ids, actions=None, chunk_size=None, *, energy_budget=1.0,
              controller="budget", return_trace: bool = False):
        """float32 logits [T, vocab] of every position; a list of sequences is one ragged batch.

        actions: int8 [T, L] (a list of them for a batch) or None to let `controller` decide.
        energy_budget: one float, or one per sequence of a batch.
        chunk_size: None = as many tokens per step as the scheduler allows (max_num_batched_tokens);
        k = at most k tokens of a sequence per step, through the paged decode path.
        """
        batched = _is_batch(token_ids)
        sequences = list(token_ids) if batched else [token_ids]
        names = [f"token_ids[{i}]" for i in range(len(sequences))] if batched else ["token_ids"]
        if actions is not None and not batched:
            actions = [actions]
        if actions is not None and len(actions) != len(sequences):
            raise ValueError(f"{len(sequences)} sequences but {len(actions)} action matrices")
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 1):
            raise ValueError(f"chunk_size must be None or an integer >= 1, got {chunk_size!r}")
        if isinstance(energy_budget, (list, tuple)) and not batched:
            raise ValueError(f"energy_budget must be a number in [0, 1] for one sequence (a list "
                             f"gives one per sequence of a batch), got {energy_budget!r}")
        budgets = energy_budget if isinstance(energy_budget, (list, tuple)) \
            else [energy_budget] * len(sequences)
        if len(budgets) != len(sequences):
            raise ValueError(f"{len(sequences)} sequences but {len(budgets)} values of energy_budget")
        seqs = [self.engine.new_sequence(s, SamplingParams(max_tokens=0), budget, controller, name)
                for s, name, budget in zip(sequences, names, budgets)]
        for i, seq in enumerate(seqs):
            seq.chunk_size = chunk_size
            if actions is not None:
                seq.fixed_actions = validate_actions(actions[i], len(seq), self.num_layers)
        logits = [x.cpu() for x in self.engine.compute(seqs)]
        traces = [s.trace() for s in seqs]
        if not batched:
            return (logits[0], traces[0]) if return_trace else logits[0]
        return (logits, traces) if return_trace else logits

    # ---- generation ----------------------------------------------------------------------------

    def generate(self, prompts, sampling_params=None, energy_budget=1.0, controller="budget",
                 use_tqdm: bool = False, prompt_budget=None):
        """Generates for one prompt or a list of prompts, each a string or token ids (a list,
        tuple or 1-D tensor); returns one RequestOutput per prompt. energy_budget governs every
        token; prompt_budget, when given, the prompt's tokens instead (1.0: read the prompt at
        full depth, and save on the generated tokens only). Each: a float or one per prompt."""
        if isinstance(prompts, (list, tuple)) and not prompts:
            raise ValueError("no prompts given")
        batched = _is_batch(prompts)
        prompts = list(prompts) if batched else [prompts]
        names = [f"prompts[{i}]" for i in range(len(prompts))] if batched else ["prompts"]
        params = sampling_params or SamplingParams()
        params = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
        budgets = energy_budget if isinstance(energy_budget, (list, tuple)) else [energy_budget] * len(prompts)
        prompt_budgets = prompt_budget if isinstance(prompt_budget, (list, tuple)) \
            else [prompt_budget] * len(prompts)
        controllers = controller if isinstance(controller, (list, tuple)) and \
            not all(isinstance(c, int) for c in controller) else [controller] * len(prompts)
        for name, values in (("sampling_params", params), ("energy_budget", budgets),
                             ("prompt_budget", prompt_budgets), ("controller", controllers)):
            if len(values) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(values)} values of {name}")
        engine = self.engine
        # Validate every request before any is queued, so a bad one changes nothing.
        seqs = [engine.new_sequence(self._encode(p), sp, b, c, name, prompt_budget=pb)
                for p, name, sp, b, pb, c in zip(prompts, names, params, budgets, prompt_budgets,
                                                 controllers)]
        for seq in seqs:
            engine.scheduler.add(seq)
        progress = None
        if use_tqdm:
            from tqdm import tqdm
            progress = tqdm(total=len(seqs), desc="generating", unit="req")
        try:
            while engine.has_unfinished():
                finished = engine.step()
                if progress is not None:
                    progress.update(len(finished))
        except BaseException:
            for seq in seqs:
                engine.abort(seq)
            raise
        finally:
            if progress is not None:
                progress.close()
        return [self._output(seq) for seq in seqs]

    def _encode(self, prompt):
        """Text through the tokenizer; token ids as given (new_sequence checks them)."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: give prompts as lists of token ids "
                                 "or pass tokenizer= to LLM")
            if not prompt:
                raise ValueError("the prompt is empty")
            return self.tokenizer.encode(prompt)
        return prompt

    def _output(self, seq) -> RequestOutput:
        text = ""
        if self.tokenizer is not None:
            text = self.tokenizer.decode(seq.generated_ids, skip_special_tokens=True)
        return RequestOutput(prompt_token_ids=seq.token_ids[:seq.num_prompt_tokens],
                             token_ids=seq.generated_ids, text=text,
                             finish_reason=seq.finish_reason, trace=seq.trace())


def _adapters_path(adapters, embedded: bool):
    """The adapter file LLM(adapters=...) asks for, or None."""
    if adapters is None:
        return None
    if adapters == "auto":
        shipped = shipped_adapters_path()
        return shipped if embedded and shipped.is_file() else None
    if not isinstance(adapters, (str, os.PathLike)):
        raise ValueError(f"adapters must be None, 'auto' or a path to skip adapters, got {adapters!r}")
    return adapters


def _is_batch(x) -> bool:
    """A list or tuple of prompts rather than one prompt's token ids: its first item is itself a
    sequence (a string, list, tuple, or a tensor or array of one or more dimensions)."""
    return isinstance(x, (list, tuple)) and len(x) > 0 and \
        (isinstance(x[0], (str, list, tuple)) or getattr(x[0], "ndim", 0) >= 1)


def set_threads(threads=None) -> None:
    """Sets torch's CPU threads for the whole process: `threads`, else $ANEE_FAST_THREADS, else
    leaves torch's default (one per core). Fewer threads than cores pay off when other processes
    share the cores, since each parallel op waits for its slowest thread (README, Deploying)."""
    if threads is None:
        value = os.environ.get(THREADS_ENV)
        if not value:
            return
        threads = int(value) if value.strip().isdecimal() else 0
        if threads < 1:
            raise ValueError(f"${THREADS_ENV} must be an integer >= 1, got {value!r}")
    elif isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be None or an integer >= 1, got {threads!r}")
    torch.set_num_threads(threads)
