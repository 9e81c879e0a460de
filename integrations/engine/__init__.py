"""Continuous-batching engine over the paged KV cache (the vLLM paper's system, nano-vllm style).

Example::

    from pagedattn.integrations.engine import LLM, SamplingParams

    llm = LLM("path/to/checkpoint", num_gpu_blocks=2048)          # num_gpu_blocks: profiled on CUDA
    outs = llm.generate(["Hello", "The capital of France is"],
                        SamplingParams(temperature=0.0, max_tokens=32))
    print(outs[0].outputs[0].text)
    llm.metrics.print_table()

Modules: :mod:`.config` (``EngineConfig``), :mod:`.sampling` (``SamplingParams``, the batched
``Sampler``), :mod:`.sequence` (sequences, groups, outputs), :mod:`.scheduler` (FCFS scheduling,
chunked prefill, prefix caching, preemption), :mod:`.beam` (beam search), :mod:`.engine`
(``LLMEngine``), :mod:`.llm` (``LLM``), :mod:`.metrics`, :mod:`.runner` (runner glue).
"""

from pagedattn.integrations.engine.config import EngineConfig
from pagedattn.integrations.engine.engine import LLMEngine
from pagedattn.integrations.engine.llm import LLM
from pagedattn.integrations.engine.metrics import EngineMetrics
from pagedattn.integrations.engine.sampling import (
    Sampler,
    SamplerOutput,
    SamplingParams,
)
from pagedattn.integrations.engine.scheduler import Scheduler, SchedulerOutput
from pagedattn.integrations.engine.sequence import (
    CompletionOutput,
    RequestOutput,
    Sequence,
    SequenceGroup,
    SequenceStatus,
)

__all__ = [
    "LLM",
    "CompletionOutput",
    "EngineConfig",
    "EngineMetrics",
    "LLMEngine",
    "RequestOutput",
    "Sampler",
    "SamplerOutput",
    "SamplingParams",
    "Scheduler",
    "SchedulerOutput",
    "Sequence",
    "SequenceGroup",
    "SequenceStatus",
]
