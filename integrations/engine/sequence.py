"""Sequences, sequence groups (one per request) and the outputs handed to users.

A :class:`Sequence` is one token stream with its own block table in the allocator (its
``seq_id`` is the allocator's id). A :class:`SequenceGroup` is a request: its prompt, sampling
params and live sequences (one, ``best_of`` parallel samples forked from the prompt, or the beams
of a beam search). ``num_computed_tokens`` counts the tokens whose KV is in the cache; a running
sequence's allocator length is always ``num_computed_tokens`` between steps. ``num_pending``
counts tokens sampled on the device whose ids the host does not have yet (the engine schedules
the next step before it reads them); they are not in ``token_ids``.
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

import torch
from pagedattn.integrations.engine.sampling import SamplingParams

from pagedattn.alloc import PromptBlockHashes

__all__ = ["CompletionOutput", "RequestOutput", "Sequence", "SequenceGroup", "SequenceStatus"]

_seq_counter = itertools.count()


class SequenceStatus(enum.Enum):
    """A sequence's state; ``status.finished`` says whether it is one of the ``FINISHED_*``."""

    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"
    FINISHED_STOPPED = "finished_stopped"   # EOS, a stop token or a stop string
    FINISHED_LENGTH = "finished_length"     # max_tokens or max_model_len
    FINISHED_ABORTED = "finished_aborted"   # abort() or a beam that died
    FINISHED_IGNORED = "finished_ignored"   # can never be scheduled: the request's error

    @property
    def finish_reason(self) -> str | None:
        return {"FINISHED_STOPPED": "stop", "FINISHED_LENGTH": "length",
                "FINISHED_ABORTED": "abort", "FINISHED_IGNORED": "error"}.get(self.name)


_FINISHED = frozenset(s for s in SequenceStatus if s.name.startswith("FINISHED"))
for _status in SequenceStatus:
    # a plain attribute, not a property: the engine reads it for every sequence of every step
    _status.finished = _status in _FINISHED  # type: ignore[misc]


class Sequence:
    """One token stream of a request (prompt + its output tokens)."""

    __slots__ = ("seq_id", "token_ids", "prompt_len", "num_computed_tokens", "num_pending", "status",
                 "cumulative_logprob", "logprobs", "index", "stop_reason", "text", "_text_len")

    def __init__(self, token_ids: list[int], prompt_len: int, index: int = 0) -> None:
        self.seq_id = next(_seq_counter)
        self.token_ids = token_ids
        self.prompt_len = prompt_len
        self.num_computed_tokens = 0
        self.num_pending = 0
        self.status = SequenceStatus.WAITING
        self.cumulative_logprob = 0.0
        self.logprobs: list[dict[int, float]] | None = None
        self.index = index
        self.stop_reason: int | str | None = None
        self.text = ""
        self._text_len = 0

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) + self.num_pending - self.num_computed_tokens

    def fork(self, index: int) -> Sequence:
        """A new sequence with a copy of this one's tokens and state (not its id)."""
        child = Sequence(list(self.token_ids), self.prompt_len, index)
        child.num_computed_tokens = self.num_computed_tokens
        child.status = self.status
        child.cumulative_logprob = self.cumulative_logprob
        child.logprobs = list(self.logprobs) if self.logprobs is not None else None
        return child

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, len={len(self)}, computed={self.num_computed_tokens}, "
                f"{self.status.name})")


@dataclass(slots=True, eq=False)
class BeamState:
    """Finished hypotheses of a beam search, best first:
    ``(score, output_token_ids, cumulative_logprob, finish_reason)``."""

    finished: list[tuple[float, list[int], float, str]] = field(default_factory=list)
    improvable: bool = True


class SequenceGroup:
    """A request: prompt, params, live sequences and the finished ones."""

    __slots__ = ("request_id", "prompt", "prompt_token_ids", "params", "arrival_time", "order",
                 "seqs", "finished_seqs", "generator", "forked", "beam", "error",
                 "first_scheduled_time", "first_token_time", "finished_time", "num_preemptions",
                 "block_hashes")

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                 params: SamplingParams, arrival_time: float | None = None, order: int = 0,
                 generator: torch.Generator | None = None) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.order = order
        first = Sequence(list(prompt_token_ids), len(prompt_token_ids))
        if params.logprobs is not None:
            first.logprobs = []
        self.seqs: list[Sequence] = [first]
        self.finished_seqs: list[Sequence] = []
        self.generator = generator
        self.forked = params.num_seqs == 1  # parallel samples not forked yet
        self.beam = BeamState() if params.use_beam_search else None
        self.error: str | None = None
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.finished_time: float | None = None
        self.num_preemptions = 0
        #: the prompt's block hashes, computed when the request arrived (prefix caching on), so the
        #: scheduler's allocation hashes nothing (pagedattn.alloc.hash_prompt_blocks)
        self.block_hashes: PromptBlockHashes | None = None

    @property
    def key(self) -> tuple[float, int]:
        """FCFS order: arrival time, then submission order."""
        return (self.arrival_time, self.order)

    @property
    def is_finished(self) -> bool:
        return not self.seqs

    @property
    def num_live(self) -> int:
        return len(self.seqs)

    def __repr__(self) -> str:
        return f"SequenceGroup({self.request_id!r}, live={self.seqs})"


@dataclass(slots=True)
class CompletionOutput:
    """One completion of a request."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    """What :meth:`LLMEngine.step` and :meth:`LLM.generate` return for a request.

    ``error`` holds the reason when the request could not run (``finish_reason == "error"``).
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    error: str | None = None
    metrics: dict[str, float | None] | None = None
