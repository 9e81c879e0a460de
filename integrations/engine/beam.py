"""Beam search over a sequence group, step by step, as transformers' ``generate(num_beams=k)``.

Each step the group's live beams produce logits together; :func:`beam_step` keeps the
``k`` best continuations (cumulative log-prob, float32 as transformers keeps it) out of the top
``2k`` over all beams, moves the top-``k``-ranked candidates that end (EOS / stop token /
``max_tokens``) into the finished hypotheses scored ``logprob / generated_len ** length_penalty``,
and stops with the same heuristic (``early_stopping=False``: when ``k`` hypotheses are finished and
the best running beam's current score cannot beat the worst of them). Beams are forked in the
allocator (sharing blocks) when a beam has several continuations and freed when it has none.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from pagedattn.integrations.engine.sequence import (
    Sequence,
    SequenceGroup,
    SequenceStatus,
)

from pagedattn.alloc import BlockManager

__all__ = ["beam_step"]


def _score(logprob: float, length: int, penalty: float) -> float:
    return float(np.float32(logprob) / np.float32(float(length) ** penalty))


def beam_step(g: SequenceGroup, logits: torch.Tensor, stop_ids: set[int],
              mgr: BlockManager, free_seq: Callable[[Sequence], None],
              max_model_len: int | None = None) -> bool:
    """Advance the beams of ``g`` (``logits``: one row per live beam, in ``g.seqs`` order).

    Returns whether the search is over (then ``g.seqs`` is empty and the hypotheses are in
    ``g.beam.finished``, best first).
    """
    p, state, seqs = g.params, g.beam, g.seqs
    width = p.width
    vocab = logits.shape[1]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    cum = torch.tensor([s.cumulative_logprob for s in seqs], dtype=torch.float32,
                       device=logprobs.device)
    scores = (logprobs + cum[:, None]).flatten()
    num_cand = min(max(2, 1 + len(stop_ids)) * width, scores.numel())
    top_v, top_i = scores.topk(num_cand)
    packed = torch.stack([top_v.double(), top_i.double()]).tolist()
    new_len = seqs[0].num_output_tokens + 1
    at_limit = new_len >= p.max_tokens or (
        max_model_len is not None and len(seqs[0].token_ids) + 1 >= max_model_len)
    full = p.early_stopping is True and len(state.finished) >= width
    nxt: list[tuple[int, int, float]] = []
    for rank, (v, idx) in enumerate(zip(*packed)):
        b, t = divmod(int(idx), vocab)
        if at_limit or t in stop_ids:
            if rank < width and state.improvable and not full:
                toks = seqs[b].output_token_ids + [t]
                reason = "stop" if t in stop_ids else "length"
                state.finished.append((_score(v, new_len, p.length_penalty), toks, v, reason))
        elif len(nxt) < width:
            nxt.append((b, t, v))
    state.finished.sort(key=lambda h: -h[0])
    del state.finished[width:]
    # The transformers stopping heuristic, evaluated with the new length.
    if nxt and state.improvable:
        if p.early_stopping == "never" and p.length_penalty > 0:
            hyp_len = p.max_tokens
        else:
            hyp_len = new_len
        best = _score(nxt[0][2], hyp_len, p.length_penalty)
        state.improvable = len(state.finished) < width or best > state.finished[-1][0]
    done = (at_limit or not nxt or not state.improvable
            or (p.early_stopping is True and len(state.finished) >= width))
    if done:
        for s in seqs:
            free_seq(s)
            s.status = SequenceStatus.FINISHED_STOPPED
        g.seqs = []
        return True
    # Fork beams with several continuations (before any token is appended), free dead ones.
    used: set[int] = set()
    assigned: list[tuple[Sequence, int, float]] = []
    for i, (b, t, v) in enumerate(nxt):
        parent = seqs[b]
        if b in used:
            child = parent.fork(i)
            mgr.fork(parent.seq_id, child.seq_id)
        else:
            used.add(b)
            child = parent
        assigned.append((child, t, v))
    for b, s in enumerate(seqs):
        if b not in used:
            free_seq(s)
            s.status = SequenceStatus.FINISHED_ABORTED
    for i, (s, t, v) in enumerate(assigned):
        s.token_ids.append(t)
        s.cumulative_logprob = v
        s.index = i
    g.seqs = [a[0] for a in assigned]
    return False
