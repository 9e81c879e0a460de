"""Consistency checks and state snapshots of a block manager, for tests and debugging.

:func:`check_invariants` walks every structure (O(blocks + table entries)); engines don't call
it in production. :func:`snapshot_state` captures everything observable so a test can assert
that a failing call left the manager exactly as it was.
"""

from __future__ import annotations

import functools
from collections import Counter
from typing import TYPE_CHECKING, Any

from pagedattn.alloc.errors import InvariantViolation
from pagedattn.alloc.hashing import BLOCK_HASH_BYTES, TOKEN_DTYPE, block_digest, root_hash

if TYPE_CHECKING:
    from pagedattn.alloc.block_manager import BlockManager
    from pagedattn.alloc.block_pool import BlockPool

__all__ = ["check_invariants", "check_pool", "snapshot_state"]


@functools.lru_cache(maxsize=1 << 14)
def _digest(data: bytes) -> bytes:  # memoized: the same keys are re-checked on every call
    return block_digest(data)


def _fail(message: str) -> None:
    raise InvariantViolation(message)


def check_pool(pool: BlockPool, holders: Counter) -> None:
    """Check one pool against ``holders``: block id -> number of tables holding it."""
    name = pool.device
    queue = pool.free_block_queue
    free_ids = []
    prev = queue._head
    for block in queue:
        if block.prev_free_block is not prev:
            _fail(f"{name} free queue: block {block.block_id} has a broken back link")
        free_ids.append(block.block_id)
        prev = block
    if queue._tail.prev_free_block is not prev:
        _fail(f"{name} free queue: the tail's back link is broken")
    if len(free_ids) != queue.num_free_blocks:
        _fail(f"{name} free queue holds {len(free_ids)} blocks but counts {queue.num_free_blocks}")
    if len(set(free_ids)) != len(free_ids):
        _fail(f"{name} free queue holds a block twice: {free_ids}")
    free_set = set(free_ids)
    num_used = 0
    for block in pool.blocks:
        bid = block.block_id
        if block.ref_cnt != holders.get(bid, 0):
            _fail(f"{name} block {bid} has ref_cnt {block.ref_cnt} but {holders.get(bid, 0)} "
                  f"block tables hold it")
        if block.ref_cnt > 0:
            num_used += 1
            if bid in free_set or block.prev_free_block is not None:
                _fail(f"{name} block {bid} is both in use (ref_cnt {block.ref_cnt}) and free")
        elif bid not in free_set:
            _fail(f"{name} block {bid} has ref_cnt 0 but is not in the free queue (leaked)")
        if block.block_key is not None:
            if pool.enable_caching and pool.cached_blocks.get(block.block_key) is not block:
                _fail(f"{name} block {bid} has a key but the hash map does not point to it")
            if not pool.enable_caching and block.ref_cnt == 0:
                _fail(f"{name} block {bid} is free but keeps a cache identity")
            if _digest(block.block_key) != block.block_hash:
                _fail(f"{name} block {bid}: block_hash is not the hash of its key")
        elif block.block_hash is not None or block.extra_keys is not None:
            _fail(f"{name} block {bid} has a hash or extra keys but no key")
    if num_used + len(free_ids) != pool.num_blocks:
        _fail(f"{name}: {num_used} used + {len(free_ids)} free != {pool.num_blocks} blocks")
    for key, block in pool.cached_blocks.items():
        if block.block_key != key:
            _fail(f"{name} hash map entry points to block {block.block_id} with another key")
    if not pool.enable_caching and pool.cached_blocks:
        _fail(f"{name} pool has caching off but a non-empty hash map")


