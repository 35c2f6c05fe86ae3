"""Hands out fixed-size KV blocks to sequences and takes them back."""


class OutOfKVBlocks(RuntimeError):
    pass


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks = list(range(num_blocks - 1, -1, -1))   # pop() hands out 0, 1, 2, ...
        self.tables: dict = {}                                     # seq_id -> [block ids]

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    def blocks_needed(self, seq_id, num_tokens: int) -> int:
        """Extra blocks `seq_id` needs to hold `num_tokens` tokens in total."""
        have = len(self.tables.get(seq_id, ()))
        return max(0, -(-num_tokens // self.block_size) - have)

    def can_allocate(self, seq_id, num_tokens: int) -> bool:
        return self.blocks_needed(seq_id, num_tokens) <= self.num_free

    def allocate(self, seq_id, num_tokens: int) -> list:
        """Grows `seq_id`'s table to hold `num_tokens` tokens; all or nothing."""
        need = self.blocks_needed(seq_id, num_tokens)
        if need > self.num_free:
            raise OutOfKVBlocks(
                f"sequence {seq_id} needs {need} more KV blocks for {num_tokens} tokens, "
                f"{self.num_free} of {self.num_blocks} are free")
        table = self.tables.setdefault(seq_id, [])
        if need:                          # most calls need none: a decode step in the last block
            table.extend(self.free_blocks.pop() for _ in range(need))
        return table

    def free(self, seq_id) -> None:
        self.free_blocks.extend(reversed(self.tables.pop(seq_id, [])))

    def slot(self, seq_id, position: int) -> int:
        table = self.tables[seq_id]
        return table[position // self.block_size] * self.block_size + position % self.block_size
