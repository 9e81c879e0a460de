"""Block hashes for prefix caching.

Every full block is identified by a chain::

    root        = BLAKE2b(b"pagedattn.alloc.root/1\\x00" + encode_extra_keys(extra_keys))
    key_i       = hash_{i-1} + token_ids_i.astype("<i4").tobytes()      (hash_{-1} = root)
    hash_i      = BLAKE2b(key_i)

with BLAKE2b-512 (RFC 7693, :func:`hashlib.blake2b` with its default 64-byte digest), so
``hash_i`` commits to the extra keys (per-tenant salt, adapter id, ...) and to every token of
the prefix up to and including block ``i``. BLAKE2b is a cryptographic hash of the standard
library, collision resistant (about 2**256 work for a 512-bit digest). It was picked over
SHA-256 for speed: CPython's hashlib builds SHA-256 through OpenSSL's EVP layer, whose per-call
overhead dominates for these short messages (BLAKE2b hashes a 16-token block in about half the
time); with 16 int32 tokens a key is exactly one 128-byte BLAKE2b block.

How collisions are ruled out (a hit must be exact):

* the prefix-cache map is keyed by ``key_i`` itself, not by the digest, so a lookup compares
  the block's own token ids and its parent's hash byte for byte (Python ``dict`` equality on
  ``bytes``): the last link of a hit is checked exactly;
* the rest of the prefix is compared through ``hash_{i-1}``: a wrong hit needs two different
  prefixes with the same 512-bit BLAKE2b digest, a collision of a cryptographic hash (about
  2**256 work; none is known), which is treated as impossible;
* the encoded extra keys are stored on each cached block and compared on every hit, so blocks
  under different salts or adapters are never shared, whatever the hash does.

Token ids are hashed as little-endian int32, the canonical token dtype of the allocator;
:func:`as_token_array` rejects ids outside the int32 range rather than truncating them.

Cost: hashing is the floor of allocating a prompt (about 8,000 digests for 256 prompts of 512
tokens; one BLAKE2b compression per block, since a key is one 128-byte BLAKE2b block). The
allocator cuts a prompt's blocks into ``bytes`` in one call (:func:`split_token_blocks`, a
cached ``struct`` unpacking of the array's buffer), hashes each key with a copy of an empty
BLAKE2b state (cheaper than the constructor, which parses its keyword parameters) and takes,
evicts and registers blocks in one pass
(:meth:`~pagedattn.alloc.block_pool.BlockPool.get_new_cached_blocks`); the digests are the
same. Registration is eager, never deferred: a block is in the map (and counts as cached) from
the ``allocate`` that fills it, so hits, evictions and which block holds a key are the same
whatever the caller looks at next. An engine can also hash a prompt when its request arrives
(:func:`~pagedattn.alloc.prompt_hashes.hash_prompt_blocks`, the same digests) and pass them to
``allocate(..., block_hashes=...)``, which then hashes nothing.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from pagedattn.alloc.errors import InvalidArgumentError

__all__ = [
    "TOKEN_DTYPE",
    "BLOCK_HASH_BYTES",
    "block_digest",
    "encode_extra_keys",
    "root_hash",
    "as_token_array",
    "hash_block_tokens",
    "hash_token_blocks",
    "split_token_blocks",
]

TOKEN_DTYPE = np.dtype("<i4")
"""Canonical dtype of token ids (they are hashed as these bytes)."""

BLOCK_HASH_BYTES = 64
"""Length of a block hash (BLAKE2b-512 digest)."""

_ROOT_TAG = b"pagedattn.alloc.root/1\x00"
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
_hash_fn = hashlib.blake2b  # the block hash constructor (default digest: 64 bytes)
# An empty BLAKE2b state: each key is hashed by a copy of it, cheaper than the constructor (which
# parses its keyword parameters). Called as ``empty.copy()``, not through a bound ``copy`` kept in a
# local: CPython 3.11 specializes the method-call form (~120 fewer instructions a digest, callgrind).
_EMPTY_BLAKE2B = hashlib.blake2b()
_root_cache: dict[bytes, bytes] = {}


def _encode(value: Any, out: list[bytes]) -> None:
    if value is None:
        out.append(b"N")
    elif isinstance(value, bool):
        out.append(b"T" if value else b"F")
    elif isinstance(value, (int, np.integer)):
        text = str(int(value)).encode()
        out.append(b"I" + struct.pack("<Q", len(text)) + text)
    elif isinstance(value, (float, np.floating)):
        text = float(value).hex().encode()
        out.append(b"D" + struct.pack("<Q", len(text)) + text)
    elif isinstance(value, str):
        data = value.encode("utf-8")
        out.append(b"S" + struct.pack("<Q", len(data)) + data)
    elif isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        out.append(b"B" + struct.pack("<Q", len(data)) + data)
    elif isinstance(value, (tuple, list)):
        out.append(b"(" + struct.pack("<Q", len(value)))
        for item in value:
            _encode(item, out)
        out.append(b")")
    else:
        raise InvalidArgumentError(
            f"extra_keys may hold None, bool, int, float, str, bytes and tuples of them; "
            f"got {type(value).__name__}: {value!r}")


def block_digest(data: bytes) -> bytes:
    """The block hash of ``data`` (BLAKE2b-512)."""
    return _hash_fn(data).digest()


def encode_extra_keys(extra_keys: Any) -> bytes:
    """Serialize extra keys to bytes, unambiguously (type-tagged and length-prefixed).

    Args:
        extra_keys: ``None`` or ``()`` for none, else a value or tuple of values of type None,
            bool, int, float, str or bytes (nested tuples allowed), e.g. ``("tenant-7", 3)``.

    Returns:
        ``b""`` for no extra keys, else a prefix-free encoding: different values never give the
        same bytes.
    """
    if extra_keys is None or extra_keys == ():
        return b""
    out: list[bytes] = []
    _encode(extra_keys, out)
    return b"".join(out)


def root_hash(encoded_extra_keys: bytes) -> bytes:
    """The parent hash of a sequence's first block, committing to its extra keys."""
    digest = _root_cache.get(encoded_extra_keys)
    if digest is None:
        digest = _hash_fn(_ROOT_TAG + encoded_extra_keys).digest()
        if len(_root_cache) >= 65536:  # a memo only: clearing it changes no hash
            _root_cache.clear()
        _root_cache[encoded_extra_keys] = digest
    return digest


