"""Standalone paged KV-cache block allocator (vLLM paper, sections 4.2-4.5).

No GPU code and no torch: only the Python standard library and numpy. The engine-facing class
is :class:`BlockManager`; the ops consume the :class:`BatchMetadata` it builds.

Example::

    from pagedattn.alloc import BlockManager

    mgr = BlockManager(num_gpu_blocks=1024, block_size=16, num_cpu_blocks=256)
    num_cached = mgr.allocate("req-0", prompt_token_ids, extra_keys=("tenant-7",))
    meta = mgr.build_metadata(["req-0"], num_new_tokens=len(prompt_token_ids) - num_cached)
    cow_pairs = mgr.append_slots_batch(["req-0"], [next_token])   # decode step
    meta = mgr.build_metadata(["req-0"])                           # block_tables, slot_mapping
    mgr.free("req-0")

A prompt can also be hashed when its request arrives, so that ``allocate`` hashes nothing::

    hashes = hash_prompt_blocks(prompt_token_ids, block_size=16, extra_keys=("tenant-7",))
    mgr.allocate("req-1", prompt_token_ids, extra_keys=("tenant-7",), block_hashes=hashes)
"""

from pagedattn.alloc.append import PENDING_TOKEN
from pagedattn.alloc.block import FreeKVCacheBlockQueue, KVCacheBlock
from pagedattn.alloc.block_manager import AllocStatus, BlockManager, SequenceState
from pagedattn.alloc.block_pool import BlockPool
from pagedattn.alloc.errors import (AllocatorError, DoubleFreeError, DuplicateSequenceError,
                                    FreedSequenceError, InvalidArgumentError, InvariantViolation,
                                    OutOfBlocksError, SwapError, UnknownSequenceError)
from pagedattn.alloc.hashing import (BLOCK_HASH_BYTES, TOKEN_DTYPE, as_token_array,
                                     encode_extra_keys, hash_block_tokens, hash_token_blocks,
                                     root_hash)
from pagedattn.alloc.invariants import check_invariants, snapshot_state
from pagedattn.alloc.metadata import PAD_SLOT_ID, BatchMetadata, build_batch_metadata
from pagedattn.alloc.prompt_hashes import PromptBlockHashes, hash_prompt_blocks
from pagedattn.alloc.seq_arrays import SequenceArrays

__all__ = [
    "AllocStatus",
    "AllocatorError",
    "BLOCK_HASH_BYTES",
    "BatchMetadata",
    "BlockManager",
    "BlockPool",
    "DoubleFreeError",
    "DuplicateSequenceError",
    "FreeKVCacheBlockQueue",
    "FreedSequenceError",
    "InvalidArgumentError",
    "InvariantViolation",
    "KVCacheBlock",
    "OutOfBlocksError",
    "PAD_SLOT_ID",
    "PromptBlockHashes",
    "PENDING_TOKEN",
    "SequenceArrays",
    "SequenceState",
    "SwapError",
    "TOKEN_DTYPE",
    "UnknownSequenceError",
    "as_token_array",
    "build_batch_metadata",
    "check_invariants",
    "encode_extra_keys",
    "hash_block_tokens",
    "hash_prompt_blocks",
    "hash_token_blocks",
    "root_hash",
    "snapshot_state",
]
