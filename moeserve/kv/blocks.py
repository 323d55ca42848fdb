"""Which KV blocks each sequence holds: the block pool's allocator, plain Python with no tensors.

In:  sequences growing token by token (the scheduler asks before each step), finishing or being preempted.
Out: per sequence and per layer group, a block table: block i of the table holds positions
     [i * block_size, (i + 1) * block_size). The tensors those ids index live in kv/cache.py.

Layers are grouped by their attention window (full layers are one group, each sliding window another),
and each group has its own block table per sequence, because a sliding group lets go of blocks its
window has left (as vLLM's hybrid manager does); such a block's table entry then names the null block.
Block 0 is that null block: never handed out, it is where a table points when it has nothing to say
(freed window blocks, a captured step's padding rows), so every id in a table indexes a real block of
finite values and masked positions never read garbage.

Allocation and release are O(1) per block: a stack of free ids, most recently freed on top, so the
pool's working set stays as small as the peak number of blocks in use (on a CPU, the untouched rest of
the pool takes no memory: kv/cache.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

NULL_BLOCK = 0


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks that hold `tokens` positions."""
    return -(-tokens // block_size)


@dataclass
class BlockTables:
    """One sequence's blocks: a table per layer group."""

    tables: list[list[int]]  # [group][block index] → block id (NULL_BLOCK once a window has left it)
    held: int = 0  # blocks this sequence holds (non-null entries over all groups)


@dataclass
class BlockManager:
    num_blocks: int  # including the null block
    block_size: int
    windows: tuple[int | None, ...]  # per group: None = full attention, else the sliding window
    _free: list[int] = field(init=False)
    peak_in_use: int = field(init=False, default=0)

    def __post_init__(self):
        self._slides = any(window is not None for window in self.windows)
        if self.num_blocks < 2:
            raise ValueError("a block pool needs at least one block besides the null block")
        self._free = list(range(self.num_blocks - 1, NULL_BLOCK, -1))  # block 1 on top

    @property
    def usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def blocks_in_use(self) -> int:
        return self.usable_blocks - len(self._free)

    def new_tables(self) -> BlockTables:
        return BlockTables([[] for _ in self.windows])

    def blocks_to_cover(self, blocks: BlockTables | None, tokens: int) -> int:
        """New blocks `blocks` (None: a sequence holding none) must take to hold positions 0..tokens-1."""
        covered = 0 if blocks is None else len(blocks.tables[0])
        return max(0, blocks_for(tokens, self.block_size) - covered) * len(self.windows)

    def worst_case_blocks(self, tokens: int) -> int:
        """Blocks a sequence of `tokens` positions may hold at once: every group holds all of them while its
        prompt prefills (a sliding group lets go of the blocks its window has left only after a step)."""
        return blocks_for(tokens, self.block_size) * len(self.windows)

    def cover(self, blocks: BlockTables, tokens: int) -> None:
        """Give `blocks` the blocks that hold positions up to `tokens` - 1 (the caller checked they are free)."""
        needed = blocks_for(tokens, self.block_size) - len(blocks.tables[0])
        if needed <= 0:
            return
        if needed * len(self.windows) > len(self._free):
            raise RuntimeError(f"{needed * len(self.windows)} KV blocks were needed but only {len(self._free)} are free")
        for table in blocks.tables:
            for _ in range(needed):
                table.append(self._free.pop())
        blocks.held += needed * len(self.windows)
        self.peak_in_use = max(self.peak_in_use, self.blocks_in_use)

    def leave_window(self, blocks: BlockTables, next_position: int) -> None:
        """Let go of every sliding group's blocks that no query from `next_position` on can see (a query at
        p sees keys p - window + 1 .. p)."""
        if not self._slides:
            return
        for table, window in zip(blocks.tables, self.windows):
            if window is None:
                continue
            # block i can go once its last position (i + 1) * size - 1 is below next_position - window + 1
            gone = max(0, (next_position - window + 1) // self.block_size)
            for i in range(min(gone, len(table)) - 1, -1, -1):
                if table[i] == NULL_BLOCK:
                    break  # everything before it left earlier
                self._free.append(table[i])
                table[i] = NULL_BLOCK
                blocks.held -= 1

    def release(self, blocks: BlockTables) -> None:
        """Return every block of `blocks` to the pool."""
        for table in blocks.tables:
            self._free.extend(block for block in reversed(table) if block != NULL_BLOCK)
            table.clear()
        blocks.held = 0