def check_invariants(manager: BlockManager) -> None:
    """Check every invariant of ``manager``; raise :class:`InvariantViolation` on the first break.

    Checked: free + used = total on both pools; each ref count equals the number of tables
    holding the block; no block both free and in use; the free queue is a well-linked list;
    the hash map and the blocks agree (key <-> block, hash = BLAKE2b(key)); cached blocks are
    full blocks of every table holding them, under the holders' extra keys, and chain from
    their parent; the numpy rows mirror the Python tables.
    """
    bs, arrays = manager.block_size, manager.arrays
    gpu_holders: Counter = Counter()
    cpu_holders: Counter = Counter()
    key_len = BLOCK_HASH_BYTES + bs * TOKEN_DTYPE.itemsize
    rows = set()
    for seq_id, seq in manager._seqs.items():
        if seq.seq_id != seq_id or manager._row_seqs.get(seq.row) is not seq:
            _fail(f"sequence {seq_id!r}: id/row maps are inconsistent")
        if seq.row in rows:
            _fail(f"sequence {seq_id!r} shares row {seq.row}")
        rows.add(seq.row)
        n = int(arrays.num_tokens[seq.row])
        if len(seq.blocks) != -(-n // bs):
            _fail(f"sequence {seq_id!r} holds {n} tokens in {len(seq.blocks)} blocks")
        if len({b.block_id for b in seq.blocks}) != len(seq.blocks):
            _fail(f"sequence {seq_id!r} holds a block twice")
        (cpu_holders if seq.swapped else gpu_holders).update(b.block_id for b in seq.blocks)
        table = arrays.block_tables[seq.row].tolist()
        ids = [] if seq.swapped else [b.block_id for b in seq.blocks]
        if table != ids + [arrays.pad_block_id] * (len(table) - len(ids)):
            _fail(f"sequence {seq_id!r}: numpy block table {table[:len(ids) + 1]} != {ids}")
        full = n // bs
        parent = root_hash(seq.extra_keys) if manager.enable_prefix_caching else None
        for i, block in enumerate(seq.blocks):
            if block.block_key is None:
                parent = None
                continue
            if i >= full:
                _fail(f"sequence {seq_id!r}: partly filled block {block.block_id} is cached")
            if len(block.block_key) != key_len or block.extra_keys != seq.extra_keys:
                _fail(f"sequence {seq_id!r}: cached block {block.block_id} has another key shape "
                      f"or extra keys")
            if parent is not None and block.block_key[:BLOCK_HASH_BYTES] != parent:
                _fail(f"sequence {seq_id!r}: cached block {block.block_id} does not chain from "
                      f"its parent")
            parent = block.block_hash
        # blocks whose tokens are all known (pending tokens are a sequence's last ones)
        known_full = (n - int(arrays.pending[seq.row])) // bs
        if manager.enable_prefix_caching and known_full and seq.blocks[known_full - 1].block_key is not None \
                and seq.last_hash != seq.blocks[known_full - 1].block_hash:
            _fail(f"sequence {seq_id!r}: last_hash is not the hash of its last known full block")
        # full blocks with pending tokens, but the last block (its tokens are in the row), wait
        # in `unhashed` with a copy of their tokens
        waiting = [b.block_id for b in seq.blocks[known_full:full - (n % bs == 0)]]
        kept = [b.block_id for b, _ in seq.unhashed or ()]
        if kept != (waiting if manager.enable_prefix_caching else []) or seq.unhashed == []:
            _fail(f"sequence {seq_id!r}: blocks {kept} wait to be hashed, expected {waiting}")
        if not seq.swapped and n % bs and not arrays.maybe_shared[seq.row] \
                and seq.blocks[-1].ref_cnt != 1:
            _fail(f"sequence {seq_id!r}: last block shared but not flagged for copy-on-write")
    flagged = {int(r) for r in arrays.maybe_shared.nonzero()[0]}
    if len(flagged) != arrays.num_maybe_shared:
        _fail(f"{len(flagged)} maybe_shared flags set, {arrays.num_maybe_shared} counted")
    for row in flagged:
        seq = manager._row_seqs.get(row)
        if seq is None or seq.swapped or int(arrays.num_tokens[row]) % bs == 0:
            _fail(f"row {row} is flagged maybe_shared without a partly filled last block on the GPU")
    pending = {int(r) for r in arrays.pending.nonzero()[0]}
    if int(arrays.pending.sum()) != arrays.num_pending or not pending <= rows or (arrays.pending < 0).any():
        _fail(f"{int(arrays.pending.sum())} pending tokens ({arrays.num_pending} counted), not all on live rows")
    check_pool(manager.gpu_pool, gpu_holders)
    check_pool(manager.cpu_pool, cpu_holders)
    if len(manager._row_seqs) != len(manager._seqs):
        _fail("row map has entries for dead sequences")


def _pool_state(pool: BlockPool) -> dict[str, Any]:
    return {
        "blocks": [(b.block_id, b.ref_cnt, b.block_hash, b.block_key, b.extra_keys)
                   for b in pool.blocks],
        "free_queue": [b.block_id for b in pool.free_block_queue],
        "cached": sorted((k, b.block_id) for k, b in pool.cached_blocks.items()),
        "num_evictions": pool.num_evictions,
    }


def snapshot_state(manager: BlockManager) -> dict[str, Any]:
    """Everything observable about ``manager``, as plain comparable values."""
    arrays = manager.arrays
    seqs = {}
    for seq_id, seq in manager._seqs.items():
        n = int(arrays.num_tokens[seq.row])
        seqs[seq_id] = (seq.row, [b.block_id for b in seq.blocks], seq.extra_keys, seq.last_hash,
                        seq.swapped, n, arrays.last_block_tokens[seq.row, : n % manager.block_size]
                        .tolist(), arrays.block_tables[seq.row].tolist(),
                        bool(arrays.maybe_shared[seq.row]), int(arrays.pending[seq.row]),
                        [(b.block_id, t.tolist()) for b, t in seq.unhashed or ()])
    return {
        "seqs": seqs,
        "gpu": _pool_state(manager.gpu_pool),
        "cpu": _pool_state(manager.cpu_pool),
        "stats": (manager._num_query_tokens, manager._num_hit_tokens),
        "freed": list(manager._freed_ids),
    }
