"""SamplingParams / EngineConfig validation and the batched sampler."""

from __future__ import annotations

import math

import pytest
import torch
from pagedattn.integrations.engine import EngineConfig, Sampler, SamplingParams
from pagedattn.integrations.engine.sampling import apply_top_k_top_p


# ------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("kwargs, exc, field", [
    (dict(block_size=0), ValueError, "block_size"),
    (dict(block_size=1.5), TypeError, "block_size"),
    (dict(num_gpu_blocks=0), ValueError, "num_gpu_blocks"),
    (dict(gpu_memory_utilization=0.0), ValueError, "gpu_memory_utilization"),
    (dict(gpu_memory_utilization=1.5), ValueError, "gpu_memory_utilization"),
    (dict(swap_space_gib=-1), ValueError, "swap_space_gib"),
    (dict(max_num_seqs=0), ValueError, "max_num_seqs"),
    (dict(max_num_batched_tokens=8, max_num_seqs=16), ValueError, "max_num_batched_tokens"),
    (dict(preemption_mode="evict"), ValueError, "preemption_mode"),
    (dict(enable_chunked_prefill=1), TypeError, "enable_chunked_prefill"),
    (dict(watermark=1.0), ValueError, "watermark"),
    (dict(enable_chunked_prefill=False, max_model_len=16384), ValueError, "max_num_batched_tokens"),
])
def test_engine_config_errors_name_the_field(kwargs, exc, field):
    with pytest.raises(exc, match=f"EngineConfig.{field}"):
        EngineConfig(**kwargs)


def test_engine_config_defaults_and_overrides():
    cfg = EngineConfig()
    assert (cfg.block_size, cfg.max_num_seqs, cfg.max_num_batched_tokens) == (16, 1024, 8192)
    assert cfg.enable_chunked_prefill and cfg.enable_prefix_caching
    assert cfg.preemption_mode == "recompute" and cfg.num_gpu_blocks is None
    cfg2 = EngineConfig.from_kwargs(cfg, block_size=8)
    assert cfg2.block_size == 8 and cfg.block_size == 16
    with pytest.raises(TypeError, match="unknown EngineConfig field"):
        EngineConfig.from_kwargs(None, blocksize=8)
    with pytest.raises(AttributeError):
        cfg.not_a_field = 1  # slotted


@pytest.mark.parametrize("kwargs, exc, field", [
    (dict(n=0), ValueError, "n"),
    (dict(n=2, best_of=1), ValueError, "best_of"),
    (dict(temperature=-0.1), ValueError, "temperature"),
    (dict(temperature="hot"), TypeError, "temperature"),
    (dict(top_k=-2), ValueError, "top_k"),
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(top_p=1.1), ValueError, "top_p"),
    (dict(max_tokens=0), ValueError, "max_tokens"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(stop=[""]), ValueError, "stop"),
    (dict(logprobs=-1), ValueError, "logprobs"),
    (dict(use_beam_search=True, n=4, beam_width=2), ValueError, "beam_width"),
    (dict(use_beam_search=True, stop=["x"]), ValueError, "stop"),
    (dict(early_stopping="sometimes"), ValueError, "early_stopping"),
])
def test_sampling_params_errors_name_the_field(kwargs, exc, field):
    with pytest.raises(exc, match=f"SamplingParams.{field}"):
        SamplingParams(**kwargs)


def test_sampling_params_derived():
    assert SamplingParams(temperature=0).greedy and SamplingParams(top_k=1).greedy
    assert not SamplingParams().greedy
    assert SamplingParams(n=2, best_of=5).num_seqs == 5
    assert SamplingParams(use_beam_search=True, beam_width=4, n=2).num_seqs == 4
    assert SamplingParams(stop="x", stop_token_ids=3).stop == ["x"]


# ---------------------------------------------------------------------------------- sampler
def _logits(rows=6, vocab=50, seed=0):
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax():
    logits = _logits()
    out = Sampler()(logits, [SamplingParams(temperature=0)] * logits.shape[0])
    assert out.token_ids == logits.argmax(-1).tolist()
    lp = torch.log_softmax(logits, -1)
    assert out.logprobs == pytest.approx(lp.max(-1).values.tolist(), abs=1e-5)
    assert out.top_logprobs == [None] * logits.shape[0]


def test_mixed_batch_greedy_rows_stay_greedy():
    logits = _logits()
    params = [SamplingParams(temperature=0 if i % 2 else 1.0) for i in range(6)]
    for seed in range(5):
        out = Sampler(seed)(logits, params)
        for i in range(1, 6, 2):
            assert out.token_ids[i] == int(logits[i].argmax())


