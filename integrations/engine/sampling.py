"""Sampling parameters of a request and the batched sampler.

The sampler works on the whole step's logits at once: temperature, top-k and top-p as tensor ops,
greedy rows by argmax, random rows by the exponential-race trick (``argmax(p / q)`` with
``q ~ Exp(1)``, equivalent to drawing from ``p``), so that a request with a seed draws its ``q``
rows from its own ``torch.Generator`` and stays reproducible whatever else is in the batch. The
only host sync is the one final ``.tolist()`` of the packed results, which :meth:`Sampler.launch`
defers: the engine can schedule the next step (feeding it the sampled ids on the device) first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["PendingSample", "Sampler", "SamplerOutput", "SamplingParams"]


def _int(name: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"SamplingParams.{name} must be an int, got {type(value).__name__}: {value!r}")
    if value < minimum:
        raise ValueError(f"SamplingParams.{name} must be >= {minimum}, got {value}")


def _float(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"SamplingParams.{name} must be a number, got {type(value).__name__}: {value!r}")


@dataclass(slots=True)
class SamplingParams:
    """How to pick a request's output tokens (the fields vLLM users know).

    Attributes:
        n: completions returned.
        best_of: completions generated (the ``n`` with the best cumulative log-prob are returned);
            ``None`` = ``n``.
        temperature: 0 = greedy; else logits are divided by it before sampling.
        top_k: keep the ``k`` most likely tokens (0 or -1: off).
        top_p: keep the smallest set of tokens whose probability reaches ``top_p`` (1.0: off).
        seed: a per-request generator seed (reproducible sampling); ``None`` = the engine's.
        max_tokens: most new tokens per completion.
        stop_token_ids: tokens that end a completion (kept in its ``token_ids``).
        stop: strings that end a completion (needs a tokenizer; cut from ``text``).
        include_stop_str_in_output: keep the matched stop string at the end of ``text``.
        ignore_eos: keep generating after the EOS token.
        logprobs: also return this many top log-probs per output token (``None``: none); the
            sampled token's log-prob is always included.
        use_beam_search: beam search instead of sampling (deterministic; temperature, top-k,
            top-p and seed are ignored).
        beam_width: beams kept per step; ``None`` = ``max(n, best_of)``.
        length_penalty: beam score = cumulative log-prob / generated length ** length_penalty.
        early_stopping: as in transformers: ``False`` (heuristic), ``True`` or ``"never"``.
    """

    n: int = 1
    best_of: int | None = None
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = 16
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None
    use_beam_search: bool = False
    beam_width: int | None = None
    length_penalty: float = 1.0
    early_stopping: bool | str = False

    def __post_init__(self) -> None:
        _int("n", self.n, 1)
        _int("best_of", self.best_of, 1, allow_none=True)
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError(f"SamplingParams.best_of ({self.best_of}) must be >= n ({self.n})")
        _float("temperature", self.temperature)
        if not self.temperature >= 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        _int("top_k", self.top_k, -1)
        _float("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        _int("seed", self.seed, 0, allow_none=True)
        _int("max_tokens", self.max_tokens, 1)
        if isinstance(self.stop_token_ids, int):
            self.stop_token_ids = [self.stop_token_ids]
        self.stop_token_ids = list(self.stop_token_ids)
        for t in self.stop_token_ids:
            _int("stop_token_ids[]", t, 0)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"SamplingParams.stop must hold non-empty strings, got {s!r}")
        _int("logprobs", self.logprobs, 0, allow_none=True)
        _int("beam_width", self.beam_width, 1, allow_none=True)
        _float("length_penalty", self.length_penalty)
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"SamplingParams.early_stopping must be True, False or 'never', "
                             f"got {self.early_stopping!r}")
        if self.use_beam_search:
            if self.beam_width is not None and self.beam_width < max(self.n, self.best_of or 1):
                raise ValueError(f"SamplingParams.beam_width ({self.beam_width}) must be >= n and "
                                 f"best_of ({max(self.n, self.best_of or 1)})")
            if self.stop:
                raise ValueError("SamplingParams.stop (stop strings) is not supported with beam "
                                 "search; use stop_token_ids")

    # ------------------------------------------------------------------------------ helpers
    @property
    def num_seqs(self) -> int:
        """Sequences the request runs at once: the beam width, or ``best_of``."""
        if self.use_beam_search:
            return self.width
        return self.best_of or self.n

    @property
    def width(self) -> int:
        return self.beam_width or max(self.n, self.best_of or 1)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.tensor(values, dtype)`` on ``device``; to a GPU through pinned memory, without the
    stream sync that a copy from pageable memory makes (it would drain an async engine's queue)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


@dataclass(slots=True)
class SamplerOutput:
    """Per sampled row: the token, its log-prob, and the top log-probs asked for (or ``None``)."""

    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[dict[int, float] | None]


class PendingSample:
    """Samples queued on the device: ``ids`` ([R] int64, on the device) at once, the host copy
    with log-probs by :meth:`result` (which waits for it)."""

    __slots__ = ("ids", "_host", "_event", "_params", "_k", "_result")

    def __init__(self, ids: torch.Tensor, host: torch.Tensor | None, event: Any,
                 params: list[SamplingParams], k: int) -> None:
        self.ids = ids
        self._host = host
        self._event = event
        self._params = params
        self._k = k
        self._result: SamplerOutput | None = None

    def result(self) -> SamplerOutput:
        """The host results (read once; later calls return the same object)."""
        if self._result is None:
            self._result = self._read()
        return self._result

    def _read(self) -> SamplerOutput:
        if self._host is None:
            return SamplerOutput([], [], [])
        if self._event is not None:
            self._event.synchronize()
        host, k = self._host, self._k
        # columns, not rows: no Python list a row (the garbage collector counts each)
        token_ids = host[:, 0].long().tolist()  # the step's only host sync (on the CPU: the whole sampling)
        lps = host[:, 1].tolist()
        if not k:
            return SamplerOutput(token_ids, lps, [None] * len(token_ids))
        packed = host.tolist()
        tops: list[dict[int, float] | None] = []
        for p, r in zip(self._params, packed):
            if p.logprobs is None:
                tops.append(None)
            else:
                kk = min(p.logprobs, k)
                top = {int(t): v for v, t in zip(r[2:2 + kk], r[2 + k:2 + k + kk])}
                top[int(r[0])] = r[1]
                tops.append(top)
        return SamplerOutput(token_ids, lps, tops)


class Sampler:
    """Samples one token per row of a logits batch.

    Args:
        seed: seed of the generator used for rows without a generator of their own.
        device: where the logits live.
    """

    def __init__(self, seed: int = 0, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)

    def make_generator(self, seed: int) -> torch.Generator:
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed)
        return gen

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None] | None = None,
                 rows: list[int] | None = None) -> SamplerOutput:
        """Sample ``len(params)`` tokens and wait for them (see :meth:`launch`)."""
        return self.launch(logits, params, generators, rows).result()

    def launch(self, logits: torch.Tensor, params: list[SamplingParams],
               generators: list[torch.Generator | None] | None = None,
               rows: list[int] | None = None) -> PendingSample:
        """Queue the sampling of ``len(params)`` tokens on the logits' device; no host sync.

        Args:
            logits: ``[R, vocab]`` (any float dtype).
            params: the sampling params of each sample.
            generators: per sample, its request's generator or ``None`` (the engine's).
            rows: per sample, the logits row it draws from (default ``range(R)``); a row may
                appear several times (parallel samples of one prompt).

        Returns:
            A :class:`PendingSample`: the sampled ids on the device at once (``ids``), the host
            results once its copy lands (``result()``).
        """
        dev = logits.device
        if not params:
            return PendingSample(torch.empty(0, dtype=torch.int64, device=dev), None, None, params, 0)
        if rows is not None and (len(rows) != logits.shape[0] or rows != list(range(len(rows)))):
            logits = logits.index_select(0, to_device(rows, torch.long, dev))
        logits = logits.float()
        vocab = logits.shape[1]
        logprobs = torch.log_softmax(logits, dim=-1)
        greedy = [p.greedy for p in params]
        if all(greedy):
            ids = logits.argmax(dim=-1)
        else:
            ids = self._sample(logits, params, generators, greedy, vocab)
        chosen = logprobs.gather(1, ids[:, None])
        parts = [ids[:, None].double(), chosen.double()]
        k = min(max((p.logprobs or 0) for p in params), vocab)
        if k:
            top_v, top_i = logprobs.topk(k, dim=-1)
            parts += [top_v.double(), top_i.double()]
        packed = torch.cat(parts, dim=1)
        event = None
        if dev.type == "cuda":
            host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            host.copy_(packed, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host = packed
        return PendingSample(ids, host, event, params, k)

    def _sample(self, logits: torch.Tensor, params: list[SamplingParams],
                generators: list[torch.Generator | None] | None, greedy: list[bool],
                vocab: int) -> torch.Tensor:
        dev = logits.device
        temps = to_device([p.temperature if p.temperature > 0 else 1.0 for p in params], torch.float32, dev)
        scaled = logits / temps[:, None]
        need_k = any(0 < p.top_k < vocab for p in params)
        need_p = any(p.top_p < 1.0 for p in params)
        if need_k or need_p:
            scaled = apply_top_k_top_p(
                scaled,
                [p.top_k if p.top_k > 0 else vocab for p in params] if need_k else None,
                [p.top_p for p in params] if need_p else None)
        probs = torch.softmax(scaled, dim=-1)
        q = torch.empty_like(probs)
        q.exponential_(generator=self.generator)
        if generators is not None:
            for i, gen in enumerate(generators):
                if gen is not None and not greedy[i]:
                    q[i].exponential_(generator=gen)
        sampled = (probs / q).argmax(dim=-1)
        if any(greedy):
            mask = to_device(greedy, torch.bool, dev)
            sampled = torch.where(mask, logits.argmax(dim=-1), sampled)
        return sampled


def apply_top_k_top_p(logits: torch.Tensor, top_k: list[int] | None,
                      top_p: list[float] | None) -> torch.Tensor:
    """Set logits outside each row's top-k, then outside its top-p nucleus, to ``-inf``.

    Top-p is applied to the distribution left by top-k (as vLLM and transformers do); the most
    likely token always survives.
    """
    dev, vocab = logits.device, logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    if top_k is not None:
        k = to_device(top_k, torch.long, dev).clamp_(1, vocab)
        rank = torch.arange(vocab, device=dev)
        sorted_logits = sorted_logits.masked_fill(rank[None, :] >= k[:, None], float("-inf"))
    if top_p is not None:
        p = to_device(top_p, torch.float32, dev)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
        drop = before >= p[:, None]
        drop[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)
