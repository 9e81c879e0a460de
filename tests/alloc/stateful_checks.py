"""The checks of the allocator state machine (test_alloc_stateful.py): its reference chain, the
prefix hits it expects, and the state it checks after every operation and at teardown.

PYTEST_DONT_REWRITE: plain asserts (these checks run after every one of >100,000 operations).
"""

import functools
import hashlib
from collections import Counter

import numpy as np

from pagedattn.alloc import encode_extra_keys
from tests.alloc.pool_cases import reference_chain

#: the documented chain of a token tuple, memoized: [(block_key, block_hash)] per full block
reference_keys = functools.lru_cache(maxsize=4096)(reference_chain)


@functools.lru_cache(maxsize=1 << 16)
def digest(data: bytes) -> bytes:
    return hashlib.blake2b(data).digest()


def cdiv(a, b):
    return -(-a // b)


class AllocatorChecks:
    """Mixin of the state machine: needs ``mgr``, ``bs``, ``tokens``, ``extra``, ``swapped``,
    ``chains``, ``expected_tail`` and ``prev`` on the machine."""

    def _remember_queues(self):
        self.prev = {}
        for name, pool in (("gpu", self.mgr.gpu_pool), ("cpu", self.mgr.cpu_pool)):
            self.prev[name] = ([b.block_id for b in pool.free_block_queue],
                               [b.block_key for b in pool.blocks], pool.num_evictions)

    def reference_chain(self, sid):
        """reference_keys of a live sequence's tokens, extended incrementally as it grows."""
        tokens, bs = self.tokens[sid], self.bs
        cached = self.chains.get(sid)
        if cached is None or cached[0] is not tokens:
            cached = self.chains[sid] = (tokens, list(reference_keys(tuple(tokens), bs, self.extra[sid])))
        refs = cached[1]
        while len(refs) < len(tokens) // bs:
            i = len(refs)
            key = refs[-1][1] + np.asarray(tokens[i * bs:(i + 1) * bs], dtype="<i4").tobytes() \
                if refs else reference_keys(tuple(tokens[:bs]), bs, self.extra[sid])[0][0]
            refs.append((key, digest(key)))
        return refs

    def expected_hits(self, tokens, extra):
        if not self.mgr.enable_prefix_caching:
            return []
        cached, enc, hits = self.mgr.gpu_pool.cached_blocks, encode_extra_keys(extra), []
        for key, _ in reference_keys(tuple(tokens), self.bs, extra)[: (len(tokens) - 1) // self.bs]:
            block = cached.get(key)
            if block is None or block.extra_keys != enc:
                break
            hits.append(block)
        return hits

    def check_state(self):
        """Everything test_alloc_stateful's docstring lists, after one operation; then remember the queues."""
        mgr, bs = self.mgr, self.bs
        mgr.check_invariants()
        holders = {"gpu": Counter(), "cpu": Counter()}
        position = {}
        assert sorted(mgr.seq_ids()) == sorted(self.tokens)
        num_tokens = mgr.arrays.num_tokens
        for sid, tokens in self.tokens.items():
            seq = mgr._seqs[sid]
            n = len(tokens)
            assert int(num_tokens[seq.row]) == n and seq.swapped == (sid in self.swapped)
            assert len(seq.blocks) == cdiv(n, bs)
            device = "cpu" if seq.swapped else "gpu"
            refs = self.reference_chain(sid)
            full = len(refs)
            ids = [b.block_id for b in seq.blocks]
            holders[device].update(ids)
            for i, block in enumerate(seq.blocks):
                # A shared block holds the same prefix (hence the same KV) at the same position:
                # full blocks compare by the reference chain hash, the last one by its tokens.
                if i < full:
                    ident = (i, refs[i][1])
                    if block.block_key is not None:
                        assert (block.block_key, block.block_hash) == refs[i]
                else:
                    ident = (i, refs[-1][1] if refs else self.extra[sid], tuple(tokens[i * bs:]))
                    assert block.block_key is None
                assert position.setdefault((device, ids[i]), ident) == ident
        for device, pool in (("gpu", mgr.gpu_pool), ("cpu", mgr.cpu_pool)):
            free = [b.block_id for b in pool.free_block_queue]
            used = [b.block_id for b in pool.blocks if b.ref_cnt > 0]
            assert len(free) + len(used) == pool.num_blocks == len(pool.blocks)
            assert not set(free) & set(used)
            assert pool.num_free_blocks == len(free)
            for b in pool.blocks:
                assert b.ref_cnt == holders[device][b.block_id]
            self.check_lru(device, pool, free)
        for key, block in mgr.gpu_pool.cached_blocks.items():
            assert block.block_key == key and digest(key) == block.block_hash
        assert sum(b.block_key is not None for b in mgr.gpu_pool.blocks) \
            == len(mgr.gpu_pool.cached_blocks)
        assert 0.0 <= mgr.kv_utilization() <= 1.0 and 0.0 <= mgr.prefix_cache_hit_rate <= 1.0
        assert abs(mgr.usage - len(holders["gpu"]) / mgr.num_gpu_blocks) < 1e-12
        self.expected_tail = None
        self._remember_queues()

    def check_lru(self, device, pool, free):
        prev_free, prev_keys, prev_evictions = self.prev[device]
        now = set(free)
        removed = [b for b in prev_free if b not in now]
        # Revived by a prefix hit (kept its cache identity) vs taken for new content. A block
        # taken, evicted and re-registered under the same key in one call looks revived; that
        # only makes the LRU check below skip it, and the eviction count allows for it.
        revived = {b for b in removed
                   if prev_keys[b] is not None and pool.blocks[b].block_key == prev_keys[b]}
        taken = [b for b in removed if b not in revived]
        oldest = [b for b in prev_free if b not in revived]
        assert taken == oldest[: len(taken)], f"{device}: took {taken}, LRU order is {oldest}"
        survivors = [b for b in prev_free if b in now]
        assert free[: len(survivors)] == survivors, f"{device}: free queue reordered"
        appended = free[len(survivors):]
        if self.expected_tail is not None and self.expected_tail[0] == device:
            assert appended == self.expected_tail[1], "freed blocks must join last block first"
        evicted = sum(prev_keys[b] is not None for b in taken)
        delta = pool.num_evictions - prev_evictions
        if device == "cpu":
            assert delta == 0
        else:
            assert evicted <= delta <= evicted + len(revived), (delta, evicted, revived)

    def check_teardown(self):
        """Free everything left: all blocks free with ref count 0."""
        for sid in list(self.tokens):
            self.mgr.free(sid)
        self.tokens.clear()
        self.mgr.check_invariants()
        for pool in (self.mgr.gpu_pool, self.mgr.cpu_pool):
            assert pool.num_free_blocks == pool.num_blocks
            assert all(b.ref_cnt == 0 for b in pool.blocks)
        assert self.mgr.num_seqs == 0 and self.mgr.usage == 0.0