def test_top_k_mask():
    logits = _logits(3, 20)
    masked = apply_top_k_top_p(logits, [3, 1, 20], None)
    for row, k in enumerate([3, 1, 20]):
        keep = torch.isfinite(masked[row])
        assert int(keep.sum()) == k
        assert set(keep.nonzero().flatten().tolist()) == set(logits[row].topk(k).indices.tolist())
        assert torch.equal(masked[row][keep], logits[row][keep])


def test_top_p_mask():
    probs = torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.1, 0.4, 0.2, 0.3], [0.97, 0.01, 0.01, 0.01]])
    masked = apply_top_k_top_p(probs.log(), None, [0.5, 0.75, 0.5])
    keep = torch.isfinite(masked)
    assert keep[0].tolist() == [False, True, False, True]     # 0.4 < 0.5, then 0.4 + 0.3 covers it
    assert keep[1].tolist() == [False, True, True, True]      # 0.7 < 0.75: one more
    assert keep[2].tolist() == [True, False, False, False]    # the top token always stays
    # top-k first, then top-p on what is left
    both = apply_top_k_top_p(probs.log(), [2, 2, 2], [0.99, 0.99, 0.99])
    assert torch.isfinite(both).sum(-1).tolist() == [2, 2, 2]


def test_sampled_tokens_respect_top_k_and_top_p():
    logits = _logits(1, 30).repeat(400, 1)
    sampler = Sampler(7)
    out = sampler(logits, [SamplingParams(top_k=4)] * 400)
    assert set(out.token_ids) <= set(logits[0].topk(4).indices.tolist())
    assert len(set(out.token_ids)) > 1
    probs = torch.softmax(logits[0], -1)
    order = probs.argsort(descending=True)
    nucleus = set(order[: int((probs[order].cumsum(0) < 0.6).sum()) + 1].tolist())
    out = sampler(logits, [SamplingParams(top_p=0.6)] * 400)
    assert set(out.token_ids) <= nucleus


def test_sampling_follows_the_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]]).repeat(20000, 1)
    out = Sampler(3)(logits, [SamplingParams(temperature=1.0)] * 20000)
    freq = torch.bincount(torch.tensor(out.token_ids), minlength=4).float() / 20000
    assert torch.allclose(freq, torch.softmax(logits[0], -1), atol=0.015)
    hot = Sampler(3)(logits[:2000], [SamplingParams(temperature=0.05)] * 2000)
    assert hot.token_ids.count(2) == 2000


def test_seeded_rows_are_reproducible_whatever_the_batch():
    logits = _logits(8, 40)
    p = SamplingParams(temperature=1.0, seed=123)
    sampler = Sampler(0)
    gen_a = sampler.make_generator(123)
    a = [sampler(logits[i:i + 1], [p], [gen_a]).token_ids[0] for i in range(8)]
    # the same request's rows in a batch with other (unseeded) rows, another engine seed
    sampler2 = Sampler(99)
    gen_b = sampler2.make_generator(123)
    b = []
    for i in range(8):
        batch = torch.cat([logits[(i + 3) % 8:(i + 3) % 8 + 1], logits[i:i + 1]])
        b.append(sampler2(batch, [SamplingParams(), p], [None, gen_b]).token_ids[1])
    assert a == b
    gen_c = sampler.make_generator(124)
    c = [sampler(logits[i:i + 1], [SamplingParams(seed=124)], [gen_c]).token_ids[0]
         for i in range(8)]
    assert c != a


def test_rows_repeat_a_logits_row_for_parallel_samples():
    logits = _logits(2, 1000)
    out = Sampler(1)(logits, [SamplingParams(temperature=2.0)] * 6, rows=[1, 1, 1, 1, 0, 0])
    assert len(set(out.token_ids[:4])) > 1


def test_logprobs():
    logits = _logits(4, 25)
    out = Sampler()(logits, [SamplingParams(logprobs=3), SamplingParams(logprobs=0),
                             SamplingParams(), SamplingParams(temperature=0, logprobs=5)])
    lp = torch.log_softmax(logits, -1)
    for row in (0, 1, 3):
        tok = out.token_ids[row]
        assert out.logprobs[row] == pytest.approx(float(lp[row, tok]), abs=1e-5)
        top = out.top_logprobs[row]
        assert top[tok] == pytest.approx(float(lp[row, tok]), abs=1e-5)
        k = {0: 3, 1: 0, 3: 5}[row]
        for t in lp[row].topk(k).indices.tolist() if k else []:
            assert top[t] == pytest.approx(float(lp[row, t]), abs=1e-5)
        assert len(top) in (k, k + 1) or (k == 0 and len(top) == 1)
    assert out.top_logprobs[2] is None
    assert all(math.isfinite(x) for x in out.logprobs)
