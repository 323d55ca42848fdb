"""Which KV blocks each sequence holds, and which full blocks are kept for reuse: plain Python, no tensors.

In:  sequences growing token by token (the scheduler asks before each step), finishing or being preempted;
     after each step, the tokens whose K/V are now cached.
Out: per sequence and per layer group, a block table: block i of the table holds positions
     [i * block_size, (i + 1) * block_size). The tensors those ids index live in kv/cache.py.

Layers are grouped by their attention window (full layers are one group, each sliding window another),
and each group has its own block table per sequence, because a sliding group lets go of blocks its
window has left (as vLLM's hybrid manager does); such a block's table entry then names the null block.
Block 0 is that null block: never handed out, it is where a table points when it has nothing to say
(freed window blocks, a captured step's padding rows), so every id in a table indexes a real block of
finite values and masked positions never read garbage.

Prefix caching. A full block is known by a hash chained over its tokens: sha256 of the previous block's
hash, a salt and the block's token ids. The salt names what computed the K/V (the model, its dtype and the
expert provider's policy: KV computed under a lossy policy differs from raw), so two policies never share
a block. Blocks are shared by reference count; a block nobody holds keeps its hash and stays findable
until its memory is needed, the least recently released first (LRU). A new sequence takes the longest
chain of its prompt's full blocks found in every layer group, and computes only the rest.

A request for prompt logprobs needs them at cached positions too, which a cache hit does not compute. So
the prompt logprobs a request computed stay with its cached blocks: block b keeps the entries of tokens
b*size+1 .. (b+1)*size-1 and, per following token, the entry of token (b+1)*size (it depends on that
token, which is not in the block's hash). A later request asking for the same number of logprobs reuses
a block only together with those entries.

Allocation and release are O(1) per block: a stack of free ids, most recently freed on top, so the
pool's working set stays as small as the peak number of blocks in use (on a CPU, the untouched rest of
the pool takes no memory: kv/cache.py).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field

NULL_BLOCK = 0


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks that hold `tokens` positions."""
    return -(-tokens // block_size)


def write_slot(table: list[int], position: int, block_size: int) -> int:
    """Where in the pool (block * block_size + offset) the K/V of `position` go, by one group's `table`."""
    return table[position // block_size] * block_size + position % block_size


@dataclass
class BlockTables:
    """One sequence's blocks: a table per layer group, and the hash chain of its full blocks."""

    tables: list[list[int]]  # [group][block index] → block id (NULL_BLOCK once a window has left it)
    held: int = 0  # blocks this sequence holds (non-null entries over all groups)
    hashes: list[bytes] = field(default_factory=list)  # chain hash of full block i (same in every group)
    logprobs_kept: int = 0  # of its full blocks, those whose prompt logprobs were offered to the cache


@dataclass(frozen=True)
class PrefixHit:
    """Blocks of a cached prefix: per group, the block of each of the first `len(hashes)` block positions."""

    tables: list[list[int]]
    hashes: list[bytes]
    idle: int  # of them, blocks nobody holds (taking them takes them off the free count)

    def tokens(self, block_size: int) -> int:
        return len(self.hashes) * block_size


@dataclass
class BlockManager:
    num_blocks: int  # including the null block
    block_size: int
    windows: tuple[int | None, ...]  # per group: None = full attention, else the sliding window
    prefix_caching: bool = False
    peak_in_use: int = field(init=False, default=0)
    prefix_queries: int = field(init=False, default=0)  # prompt tokens looked up in the prefix cache
    prefix_hits: int = field(init=False, default=0)  # of them, found

    def __post_init__(self):
        if self.num_blocks < 2:
            raise ValueError("a block pool needs at least one block besides the null block")
        self._slides = any(window is not None for window in self.windows)
        self._free = list(range(self.num_blocks - 1, NULL_BLOCK, -1))  # never-hashed free blocks, block 1 on top
        self._refs = [0] * self.num_blocks
        self._key: list[tuple[int, bytes] | None] = [None] * self.num_blocks  # (group, hash) a block is known by
        self._cached: dict[tuple[int, bytes], int] = {}  # (group, hash) → block
        self._idle: OrderedDict[int, None] = OrderedDict()  # hashed blocks nobody holds, least recently released first
        # block (of group 0) → (logprobs per entry, entries of its tokens after the first, {next token: its entry})
        self._logprobs: dict[int, tuple[int, list, dict[int, object]]] = {}

    @property
    def usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def free_blocks(self) -> int:
        """Blocks a sequence can take: never used, or cached but held by nobody."""
        return len(self._free) + len(self._idle)

    @property
    def blocks_in_use(self) -> int:
        return self.usable_blocks - self.free_blocks

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
        if needed * len(self.windows) > self.free_blocks:
            raise RuntimeError(f"{needed * len(self.windows)} KV blocks were needed but only {self.free_blocks} are free")
        for table in blocks.tables:
            for _ in range(needed):
                table.append(self._take())
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
                self._drop(table[i])
                table[i] = NULL_BLOCK
                blocks.held -= 1

    def release(self, blocks: BlockTables) -> None:
        """Return every block of `blocks` to the pool; hashed ones stay findable until their memory is needed
        (a sequence's last blocks are the least likely to be shared: they are released, and so evicted, first)."""
        for table in blocks.tables:
            for block in reversed(table):
                if block != NULL_BLOCK:
                    self._drop(block)
            table.clear()
        blocks.held = 0
        blocks.hashes.clear()
        blocks.logprobs_kept = 0

    # -- prefix caching ---------------------------------------------------------------------------------

    def commit(self, blocks: BlockTables, prompt: list[int], output: list[int], cached: int, salt: bytes) -> None:
        """Make the full blocks among positions 0..cached-1 of a sequence (`prompt` then `output` tokens)
        findable by their tokens."""
        if not self.prefix_caching:
            return
        size = self.block_size
        for i in range(len(blocks.hashes), cached // size):
            key = _chain(blocks.hashes[-1] if blocks.hashes else salt, tokens_between(prompt, output, i * size, (i + 1) * size))
            blocks.hashes.append(key)
            for group, table in enumerate(blocks.tables):
                block = table[i]
                if block != NULL_BLOCK and self._key[block] is None and (group, key) not in self._cached:
                    self._key[block] = (group, key)
                    self._cached[group, key] = block

    def find(self, token_ids: list[int], limit: int, salt: bytes, logprobs: int | None = None) -> PrefixHit | None:
        """The longest chain of full blocks over `token_ids[:limit]` cached in every group (with their prompt
        logprobs of `logprobs` entries, when asked for); None without one."""
        if not self.prefix_caching:
            return None
        size = self.block_size
        tables: list[list[int]] = [[] for _ in self.windows]
        hashes: list[bytes] = []
        idle = 0
        for i in range(limit // size):
            key = _chain(hashes[-1] if hashes else salt, token_ids[i * size : (i + 1) * size])
            found = [self._cached.get((group, key)) for group in range(len(self.windows))]
            if None in found:
                break
            if logprobs is not None:
                kept = self._logprobs.get(found[0])
                if kept is None or kept[0] != logprobs or token_ids[(i + 1) * size] not in kept[2]:
                    break
            hashes.append(key)
            for table, block in zip(tables, found):
                table.append(block)
                idle += self._refs[block] == 0
        return PrefixHit(tables, hashes, idle) if hashes else None

    def prompt_logprobs(self, hit: PrefixHit, token_ids: list[int]) -> list:
        """The prompt-logprob entries of tokens 0 .. hit's end (the first is None) kept with `hit`'s blocks."""
        entries: list = [None]
        for i, block in enumerate(hit.tables[0]):
            _, within, following = self._logprobs[block]
            entries += within
            entries.append(following[token_ids[(i + 1) * self.block_size]])
        return entries

    def keep_prompt_logprobs(self, blocks: BlockTables, prompt: list[int], entries: list, logprobs: int) -> None:
        """Offer the prompt-logprob entries a sequence has so far (`entries[j]`: of prompt token j) to its
        cached full blocks, so that later requests for the same number of logprobs can reuse them."""
        if not self.prefix_caching:
            return
        size = self.block_size
        while blocks.logprobs_kept < len(blocks.hashes) and (blocks.logprobs_kept + 1) * size < len(entries):
            i = blocks.logprobs_kept
            block = self._cached.get((0, blocks.hashes[i]))  # this sequence's block, or the one found for its tokens
            after = prompt[(i + 1) * size]
            if block is not None:
                kept = self._logprobs.setdefault(block, (logprobs, entries[i * size + 1 : (i + 1) * size], {}))
                if kept[0] == logprobs:
                    kept[2].setdefault(after, entries[(i + 1) * size])
            blocks.logprobs_kept += 1

    def count_query(self, tokens: int, found: int) -> None:
        """A prompt of `tokens` looked up at admission, `found` of them in the cache (the prefix-cache figures)."""
        if self.prefix_caching:
            self.prefix_queries += tokens
            self.prefix_hits += found

    def adopt(self, blocks: BlockTables, hit: PrefixHit) -> None:
        """Give `blocks` (holding none yet) the blocks of `hit`, shared with whoever else holds them."""
        for table, found in zip(blocks.tables, hit.tables):
            for block in found:
                if self._refs[block] == 0:
                    del self._idle[block]
                self._refs[block] += 1
                table.append(block)
        blocks.held += sum(len(found) for found in hit.tables)
        blocks.hashes.extend(hit.hashes)
        self.peak_in_use = max(self.peak_in_use, self.blocks_in_use)

    def _take(self) -> int:
        if self._free:
            block = self._free.pop()
        else:  # evict the cached block released longest ago
            block, _ = self._idle.popitem(last=False)
            del self._cached[self._key[block]]
            self._key[block] = None
            self._logprobs.pop(block, None)
        self._refs[block] = 1
        return block

    def _drop(self, block: int) -> None:
        self._refs[block] -= 1
        if self._refs[block] == 0:
            if self._key[block] is None:
                self._free.append(block)
            else:
                self._idle[block] = None


def tokens_between(prompt: list[int], output: list[int], start: int, end: int) -> list[int]:
    """(prompt + output)[start:end] without joining the two lists."""
    if end <= len(prompt):
        return prompt[start:end]
    if start >= len(prompt):
        return output[start - len(prompt) : end - len(prompt)]
    return prompt[start:] + output[: end - len(prompt)]


def _chain(previous: bytes, tokens: list[int]) -> bytes:
    """A block's hash: its predecessor's hash (or the salt, for the first) and its token ids."""
    return hashlib.sha256(previous + array("q", tokens).tobytes()).digest()
