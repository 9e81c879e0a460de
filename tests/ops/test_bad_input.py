"""Bad input: every case raises a typed error naming the argument and what was expected.

Shape, dtype, device and layout errors are found from metadata alone; value errors (ids,
lengths, slots) are raised in validation mode and masked otherwise.
"""

import pytest
import torch

import pagedattn.ops as ops
from pagedattn.ops import config


def decode_inputs(**overrides):
    kc, vc = ops.allocate_kv_cache(8, 4, 2, 64, torch.float32, "cpu")
    kc.normal_()
    vc.normal_()
    args = dict(query=torch.randn(3, 4, 64), key_cache=kc, value_cache=vc,
                block_tables=torch.zeros(3, 2, dtype=torch.int32), seq_lens=torch.tensor([1, 5, 8], dtype=torch.int32))
    args.update(overrides)
    return args


def call_decode(**overrides):
    kwargs = {k: overrides.pop(k) for k in list(overrides) if k not in
              ("query", "key_cache", "value_cache", "block_tables", "seq_lens")}
    args = decode_inputs(**overrides)
    return ops.paged_decode_attention(args["query"], args["key_cache"], args["value_cache"], args["block_tables"],
                                      args["seq_lens"], **kwargs)


def call_cache(**overrides):
    kc, vc = ops.allocate_kv_cache(4, 4, 2, 64, torch.float32, "cpu")
    args = dict(key=torch.randn(5, 2, 64), value=torch.randn(5, 2, 64), key_cache=kc, value_cache=vc,
                slot_mapping=torch.arange(5))
    validate = overrides.pop("validate", False)
    args.update(overrides)
    ops.reshape_and_cache(args["key"], args["value"], args["key_cache"], args["value_cache"], args["slot_mapping"],
                          validate=validate)


def call_copy(key_caches=None, value_caches=None, block_mapping=None, validate=False):
    kc, vc = ops.allocate_kv_cache(4, 4, 2, 64, torch.float32, "cpu")
    ops.copy_blocks(key_caches if key_caches is not None else [kc],
                    value_caches if value_caches is not None else [vc],
                    block_mapping if block_mapping is not None else torch.tensor([[0, 1]]), validate=validate)


def call_swap(src=None, dst=None, block_mapping=None):
    a, _ = ops.allocate_kv_cache(4, 4, 2, 64, torch.float32, "cpu")
    b, _ = ops.allocate_kv_cache(3, 4, 2, 64, torch.float32, "cpu")
    ops.swap_blocks(src if src is not None else a, dst if dst is not None else b,
                    block_mapping if block_mapping is not None else torch.tensor([[0, 1]]))


def call_prefill(**overrides):
    kc, vc = ops.allocate_kv_cache(8, 4, 2, 64, torch.float32, "cpu")
    kc.normal_()
    vc.normal_()
    args = dict(query=torch.randn(6, 4, 64), block_tables=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32),
                seq_lens=torch.tensor([5, 8], dtype=torch.int32), cu_seqlens_q=torch.tensor([0, 2, 6], dtype=torch.int32))
    kwargs = {k: overrides.pop(k) for k in list(overrides) if k not in args}
    args.update(overrides)
    return ops.paged_prefill_attention(args["query"], kc, vc, args["block_tables"], args["seq_lens"],
                                       args["cu_seqlens_q"], **kwargs)


kc_nhd, vc_nhd = ops.allocate_kv_cache(8, 4, 2, 64, torch.float32, "cpu", layout="NHD")

