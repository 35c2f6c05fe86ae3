"""The engine's settings: the paged cache, the scheduler's limits, the forced layers and how
decode steps run on a GPU. One object instead of a row of positional arguments."""
from dataclasses import dataclass
from typing import Optional, Union


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16                  # tokens per KV block
    num_kv_blocks: Optional[int] = None   # None: enough blocks for 8192 tokens
    max_num_seqs: int = 64                # sequences running at once
    max_num_batched_tokens: int = 2048    # tokens computed in one step
    min_layers: int = 2                   # first layers every token processes
    always_last: int = 0                  # last layers every token processes
    cuda_graphs: Optional[bool] = None    # None: on where the model is on a GPU
    conditional_layers: Union[bool, str] = False   # False, True or "compacted" (CUDA graphs)

    def __post_init__(self):
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            _check_int(name, getattr(self, name), 1)
        if self.num_kv_blocks is not None:
            _check_int("num_kv_blocks", self.num_kv_blocks, 1)
        for name in ("min_layers", "always_last"):
            _check_int(name, getattr(self, name), 0)
        if self.cuda_graphs is not None and not isinstance(self.cuda_graphs, bool):
            raise ValueError(f"cuda_graphs must be None (on where the model is on a GPU), True or "
                             f"False, got {self.cuda_graphs!r}")
        if not (isinstance(self.conditional_layers, bool) or self.conditional_layers == "compacted"):
            raise ValueError(f"conditional_layers must be False, True or 'compacted', got "
                             f"{self.conditional_layers!r}")

    @property
    def kv_blocks(self) -> int:
        """The number of KV blocks the cache holds."""
        if self.num_kv_blocks is not None:
            return self.num_kv_blocks
        return -(-8192 // self.block_size)


def _check_int(name, value, least):
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
