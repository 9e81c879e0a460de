"""The allocator benchmark's workloads (``bench/bench_alloc.py`` times them).

* :class:`DecodeWorkload`: decode steps of 256 running sequences (``append_slots_batch`` and
  ``build_metadata``).
* :class:`PromptWorkload`: rounds of 256 prompts of 512 tokens allocated into a warm,
  prefix-caching pool, optionally hashed beforehand.
* :class:`FloorWorkload`: the same rounds with only the work any LRU prefix cache keyed by the
  chained block hashes must do in CPython: the floor of the prompt figures.
"""

from __future__ import annotations

import hashlib

import numpy as np

from pagedattn.alloc import BlockManager, hash_prompt_blocks
from pagedattn.alloc.hashing import root_hash, split_token_blocks

BLOCK_SIZE = 16
NUM_SEQS = 256
PROMPT_LEN = 512
VOCAB = 32000


# ----------------------------------------------------------------------------------- decode
class DecodeWorkload:
    """256 running sequences with lengths spread over all offsets within a block.

    The state is rebuilt (untimed, in ``setup``) every ``episode`` steps so the sequences stay
    between 200 and ~800 tokens instead of growing without bound over thousands of rounds.
    """

    def __init__(self, seed: int = 0, num_seqs: int = NUM_SEQS, episode: int = 200):
        self.rng = np.random.default_rng(seed)
        self.num_seqs = num_seqs
        self.episode = episode
        self.tokens = self.rng.integers(0, VOCAB, (episode, num_seqs), dtype=np.int32)
        self._reset()

    def _reset(self):
        lengths = self.rng.integers(200, 600, self.num_seqs)
        num_blocks = int(sum(-(-(n + self.episode) // BLOCK_SIZE) for n in lengths)) + 64
        self.mgr = BlockManager(num_blocks, BLOCK_SIZE, enable_prefix_caching=True)
        self.seq_ids = list(range(self.num_seqs))
        for seq_id, n in zip(self.seq_ids, lengths):
            self.mgr.allocate(seq_id, self.rng.integers(0, VOCAB, n, dtype=np.int32))
        self.step_idx = 0

    def setup(self):
        if self.step_idx == self.episode:
            self._reset()

    def step(self):
        tokens = self.tokens[self.step_idx]
        self.step_idx += 1
        cow = self.mgr.append_slots_batch(self.seq_ids, tokens)
        meta = self.mgr.build_metadata(self.seq_ids)
        return cow, meta

    def step_without_metadata(self):
        tokens = self.tokens[self.step_idx]
        self.step_idx += 1
        return self.mgr.append_slots_batch(self.seq_ids, tokens)


# ----------------------------------------------------------------------------------- prompts
class PromptWorkload:
    """Rounds of 256 prompts of 512 tokens into a pool that keeps earlier rounds cached.

    With ``prehashed``, ``setup`` also hashes the next round's prompts (``hash_prompt_blocks``,
    untimed) and ``run`` allocates them with these ``block_hashes``, which it then drops.
    """

    def __init__(self, seed: int = 0, shared_prefix: int = 0, as_list: bool = False,
                 num_rounds: int = 64, prehashed: bool = False):
        rng = np.random.default_rng(seed)
        num_blocks = 2 * NUM_SEQS * PROMPT_LEN // BLOCK_SIZE  # room for two rounds
        self.mgr = BlockManager(num_blocks, BLOCK_SIZE, enable_prefix_caching=True)
        system = rng.integers(0, VOCAB, shared_prefix, dtype=np.int32)
        self.rounds = []
        for _ in range(num_rounds):
            prompts = rng.integers(0, VOCAB, (NUM_SEQS, PROMPT_LEN), dtype=np.int32)
            prompts[:, :shared_prefix] = system
            self.rounds.append([p.tolist() for p in prompts] if as_list else list(prompts))
        self.round_idx = 0
        self.live: list[int] = []
        self.prehashed = prehashed
        self.block_hashes: list | None = None

    def setup(self):
        """Free the previous round (untimed); its blocks stay cached until evicted. With
        ``prehashed``, hash the next round's prompts (untimed: done at request arrival)."""
        for seq_id in self.live:
            self.mgr.free(seq_id)
        self.live = []
        if self.prehashed:
            self.block_hashes = self.hash_round(self.round_idx)

    def hash_round(self, round_idx: int = 0) -> list:
        """``hash_prompt_blocks`` of every prompt of a round."""
        return [hash_prompt_blocks(p, BLOCK_SIZE) for p in self.rounds[round_idx % len(self.rounds)]]

    def run(self):
        prompts = self.rounds[self.round_idx % len(self.rounds)]
        base = self.round_idx * NUM_SEQS
        self.round_idx += 1
        allocate = self.mgr.allocate
        if self.prehashed:
            for i, (prompt, hashes) in enumerate(zip(prompts, self.block_hashes)):
                allocate(base + i, prompt, block_hashes=hashes)
            self.block_hashes = None
        else:
            for i, prompt in enumerate(prompts):
                allocate(base + i, prompt)
        self.live = list(range(base, base + NUM_SEQS))


# ------------------------------------------------------------------------------------- floor
class FloorWorkload:
    """The least work in CPython for the rounds of :class:`PromptWorkload`: the floor of
    ``alloc_prompt_ms``, timed in the same run.

    Per full block, only what any LRU prefix cache keyed by the chained block hashes must do:
    hash ``parent + chunk`` (BLAKE2b, computed as ``allocate`` computes it), delete the key of the
    block it evicts from a ``dict``, insert the new key, and remember which key the block holds.
    No block objects, free queue, ref counts, block tables, sequence state or checks. The pool
    holds two rounds and blocks are reused round-robin, so each round evicts the keys of the
    round before last, as the allocator's LRU free queue does in :class:`PromptWorkload`.
    With ``prehashed``, the keys are made beforehand (untimed, in ``setup``) and the timed round
    only evicts and registers.

    Args:
        rounds: the prompt rounds, those of the :class:`PromptWorkload` it is paired with.
        num_blocks: the pool size, that workload's ``num_gpu_blocks``.
        prehashed: make the keys in ``setup`` and time only the eviction and registration.
    """

    def __init__(self, rounds: list, num_blocks: int, prehashed: bool = False):
        self.rounds = rounds
        self.num_blocks = num_blocks
        self.cached: dict[bytes, int] = {}
        self.block_keys: list[bytes | None] = [None] * num_blocks
        self.next_block = 0
        self.round_idx = 0
        self.prehashed = prehashed
        self.keys: list[list[bytes]] | None = None

    def _round(self) -> list:
        return self.rounds[self.round_idx % len(self.rounds)]

    def setup(self):
        """With ``prehashed``, make the next round's keys (untimed)."""
        if self.prehashed:
            self.keys = [hash_prompt_blocks(p, BLOCK_SIZE).block_keys for p in self._round()]

    def run(self) -> bytes | None:
        """One round; returns the last block hash it computed (``None`` when prehashed), for
        :func:`check_floor_matches`."""
        prompts = self._round()
        self.round_idx += 1
        cached, block_keys, num_blocks = self.cached, self.block_keys, self.num_blocks
        block = self.next_block
        parent = None
        # Both loops are written out whole, as allocate's take loops are: a floor must not pay a
        # call or a second pass a block that the allocator does not pay.
        if self.prehashed:
            for keys in self.keys:
                for key in keys:
                    old_key = block_keys[block]
                    if old_key is not None:
                        del cached[old_key]
                    cached[key] = block
                    block_keys[block] = key
                    block += 1
                    if block == num_blocks:
                        block = 0
            self.keys = None
        else:
            empty, root = hashlib.blake2b(), root_hash(b"")
            for prompt in prompts:
                parent = root
                for chunk in split_token_blocks(prompt, BLOCK_SIZE, len(prompt) // BLOCK_SIZE):
                    old_key = block_keys[block]
                    if old_key is not None:
                        del cached[old_key]
                    key = parent + chunk
                    h = empty.copy()
                    h.update(key)
                    parent = h.digest()
                    cached[key] = block
                    block_keys[block] = key
                    block += 1
                    if block == num_blocks:
                        block = 0
        self.next_block = block
        return parent


def check_floor_matches(floor: FloorWorkload) -> None:
    """Run one round of a floor that hashes, and raise unless it hashed and registered what the
    allocator would: the last prompt's keys (each holding its parent's hash) in the last blocks,
    its last hash that of ``hash_prompt_blocks``, and two rounds of keys held at most."""
    prompt = floor._round()[-1]
    last_hash = floor.run()
    want = hash_prompt_blocks(prompt, BLOCK_SIZE)
    if last_hash != want.block_hashes[-1]:
        raise AssertionError("the floor's last block hash differs from hash_prompt_blocks'")
    first = floor.next_block - len(want.block_keys)
    for i, key in enumerate(want.block_keys):
        block = (first + i) % floor.num_blocks
        if floor.cached.get(key) != block or floor.block_keys[block] != key:
            raise AssertionError(f"block {i} of the last prompt is not registered as hash_prompt_blocks keys it")
    held = min(floor.round_idx, 2) * NUM_SEQS * (PROMPT_LEN // BLOCK_SIZE)
    if len(floor.cached) != held:
        raise AssertionError(f"the floor holds {len(floor.cached)} keys, expected {held}")