def as_token_array(token_ids: Sequence[int] | np.ndarray, name: str = "token_ids") -> np.ndarray:
    """Token ids as a 1-D array of :data:`TOKEN_DTYPE`, without copying when already so.

    Raises:
        InvalidArgumentError: if ``token_ids`` is not 1-D integers in the int32 range.
    """
    arr = token_ids
    if type(arr) in (list, tuple) and arr and type(arr[0]) is not bool:
        # Fast path for Python ints: one struct call packs them as little-endian int32, range
        # checked (struct.error beyond int32, for floats, strings, nested lists, ...: the numpy
        # path below then reports exactly what is wrong). All-bool lists take the numpy path,
        # which rejects them.
        n = len(arr)
        try:
            data = (_int32_packers.get(n) or _int32_packer(n))(*arr)
        except (struct.error, TypeError, OverflowError):
            pass
        else:
            return np.frombuffer(bytearray(data), TOKEN_DTYPE)
    if not isinstance(arr, np.ndarray):
        try:
            arr = np.asarray(arr)
        except (OverflowError, TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"{name} must be a sequence of int32 token ids: {exc}") from None
    if arr.ndim != 1:
        raise InvalidArgumentError(f"{name} must be a 1-D sequence of token ids, got shape {arr.shape}")
    if arr.dtype != TOKEN_DTYPE:
        if arr.size == 0:
            return np.empty(0, TOKEN_DTYPE)
        if arr.dtype.kind not in "iu":
            raise InvalidArgumentError(f"{name} must hold integer token ids, got dtype {arr.dtype}")
        if arr.dtype.itemsize >= 4 and (int(arr.min()) < _INT32_MIN or int(arr.max()) > _INT32_MAX):
            raise InvalidArgumentError(
                f"{name} must be int32 token ids; got values outside [{_INT32_MIN}, {_INT32_MAX}]")
        arr = arr.astype(TOKEN_DTYPE)
    return arr


