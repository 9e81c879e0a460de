"""A prompt's block hashes computed ahead of allocation, when the request arrives.

``allocate`` hashes a prompt's full blocks itself (the BLAKE2b chain of
:mod:`pagedattn.alloc.hashing`), which makes hashing most of the scheduler's cost of admitting a
prompt. An engine can instead hash each prompt once when its request arrives, as vLLM v1 does
with ``request.block_hashes``, and hand the result to ``allocate(..., block_hashes=...)``: the
allocator then only looks the keys up, takes blocks and registers them. The digests are the
same ones ``allocate`` computes (same function, same chain), so both paths leave the allocator in
exactly the same state.

A :class:`PromptBlockHashes` remembers what it was computed from (block size, encoded extra
keys, the hashed tokens), and ``allocate`` checks all three before using it: hashes of another
prompt, salt or block size would register blocks under keys that do not describe their
content, so they are refused with :class:`~pagedattn.alloc.errors.InvalidArgumentError`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pagedattn.alloc.errors import InvalidArgumentError
from pagedattn.alloc.hashing import (TOKEN_DTYPE, as_token_array, encode_extra_keys, hash_token_blocks,
                                     root_hash)

__all__ = ["PromptBlockHashes", "check_block_hashes", "hash_prompt_blocks"]


@dataclass(frozen=True, slots=True, eq=False)
class PromptBlockHashes:
    """The hash chain of a prompt's full blocks (build it with :func:`hash_prompt_blocks`).

    Attributes:
        block_size: tokens per block the chain was cut with.
        extra_keys: the encoded extra keys (:func:`~pagedattn.alloc.hashing.encode_extra_keys`)
            the chain starts from.
        token_bytes: the hashed tokens (the prompt's full blocks) as :data:`TOKEN_DTYPE` bytes.
        block_keys: ``key_i = hash_{i-1} + token bytes of block i``, one per full block (the
            prefix-cache keys).
        block_hashes: ``hash_i``, the BLAKE2b digest of ``key_i``, one per full block.
    """

    block_size: int
    extra_keys: bytes
    token_bytes: bytes
    block_keys: tuple[bytes, ...]
    block_hashes: tuple[bytes, ...]

    @property
    def num_blocks(self) -> int:
        """Number of full blocks hashed."""
        return len(self.block_keys)

    def prefix(self, num_tokens: int) -> PromptBlockHashes:
        """The hashes of the prompt's first ``num_tokens`` tokens (for allocating a first chunk).

        Args:
            num_tokens: how many leading tokens; the full blocks among them must have been hashed
                (at most the hashed blocks' tokens plus a partial block).

        Raises:
            InvalidArgumentError: ``num_tokens`` is negative or covers blocks that were not hashed.
        """
        num_full = num_tokens // self.block_size if type(num_tokens) is int and num_tokens >= 0 else -1
        if num_full < 0 or num_full > len(self.block_keys):
            raise InvalidArgumentError(f"num_tokens must be in [0, {(len(self.block_keys) + 1) * self.block_size}), "
                                       f"got {num_tokens!r}")
        if num_full == len(self.block_keys):
            return self
        width = num_full * self.block_size * TOKEN_DTYPE.itemsize
        return PromptBlockHashes(self.block_size, self.extra_keys, self.token_bytes[:width],
                                 self.block_keys[:num_full], self.block_hashes[:num_full])

    def check_matches(self, tokens: np.ndarray, block_size: int, encoded_extra_keys: bytes) -> None:
        """Check that these hashes were computed for this prompt, block size and extra keys.

        Args:
            tokens: the prompt as a 1-D :data:`TOKEN_DTYPE` array.
            block_size: the allocator's block size.
            encoded_extra_keys: the prompt's encoded extra keys.

        Raises:
            InvalidArgumentError: if the block size, the extra keys or the tokens differ.
        """
        if self.block_size != block_size:
            raise InvalidArgumentError(
                f"block_hashes were computed with block size {self.block_size}, "
                f"the allocator uses {block_size}")
        if self.extra_keys != encoded_extra_keys:
            raise InvalidArgumentError("block_hashes were computed under other extra_keys")
        num_full = len(tokens) // block_size
        if (len(self.block_keys) != num_full
                or self.token_bytes != tokens[: num_full * block_size].tobytes()):
            raise InvalidArgumentError(
                f"block_hashes were computed for other token ids ({len(self.block_keys)} full "
                f"blocks hashed, the prompt has {num_full})")


def check_block_hashes(block_hashes: Any, tokens: np.ndarray, block_size: int,
                       encoded_extra_keys: bytes) -> None:
    """Check that ``block_hashes`` is a :class:`PromptBlockHashes` of this prompt.

    Args:
        block_hashes: what ``allocate`` was given as ``block_hashes``.
        tokens: the prompt as a 1-D :data:`TOKEN_DTYPE` array.
        block_size: the allocator's block size.
        encoded_extra_keys: the prompt's encoded extra keys.

    Raises:
        InvalidArgumentError: if it is not a :class:`PromptBlockHashes`, or was computed for
            another block size, other extra keys or other tokens.
    """
    if type(block_hashes) is not PromptBlockHashes:
        raise InvalidArgumentError(
            f"block_hashes must come from hash_prompt_blocks, got {type(block_hashes).__name__}")
    block_hashes.check_matches(tokens, block_size, encoded_extra_keys)


def hash_prompt_blocks(token_ids: Sequence[int] | np.ndarray, block_size: int,
                       extra_keys: Any = None) -> PromptBlockHashes:
    """Hash a prompt's full blocks, for a later ``allocate(..., block_hashes=...)``.

    The keys' Python hashes (the ones the prefix-cache ``dict`` uses) are computed here too;
    ``bytes`` keeps them, so registering the keys later costs no further pass over their bytes.

    Args:
        token_ids: the prompt's token ids (as for ``allocate``).
        block_size: the allocator's block size.
        extra_keys: the extra keys ``allocate`` will be given (salt, adapter id, ...).

    Returns:
        The chain of the prompt's full blocks, with what it was computed from.

    Raises:
        InvalidArgumentError: bad token ids, block size or extra keys.
    """
    if type(block_size) is not int or block_size < 1:
        raise InvalidArgumentError(f"block_size must be a positive int, got {block_size!r}")
    if type(token_ids) is np.ndarray and token_ids.dtype is TOKEN_DTYPE and token_ids.ndim == 1:
        tokens = token_ids
    else:
        tokens = as_token_array(token_ids, "token_ids")
    extra = b"" if extra_keys is None else encode_extra_keys(extra_keys)
    num_full = len(tokens) // block_size
    chain = hash_token_blocks(root_hash(extra), tokens, block_size, num_full)
    keys, digests = (tuple(k) for k in zip(*chain)) if chain else ((), ())
    deque(map(hash, keys), 0)  # bytes caches its hash: the dict lookups reuse it
    return PromptBlockHashes(block_size, extra, tokens[: num_full * block_size].tobytes(),
                             keys, digests)

