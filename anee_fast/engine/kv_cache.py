"""Paged K/V storage: per layer, a flat array of slots; slot = block * block_size + offset."""
import torch


class KVCache:
    def __init__(self, num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype, device):
        self.num_blocks = num_blocks
        self.block_size = block_size
        # One spare slot at the end receives the writes of padding rows (slot -1).
        # k[l] / v[l]: layer l's slots, views made once (a tuple index costs no op per call).
        shape = (num_layers, num_blocks * block_size + 1, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device).unbind(0)
        self.v = torch.zeros(shape, dtype=dtype, device=device).unbind(0)
