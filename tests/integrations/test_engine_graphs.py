"""Decode CUDA graphs, the parts that run anywhere: bucket sizes, config, when graphs are skipped.
Replays themselves are tested on the GPU (test_engine_gpu.py)."""

from __future__ import annotations

import pytest
import torch
from pagedattn.integrations.engine import EngineConfig
from pagedattn.integrations.engine.runner import maybe_capture_graphs
from pagedattn.integrations.hf.cuda_graphs import DecodeGraphs, graph_batch_sizes


@pytest.mark.parametrize("max_num_seqs, sizes", [
    (1, [1]), (2, [1, 2]), (3, [1, 2, 4]), (4, [1, 2, 4]), (5, [1, 2, 4, 8]), (8, [1, 2, 4, 8]),
    (9, [1, 2, 4, 8, 16]), (20, [1, 2, 4, 8, 16, 24]),
])
def test_graph_batch_sizes_cover_every_batch(max_num_seqs, sizes):
    assert graph_batch_sizes(max_num_seqs) == sizes
    for s in range(1, max_num_seqs + 1):
        assert any(b >= s for b in sizes)


def test_graph_batch_sizes_256():
    sizes = graph_batch_sizes(256)
    assert sizes[:4] == [1, 2, 4, 8] and sizes[-1] == 256 and len(sizes) == 35
    assert all(b - a == 8 for a, b in zip(sizes[3:], sizes[4:]))


def test_graph_batch_sizes_rejects_zero():
    with pytest.raises(ValueError, match="max_num_seqs"):
        graph_batch_sizes(0)


def test_enforce_eager_must_be_bool():
    with pytest.raises(TypeError, match="EngineConfig.enforce_eager"):
        EngineConfig(num_gpu_blocks=8, enforce_eager="yes")


def test_decode_graphs_need_cuda():
    with pytest.raises(RuntimeError, match="CUDA"):
        DecodeGraphs(lambda i, p: None, [], 16, 4, 64, 10, torch.device("cpu"))


class _Runner:
    def __init__(self, device):
        self.device = torch.device(device)
        self.calls = 0

    def capture_decode_graphs(self, max_num_seqs, max_model_len):
        self.calls += 1


@pytest.mark.parametrize("eager", [True, False])
def test_no_graphs_off_cuda_or_when_eager(eager):
    runner = _Runner("cpu")
    assert maybe_capture_graphs(runner, EngineConfig(num_gpu_blocks=8, enforce_eager=eager), 128) is None
    assert runner.calls == 0