def _int32_packer(n: int) -> Callable[..., bytes]:
    if len(_int32_packers) >= 4096:  # a memo only
        _int32_packers.clear()
    pack = _int32_packers[n] = struct.Struct(f"<{n}i").pack
    return pack


_int32_packers: dict[int, Callable[..., bytes]] = {}


def hash_block_tokens(parent_hash: bytes, token_bytes: bytes) -> tuple[bytes, bytes]:
    """Hash one full block.

    Args:
        parent_hash: hash of the previous block, or :func:`root_hash` for the first block.
        token_bytes: the block's token ids as :data:`TOKEN_DTYPE` bytes.

    Returns:
        ``(block_key, block_hash)``: the exact hashed bytes (the prefix-cache key) and their
        BLAKE2b digest.
    """
    key = parent_hash + token_bytes
    return key, _hash_fn(key).digest()


def split_token_blocks(tokens: np.ndarray, block_size: int, num_blocks: int) -> tuple[bytes, ...]:
    """The first ``num_blocks`` full blocks of ``tokens`` as :data:`TOKEN_DTYPE` bytes, one
    ``bytes`` object per block, cut in one call (a cached :class:`struct.Struct` of
    ``num_blocks`` fields of ``4 * block_size`` raw bytes, unpacked from the array's buffer).

    Args:
        tokens: 1-D :data:`TOKEN_DTYPE` token ids holding at least ``num_blocks`` full blocks.
        block_size: tokens per block.
        num_blocks: how many blocks to return.

    Returns:
        A tuple of ``num_blocks`` ``bytes`` objects, the first block first.
    """
    unpack = _splitters.get((block_size, num_blocks)) or _splitter(block_size, num_blocks)
    try:
        return unpack(tokens)
    except (BufferError, TypeError, ValueError):  # not contiguous: no plain buffer
        return unpack(np.ascontiguousarray(tokens[: num_blocks * block_size]))


def _splitter(block_size: int, num_blocks: int) -> Callable[[Any], tuple[bytes, ...]]:
    if len(_splitters) >= 4096:  # a memo only
        _splitters.clear()
    field = f"{block_size * TOKEN_DTYPE.itemsize}s"  # "s" keeps every byte, zeros included
    unpack = _splitters[(block_size, num_blocks)] = struct.Struct(field * num_blocks).unpack_from
    return unpack


_splitters: dict[tuple[int, int], Callable[[Any], tuple[bytes, ...]]] = {}


def hash_token_blocks(parent_hash: bytes, tokens: np.ndarray, block_size: int,
                      num_blocks: int | None = None) -> list[tuple[bytes, bytes]]:
    """Hash the full blocks of ``tokens`` along the chain (see the module docstring).

    Args:
        parent_hash: the hash the chain starts from (a root hash or a previous block's hash).
        tokens: 1-D :data:`TOKEN_DTYPE` token ids, the first block first.
        block_size: tokens per block.
        num_blocks: how many blocks to hash (default: all full blocks).

    Returns:
        ``[(block_key, block_hash), ...]``, one per full block.
    """
    if num_blocks is None:
        num_blocks = len(tokens) // block_size
    out: list[tuple[bytes, bytes]] = []
    # Copying an empty BLAKE2b state is cheaper than calling the constructor (same digests).
    empty = _EMPTY_BLAKE2B if _hash_fn is hashlib.blake2b else _hash_fn()
    for chunk in split_token_blocks(tokens, block_size, num_blocks):
        key = parent_hash + chunk
        h = empty.copy()
        h.update(key)
        parent_hash = h.digest()
        out.append((key, parent_hash))
    return out
