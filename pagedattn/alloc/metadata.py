"""Batch metadata for the attention ops: padded block tables and the slot mapping.

Built with numpy from the allocator's persistent per-sequence rows
(:class:`~pagedattn.alloc.seq_arrays.SequenceArrays`): no per-token Python loop, and no
per-sequence one either.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pagedattn.alloc.errors import InvalidArgumentError

__all__ = ["BatchMetadata", "build_batch_metadata", "PAD_SLOT_ID"]

PAD_SLOT_ID = -1
"""Slot-mapping value of padding tokens (the cache-write op skips them)."""


@dataclass(slots=True)
class BatchMetadata:
    """What the paged-attention ops need for one step.

    Attributes:
        block_tables: int32 ``[num_seqs, max_num_blocks]``, each sequence's physical block ids,
            padded with the allocator's ``pad_block_id``.
        slot_mapping: int64 ``[num_tokens]``, cache slot ``block_id * block_size + offset`` of
            every token this step writes, sequence by sequence; ``PAD_SLOT_ID`` (-1) for padding.
        seq_lens: int32 ``[num_seqs]``, context length of each sequence after this step.
        query_start_loc: int32 ``[num_seqs + 1]``, offsets of each sequence's tokens in
            ``slot_mapping`` (cumulative ``num_new_tokens``, starting at 0).
        positions: int64 ``[num_tokens]``, position of each token in its sequence (0 for padding).
        num_tokens: tokens of the step before padding.
    """

    block_tables: np.ndarray
    slot_mapping: np.ndarray
    seq_lens: np.ndarray
    query_start_loc: np.ndarray
    positions: np.ndarray
    num_tokens: int


def _per_seq(value, num_seqs: int, name: str) -> np.ndarray:
    try:
        return np.broadcast_to(np.asarray(value, dtype=np.int64), (num_seqs,))
    except (ValueError, TypeError):
        raise InvalidArgumentError(f"{name} must be an int or one int per sequence "
                                   f"({num_seqs}), got {value!r}") from None


def build_batch_metadata(block_tables: np.ndarray, num_tokens: np.ndarray, rows: np.ndarray,
                         block_size: int, num_new_tokens: int | np.ndarray = 1,
                         num_computed_tokens: np.ndarray | None = None, *,
                         max_num_blocks: int | None = None,
                         num_padded_tokens: int | None = None,
                         pad_block_id: int = 0) -> BatchMetadata:
    """Vectorized block tables and slot mapping for the sequences in ``rows``.

    Args:
        block_tables: the persistent int32 ``[capacity, width]`` per-row block tables.
        num_tokens: int64 ``[capacity]`` tokens allocated per row.
        rows: the batch's rows, one per sequence, in batch order.
        block_size: tokens per block.
        num_new_tokens: tokens each sequence computes this step (an int for all, or one per
            sequence): 1 for decode, the uncached prompt length for a prefill.
        num_computed_tokens: tokens each sequence has already computed; default
            ``num_tokens - num_new_tokens`` (the step computes each sequence's last tokens).
        max_num_blocks: fixed width of ``block_tables`` (e.g. for CUDA graphs); default the
            widest sequence of the batch.
        num_padded_tokens: pad ``slot_mapping``/``positions`` to this length (slots -1).
        pad_block_id: block id for table entries past a sequence's last block.

    Returns:
        The :class:`BatchMetadata` (fresh arrays the caller may keep).

    Raises:
        InvalidArgumentError: on negative counts, tokens beyond what is allocated, or a
            padding smaller than the batch.
    """
    num_seqs = rows.shape[0]
    seq_tokens = num_tokens[rows]
    decode = num_computed_tokens is None and isinstance(num_new_tokens, (int, np.integer)) \
        and int(num_new_tokens) == 1
    if decode:
        if num_seqs and int(seq_tokens.min()) < 1:
            raise InvalidArgumentError("num_new_tokens=1 but a sequence of the batch holds no token")
        positions = seq_tokens - 1
        seq_lens = seq_tokens
        total = num_seqs
        slot_mapping = block_tables[rows, positions // block_size].astype(np.int64)
        slot_mapping *= block_size
        slot_mapping += positions % block_size
        query_start_loc = np.arange(num_seqs + 1, dtype=np.int32)
    else:
        new = _per_seq(num_new_tokens, num_seqs, "num_new_tokens")
        if num_seqs and int(new.min()) < 0:
            raise InvalidArgumentError(f"num_new_tokens must be >= 0, got {new.tolist()}")
        if num_computed_tokens is None:
            if num_seqs and bool((new > seq_tokens).any()):
                i = int(np.argmax(new > seq_tokens))
                raise InvalidArgumentError(
                    f"batch position {i}: num_new_tokens = {int(new[i])} exceeds the "
                    f"{int(seq_tokens[i])} tokens allocated")
            computed = seq_tokens - new
        else:
            computed = _per_seq(num_computed_tokens, num_seqs, "num_computed_tokens")
            if num_seqs and int(computed.min()) < 0:
                raise InvalidArgumentError(
                    f"num_computed_tokens must be >= 0, got {computed.tolist()}")
        seq_lens = computed + new
        if num_seqs and bool((seq_lens > seq_tokens).any()):
            i = int(np.argmax(seq_lens > seq_tokens))
            raise InvalidArgumentError(
                f"batch position {i}: num_computed_tokens + num_new_tokens = {int(seq_lens[i])} "
                f"exceeds the {int(seq_tokens[i])} tokens allocated")
        query_start_loc = np.zeros(num_seqs + 1, dtype=np.int32)
        np.cumsum(new, out=query_start_loc[1:])
        total = int(query_start_loc[-1])
        token_seq = np.repeat(np.arange(num_seqs), new)
        positions = np.arange(total, dtype=np.int64)
        positions += (computed - query_start_loc[:-1])[token_seq]
        slot_mapping = block_tables[rows[token_seq], positions // block_size].astype(np.int64)
        slot_mapping *= block_size
        slot_mapping += positions % block_size

    width = (int(seq_lens.max()) + block_size - 1) // block_size if num_seqs else 0
    if max_num_blocks is not None:
        if max_num_blocks < width:
            raise InvalidArgumentError(
                f"max_num_blocks={max_num_blocks} is smaller than the {width} blocks of the "
                f"longest sequence of the batch")
        width = max_num_blocks
    width = max(width, 1)
    if width <= block_tables.shape[1]:
        tables = block_tables[rows, :width]
    else:
        tables = np.full((num_seqs, width), pad_block_id, np.int32)
        tables[:, : block_tables.shape[1]] = block_tables[rows]
    if num_padded_tokens is not None:
        if num_padded_tokens < total:
            raise InvalidArgumentError(
                f"num_padded_tokens={num_padded_tokens} is smaller than the {total} tokens of the batch")
        pad = num_padded_tokens - total
        slot_mapping = np.concatenate([slot_mapping, np.full(pad, PAD_SLOT_ID, np.int64)])
        positions = np.concatenate([positions, np.zeros(pad, np.int64)])
    return BatchMetadata(
        block_tables=tables,
        slot_mapping=slot_mapping,
        seq_lens=seq_lens.astype(np.int32),
        query_start_loc=query_start_loc,
        positions=positions,
        num_tokens=total,
    )