CASES = [
    # (name, thunk, error type, message substring)
    ("query not a tensor", lambda: call_decode(query=[1.0]), TypeError, "query must be a torch.Tensor"),
    ("query 2-d", lambda: call_decode(query=torch.randn(3, 64), scale=0.1), ValueError, "query must have 3 dimensions"),
    ("query int dtype", lambda: call_decode(query=torch.ones(3, 4, 64, dtype=torch.int32)), TypeError,
     "query must have dtype float16, bfloat16, float32"),
    ("query float64", lambda: call_decode(query=torch.randn(3, 4, 64, dtype=torch.float64)), TypeError,
     "query must have dtype"),
    ("cache dtype differs from query", lambda: call_decode(query=torch.randn(3, 4, 64, dtype=torch.float16)),
     TypeError, "key_cache must have the same dtype as query"),
    ("value cache dtype differs", lambda: call_decode(value_cache=torch.randn(8, 4, 2, 64, dtype=torch.float16)),
     TypeError, "value_cache must have the same dtype as key_cache"),
    ("value cache shape differs", lambda: call_decode(value_cache=torch.randn(8, 4, 1, 64)), ValueError,
     "value_cache must have the same shape as key_cache"),
    ("cache 3-d", lambda: call_decode(key_cache=torch.randn(8, 4, 64), value_cache=torch.randn(8, 4, 64)),
     ValueError, "key_cache must have 4 dimensions"),
    ("block size 3", lambda: call_decode(key_cache=torch.randn(8, 3, 2, 64), value_cache=torch.randn(8, 3, 2, 64)),
     ValueError, "block_size (dim 1) must be a power of two from 1 to 256, got 3"),
    ("block size 512", lambda: call_decode(key_cache=torch.randn(2, 512, 2, 64), value_cache=torch.randn(2, 512, 2, 64)),
     ValueError, "got 512"),
    ("head size 72", lambda: call_decode(query=torch.randn(3, 4, 72), key_cache=torch.randn(8, 4, 2, 72),
                                         value_cache=torch.randn(8, 4, 2, 72)),
     ValueError, "head_size must be one of (64, 80, 96, 112, 128, 192, 256), got 72"),
    ("query head size differs", lambda: call_decode(query=torch.randn(3, 4, 128)), ValueError,
     "query head_size (dim 2) must equal the cache's head_size 64"),
    ("heads not divisible", lambda: call_decode(query=torch.randn(3, 3, 64)), ValueError,
     "num_heads (3) must be a multiple of the cache's num_kv_heads (2)"),
    ("query last dim strided", lambda: call_decode(query=torch.randn(3, 4, 128)[:, :, ::2]), ValueError,
     "query must be contiguous in its last dimension"),
    ("cache last dim strided", lambda: call_decode(key_cache=torch.randn(8, 4, 2, 128)[..., ::2],
                                                   value_cache=torch.randn(8, 4, 2, 128)[..., ::2]),
     ValueError, "key_cache must be contiguous in its last dimension"),
    ("block_tables int64", lambda: call_decode(block_tables=torch.zeros(3, 2, dtype=torch.int64)), TypeError,
     "block_tables must have dtype int32"),
    ("block_tables wrong rows", lambda: call_decode(block_tables=torch.zeros(2, 2, dtype=torch.int32)), ValueError,
     "block_tables must have shape [num_seqs, max_blocks_per_seq] with num_seqs = 3"),
    ("block_tables no columns", lambda: call_decode(block_tables=torch.zeros(3, 0, dtype=torch.int32)), ValueError,
     "at least one column"),
    ("seq_lens float", lambda: call_decode(seq_lens=torch.ones(3)), TypeError, "seq_lens must have dtype int32"),
    ("seq_lens wrong length", lambda: call_decode(seq_lens=torch.ones(4, dtype=torch.int32)), ValueError,
     "seq_lens must have shape [num_seqs]"),
    ("seq_lens strided", lambda: call_decode(seq_lens=torch.ones(6, dtype=torch.int32)[::2]), ValueError,
     "seq_lens must be contiguous"),
    ("out wrong shape", lambda: call_decode(out=torch.empty(3, 4, 32)), ValueError,
     "out must have shape [num_seqs, num_heads, head_size]"),
    ("out wrong dtype", lambda: call_decode(out=torch.empty(3, 4, 64, dtype=torch.float16)), TypeError,
     "out must have the same dtype as query"),
    ("lse wrong dtype", lambda: call_decode(lse=torch.empty(3, 4, dtype=torch.float16)), TypeError,
     "lse must have dtype float32"),
    ("lse wrong shape", lambda: call_decode(lse=torch.empty(3, 5)), ValueError, "lse must have shape [num_seqs, num_heads]"),
    ("alibi wrong shape", lambda: call_decode(alibi_slopes=torch.ones(2)), ValueError,
     "alibi_slopes must have shape [num_heads]"),
    ("alibi wrong dtype", lambda: call_decode(alibi_slopes=torch.ones(4, dtype=torch.float16)), TypeError,
     "alibi_slopes must have dtype float32"),
    ("negative window", lambda: call_decode(sliding_window=-1), ValueError, "sliding_window must be >= 0, got -1"),
    ("negative softcap", lambda: call_decode(softcap=-2.0), ValueError, "softcap must be >= 0.0"),
    ("nan scale", lambda: call_decode(scale=float("nan")), ValueError, "scale must be finite"),
    ("seq_lens value too long (validate)", lambda: call_decode(seq_lens=torch.tensor([1, 9, 2], dtype=torch.int32),
                                                               validate=True),
     ValueError, "seq_lens[1] = 9 is outside [0, 8]"),
    ("negative seq_len (validate)", lambda: call_decode(seq_lens=torch.tensor([1, -2, 2], dtype=torch.int32),
                                                        validate=True),
     ValueError, "seq_lens[1] = -2"),
    ("block id beyond pool (validate)", lambda: call_decode(block_tables=torch.tensor([[0, 0], [0, 8], [1, 2]],
                                                                                      dtype=torch.int32), validate=True),
     ValueError, "block_tables[1, 1] = 8 is not a block id in [0, 8)"),
    ("cache key wrong heads", lambda: call_cache(key=torch.randn(5, 1, 64)), ValueError,
     "key must have shape [num_tokens, num_kv_heads, head_size] = (5, 2, 64)"),
    ("cache value dtype", lambda: call_cache(value=torch.randn(5, 2, 64, dtype=torch.float16)), TypeError,
     "value must have the same dtype as key_cache"),
    ("slot_mapping float", lambda: call_cache(slot_mapping=torch.arange(5.0)), TypeError,
     "slot_mapping must have dtype int64, int32"),
    ("slot_mapping wrong length", lambda: call_cache(slot_mapping=torch.arange(4)), ValueError,
     "slot_mapping must have shape [num_tokens]"),
    ("slot beyond cache (validate)", lambda: call_cache(slot_mapping=torch.tensor([0, 1, 16, 2, 3]), validate=True),
     ValueError, "slot_mapping[2] = 16 is beyond the cache's 16 slots"),
    ("copy layers mismatch", lambda: call_copy(value_caches=[]), ValueError,
     "key_caches and value_caches must have one cache per layer each, got 1 and 0"),
    ("copy caches differ in shape", lambda: call_copy(value_caches=[torch.randn(5, 4, 2, 64)]), ValueError,
     "value_caches[0] must have the shape and strides of key_caches[0]"),
    ("copy mapping shape", lambda: call_copy(block_mapping=torch.tensor([0, 1])), ValueError,
     "block_mapping must have 2 dimensions"),
    ("copy mapping 3 columns", lambda: call_copy(block_mapping=torch.tensor([[0, 1, 2]])), ValueError,
     "block_mapping must have shape [num_pairs, 2] (src, dst)"),
    ("copy id beyond pool (validate)", lambda: call_copy(block_mapping=torch.tensor([[0, 4]]), validate=True),
     ValueError, "block_mapping[0] destination block id 4 is not in [0, 4)"),
    ("copy duplicate destinations (validate)", lambda: call_copy(block_mapping=torch.tensor([[0, 2], [1, 2]]),
                                                                 validate=True),
     ValueError, "destination ids must be distinct"),
    ("copy chained pairs (validate)", lambda: call_copy(block_mapping=torch.tensor([[0, 1], [1, 2]]), validate=True),
     ValueError, "block 1 is both a source and a destination"),
    ("copy sparse block layout", lambda: call_copy(key_caches=[torch.randn(4, 8, 2, 64)[:, ::2]],
                                                   value_caches=[torch.randn(4, 8, 2, 64)[:, ::2]]),
     ValueError, "must store each block densely"),
    ("swap id beyond destination", lambda: call_swap(block_mapping=torch.tensor([[0, 3]])), ValueError,
     "block_mapping[0] destination block id 3 is not in [0, 3)"),
    ("swap negative source", lambda: call_swap(block_mapping=torch.tensor([[-1, 0]])), ValueError,
     "block_mapping[0] source block id -1 is not in [0, 4)"),
    ("swap block shape differs", lambda: call_swap(dst=torch.randn(3, 4, 1, 64)), ValueError,
     "dst_cache must have the block shape of src_cache"),
    ("swap strides differ", lambda: call_swap(dst=kc_nhd), ValueError, "dst_cache must have the strides of src_cache"),
    ("swap dtype differs", lambda: call_swap(dst=torch.randn(3, 4, 2, 64, dtype=torch.float16)), TypeError,
     "dst_cache must have the same dtype as src_cache"),
    ("allocate bad layout", lambda: ops.allocate_kv_cache(4, 4, 2, 64, torch.float32, "cpu", layout="XYZ"), ValueError,
     "layout must be one of ('NHD', 'HND')"),
    ("allocate bad block size", lambda: ops.allocate_kv_cache(4, 12, 2, 64, torch.float32, "cpu"), ValueError,
     "block_size must be a power of two from 1 to 256, got 12"),
    ("prefill cu_seqlens_q int64", lambda: call_prefill(cu_seqlens_q=torch.tensor([0, 2, 6])), TypeError,
     "cu_seqlens_q must have dtype int32"),
    ("prefill cu_seqlens_q wrong length", lambda: call_prefill(cu_seqlens_q=torch.tensor([0, 6], dtype=torch.int32)),
     ValueError, "cu_seqlens_q must have shape [num_seqs + 1] = (3,)"),
    ("prefill out wrong shape", lambda: call_prefill(out=torch.empty(5, 4, 64)), ValueError,
     "out must have shape [num_tokens, num_heads, head_size]"),
    ("prefill lse wrong shape", lambda: call_prefill(lse=torch.empty(2, 4)), ValueError,
     "lse must have shape [num_tokens, num_heads] = (6, 4)"),
    ("prefill negative hint", lambda: call_prefill(max_query_len=-3), ValueError, "max_query_len must be >= 0"),
    ("prefill cu not ending at num_tokens (validate)",
     lambda: call_prefill(cu_seqlens_q=torch.tensor([0, 2, 5], dtype=torch.int32), validate=True),
     ValueError, "cu_seqlens_q[-1] must equal num_tokens = 6"),
    ("prefill cu decreasing (validate)",
     lambda: call_prefill(cu_seqlens_q=torch.tensor([0, 7, 6], dtype=torch.int32), validate=True),
     ValueError, "cu_seqlens_q must not decrease"),
    ("prefill more queries than context (validate)",
     lambda: call_prefill(seq_lens=torch.tensor([1, 8], dtype=torch.int32), validate=True),
     ValueError, "sequence 0 has 2 query tokens but seq_lens[0] = 1"),
    ("prefill hint below the longest query (validate)", lambda: call_prefill(max_query_len=3, validate=True),
     ValueError, "max_query_len = 3 is below the longest query (4 tokens)"),
    ("unknown backend", lambda: config.set_backend("cuda-graph"), ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("name,thunk,error,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_typed_error_naming_the_argument(name, thunk, error, message):
    with pytest.raises(error) as info:
        thunk()
    assert message in str(info.value), f"{name}: message was {info.value}"


def test_there_are_at_least_thirty_cases():
    assert len(CASES) >= 30


def test_validation_mode_from_config_raises_without_the_argument():
    config.set_validation(True)
    try:
        with pytest.raises(ValueError, match=r"slot_mapping\[0\] = 99"):
            call_cache(slot_mapping=torch.tensor([99, 0, 1, 2, 3]))
    finally:
        config.set_validation(False)
    call_cache(slot_mapping=torch.tensor([99, 0, 1, 2, 3]))  # masked: skipped, no error


def test_errors_are_raised_while_tracing_with_fake_tensors():
    """The fake implementation checks too, so torch.compile reports bad shapes at trace time."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        args = decode_inputs(query=torch.randn(3, 3, 64))
        with pytest.raises(ValueError, match="must be a multiple"):
            ops.paged_decode_attention(args["query"], args["key_cache"], args["value_cache"], args["block_tables"],
                                       args["seq_lens"])


def gpu_cases():
    """Bad input on CUDA tensors: the checks run before any backend, so every backend fails the same way."""
    def caches(dtype=torch.float32):
        kc, vc = ops.allocate_kv_cache(4, 4, 2, 64, dtype, "cuda")
        return kc.zero_(), vc.zero_()

    def decode(query=None, seq_lens=None, key_cache=None, validate=False):
        kc, vc = caches()
        ops.paged_decode_attention(query if query is not None else torch.randn(2, 4, 64, device="cuda"),
                                   key_cache if key_cache is not None else kc, vc,
                                   torch.zeros(2, 2, dtype=torch.int32, device="cuda"),
                                   seq_lens if seq_lens is not None else torch.tensor([1, 5], dtype=torch.int32,
                                                                                      device="cuda"),
                                   validate=validate)

    def cache(slot_mapping, validate=False):
        kc, vc = caches()
        new = torch.randn(3, 2, 64, device="cuda")
        ops.reshape_and_cache(new, new, kc, vc, slot_mapping.cuda(), validate=validate)

    def copy(mapping, validate=False):
        kc, vc = caches()
        ops.copy_blocks([kc], [vc], mapping.cuda(), validate=validate)

    return [
        ("decode dtype mismatch", lambda: decode(query=torch.randn(2, 4, 64, device="cuda", dtype=torch.float16)),
         TypeError, "key_cache must have the same dtype as query"),
        ("decode cache on the CPU", lambda: decode(key_cache=torch.zeros(4, 4, 2, 64)), ValueError,
         "value_cache must be on the same device as key_cache"),
        ("decode seq_lens int64", lambda: decode(seq_lens=torch.ones(2, dtype=torch.int64, device="cuda")), TypeError,
         "seq_lens must have dtype int32"),
        ("decode seq_len too long (validate)",
         lambda: decode(seq_lens=torch.tensor([1, 9], dtype=torch.int32, device="cuda"), validate=True),
         ValueError, "seq_lens[1] = 9 is outside [0, 8]"),
        ("slot_mapping float", lambda: cache(torch.arange(3.0)), TypeError,
         "slot_mapping must have dtype int64, int32"),
        ("slot beyond cache (validate)", lambda: cache(torch.tensor([0, 16, 1]), validate=True), ValueError,
         "slot_mapping[1] = 16 is beyond the cache's 16 slots"),
        ("copy mapping 3 columns", lambda: copy(torch.tensor([[0, 1, 2]])), ValueError,
         "block_mapping must have shape [num_pairs, 2] (src, dst)"),
        ("copy chained pairs (validate)", lambda: copy(torch.tensor([[0, 1], [1, 2]]), validate=True), ValueError,
         "block 1 is both a source and a destination"),
    ]


GPU_CASES = gpu_cases()


@pytest.mark.gpu
@pytest.mark.parametrize("name,thunk,error,message", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_bad_input_on_cuda_tensors_is_the_same_on_every_backend(gpu_backend, name, thunk, error, message):
    with pytest.raises(error) as info:
        thunk()
    assert message in str(info.value), f"{name} ({gpu_backend}): message was {info.value}"
