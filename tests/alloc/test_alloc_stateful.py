"""Random operation sequences against the block manager (hypothesis ``RuleBasedStateMachine``).

Rules: allocate, prefix-hit allocate (a seen prompt's prefix, same or other salt), allocate with
block hashes computed beforehand (``hash_prompt_blocks``; now and then for another salt, which
must be refused with the state unchanged), eviction
pressure, append (copy-on-write included), batched decode append, batched pending appends (up to
5 pending tokens a sequence, their ids given oldest first in a random order across sequences,
against a twin given the ids at once; fork and swap-out refused meanwhile), fork, free, swap out/in,
batch metadata, and every bad input (double free, unknown/freed sequence, fork into an existing
id, swapping the wrong way, running out of blocks), the last ones asserting the state unchanged
(the bad-input rules in stateful_bad_input.py).

Checked after *every* operation (stateful_checks.py), independently of the manager's own
``check_invariants`` (which runs too): free + used = total on both pools; each ref count equals the number of block tables
holding the block; no block is both free and in use; the hash map matches the blocks and every
cached block's key is the documented BLAKE2b chain of the holders' tokens and salt; shared
blocks hold the same tokens at the same position; the free queue changes in LRU order (blocks
taken for new content are the oldest free ones, survivors keep their order, freed blocks join at
the tail last block first) and evictions are counted; the figures stay in range. At teardown
everything is freed and all blocks must be free with ref count 0.

CI volume: 20 seeds, each asserting >= 5,000 executed operations (>= 100,000 in total). A seed's
operation sequence also depends on which project modules are imported (Hypothesis mixes literal
constants of loaded local modules into its draws): a failure seen in the full suite replays with the
printed steps, not always with this file alone.
``PAGEDATTN_ALLOC_LONG=1`` runs ten times as many (50 seeds of >= 20,000 operations each).

PYTEST_DONT_REWRITE: plain asserts here (pytest's assertion rewriting costs about a third of
the run time of these hot checks); hypothesis prints the failing operation sequence anyway.
"""

import copy
import os
import random
from collections import Counter

import pytest
from hypothesis import HealthCheck, Phase, seed, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, invariant, precondition, rule,
                                 run_state_machine_as_test)

from pagedattn.alloc import (PENDING_TOKEN, BlockManager, InvalidArgumentError, OutOfBlocksError,
                             hash_prompt_blocks, snapshot_state)
from tests.alloc.stateful_bad_input import BadInputRules
from tests.alloc.stateful_checks import AllocatorChecks, cdiv

LONG = os.environ.get("PAGEDATTN_ALLOC_LONG", "") not in ("", "0")
NUM_SEEDS = 50 if LONG else 20
MIN_OPS_PER_SEED = 20_000 if LONG else 5_000
EXAMPLES_PER_ROUND = 2
MAX_ROUNDS = 60 if LONG else 15  # rounds of examples until the seed reaches MIN_OPS_PER_SEED
STEPS_PER_EXAMPLE = 500

# (block_size, num_gpu_blocks, num_cpu_blocks, enable_prefix_caching), chosen by seed.
CONFIGS = [(4, 12, 6, True), (2, 10, 5, True), (3, 14, 6, True), (1, 8, 4, True),
           (4, 16, 8, True), (2, 10, 4, False)]
EXTRAS = [None, ("tenant-a",), ("tenant-b", 7)]
VOCAB = 3  # few distinct tokens: prompts share blocks often
MAX_SEQS = 8  # live sequences (forks and empty prompts cost no block: keep the state small)

OPS = Counter()  # seed -> operations executed


def spell(length, number):
    """Token lists are drawn as (length, number) and spelled in base VOCAB: two draws, not n."""
    return [(number // VOCAB ** i) % VOCAB for i in range(length)]


NUMBERS = st.integers(0, VOCAB ** 14 - 1)


def shuffled(items, seed_value):
    items = list(items)
    random.Random(seed_value).shuffle(items)
    return items


class AllocatorMachine(AllocatorChecks, BadInputRules, RuleBasedStateMachine):
    def __init__(self, seed_id: int):
        super().__init__()
        self.seed_id = seed_id
        bs, gpu, cpu, caching = CONFIGS[seed_id % len(CONFIGS)]
        self.bs = bs
        self.mgr = BlockManager(gpu, bs, cpu, enable_prefix_caching=caching, watermark=0.0)
        self.tokens: dict[int, list[int]] = {}
        self.extra: dict[int, tuple | None] = {}
        self.swapped: set[int] = set()
        self.freed: list[int] = []
        self.prompts: list[tuple[list[int], tuple | None]] = []
        self.next_id = 0
        self.expected_tail = None  # (pool name, block ids the last op must have appended)
        self.chains = {}  # sid -> (its token list, its reference chain so far)
        self._remember_queues()

    # ------------------------------------------------------------------------- helpers
    def count(self):
        OPS[self.seed_id] += 1

    def running(self):
        return sorted(s for s in self.tokens if s not in self.swapped)

    def new_id(self):
        self.next_id += 1
        return self.next_id

    def expect_unchanged(self, fn, error, match=None, before=None):
        before = snapshot_state(self.mgr) if before is None else before
        with pytest.raises(error, match=match) as e:
            fn()
        assert snapshot_state(self.mgr) == before
        return e.value

    def do_allocate(self, tokens, extra, block_hashes=None):
        sid = self.new_id()
        hits = self.expected_hits(tokens, extra)
        revived = sum(b.ref_cnt == 0 for b in hits)
        assert self.mgr.probe_prefix(tokens, extra) == (len(hits) * self.bs, revived)
        need = cdiv(len(tokens), self.bs) - len(hits) + revived
        if need > self.mgr.num_free_blocks:
            self.expect_unchanged(lambda: self.mgr.allocate(sid, tokens, extra,
                                                            block_hashes=block_hashes),
                                  OutOfBlocksError, f"cannot allocate sequence {sid}")
            return
        assert self.mgr.allocate(sid, tokens, extra, block_hashes=block_hashes) == len(hits) * self.bs
        assert self.mgr.get_block_table(sid)[: len(hits)] == [b.block_id for b in hits]
        self.tokens[sid], self.extra[sid] = list(tokens), extra
        self.prompts = (self.prompts + [(list(tokens), extra)])[-12:]

    # --------------------------------------------------------------------------- rules
    @precondition(lambda self: len(self.tokens) < MAX_SEQS)
    @rule(length=st.integers(0, 14), number=NUMBERS, extra=st.sampled_from(EXTRAS))
    def allocate(self, length, number, extra):
        self.count()
        self.do_allocate(spell(length, number), extra)

    @precondition(lambda self: self.prompts and len(self.tokens) < MAX_SEQS)
    @rule(pick=st.integers(0, 1 << 16), cut=st.integers(0, 4),
          tail=st.integers(0, 5), number=NUMBERS, same_salt=st.booleans())
    def allocate_prefix_hit(self, pick, cut, tail, number, same_salt):
        self.count()
        tail = spell(tail, number)
        tokens, extra = self.prompts[pick % len(self.prompts)]
        if not same_salt:
            extra = EXTRAS[(EXTRAS.index(extra) + 1) % len(EXTRAS)]
        self.do_allocate(tokens[: cut * self.bs] + tail, extra)

    @precondition(lambda self: len(self.tokens) < MAX_SEQS)
    @rule(pick=st.integers(0, 1 << 16), cut=st.integers(0, 4), tail=st.integers(0, 5),
          number=NUMBERS, extra=st.sampled_from(EXTRAS), wrong_salt=st.integers(0, 9))
    def allocate_prehashed(self, pick, cut, tail, number, extra, wrong_salt):
        """A seen prompt's prefix (or a fresh prompt) with its block hashes computed first."""
        self.count()
        tokens = spell(tail, number)
        if self.prompts and pick % 2:
            seen, extra = self.prompts[pick % len(self.prompts)]
            tokens = seen[: cut * self.bs] + tokens
        if wrong_salt == 0:  # hashes of another salt: refused, nothing changes
            other = EXTRAS[(EXTRAS.index(extra) + 1) % len(EXTRAS)]
            self.expect_unchanged(
                lambda: self.mgr.allocate(self.next_id + 1, tokens, extra,
                                          block_hashes=hash_prompt_blocks(tokens, self.bs, other)),
                InvalidArgumentError, "other extra_keys")
            return
        self.do_allocate(tokens, extra, hash_prompt_blocks(tokens, self.bs, extra))

    @precondition(lambda self: len(self.tokens) < MAX_SEQS)
    @rule(slack=st.integers(-1, 2), base=st.integers(100, 10_000))
    def eviction_pressure(self, slack, base):
        """A fresh prompt about the size of the free pool: takes (evicts) cached free blocks."""
        self.count()
        n = max(0, (self.mgr.num_free_blocks + slack) * self.bs - 1)
        self.do_allocate([base + i for i in range(n)], None)

    @precondition(lambda self: len(self.tokens) > len(self.swapped))
    @rule(pick=st.integers(0, 1 << 16), length=st.integers(1, 6), number=NUMBERS)
    def append(self, pick, length, number):
        self.count()
        new = spell(length, number)
        running = self.running()
        sid = running[pick % len(running)]
        n, table = len(self.tokens[sid]), self.mgr.get_block_table(sid)
        cow = n % self.bs != 0 and self.mgr.gpu_pool.blocks[table[-1]].ref_cnt > 1
        need = cdiv(n + len(new), self.bs) - cdiv(n, self.bs) + cow
        if need > self.mgr.num_free_blocks:
            self.expect_unchanged(lambda: self.mgr.append_slots(sid, new), OutOfBlocksError,
                                  f"cannot append {len(new)} token")
            return
        pairs = self.mgr.append_slots(sid, new)
        after = self.mgr.get_block_table(sid)
        if cow:
            assert pairs == [(table[-1], after[len(table) - 1])]
            assert after[: len(table) - 1] == table[:-1]
        else:
            assert pairs == [] and after[: len(table)] == table
        self.tokens[sid].extend(new)

    @precondition(lambda self: len(self.tokens) > len(self.swapped))
    @rule(order=st.integers(0, 1 << 32), size=st.integers(1, 8), new=st.integers(0, 2))
    def append_batch(self, order, size, new):
        self.count()
        seqs = shuffled(self.running(), order)[:size]
        tokens = [(new + i) % VOCAB for i in range(len(seqs))]
        if self.mgr.num_blocks_to_append(seqs) > self.mgr.num_free_blocks:
            self.expect_unchanged(lambda: self.mgr.append_slots_batch(seqs, tokens),
                                  OutOfBlocksError, "append a token to each of")
            return
        if order % 3:
            self.mgr.append_slots_batch(seqs, tokens)
        else:  # a third of the time, compare with append_slots called in turn on a copy
            twin = copy.deepcopy(self.mgr)
            expected = [p for s, t in zip(seqs, tokens) for p in twin.append_slots(s, t)]
            assert self.mgr.append_slots_batch(seqs, tokens) == expected
            assert snapshot_state(self.mgr)["gpu"] == snapshot_state(twin)["gpu"]
        for s, t in zip(seqs, tokens):
            self.tokens[s].append(t)

    @precondition(lambda self: len(self.tokens) > len(self.swapped))
    @rule(order=st.integers(0, 1 << 32), size=st.integers(1, 6), k=st.integers(1, 5), new=st.integers(0, 2))
    def append_pending_then_set(self, order, size, k, new):
        """``k`` decode appends whose ids come later (multi-step decode), then the ids."""
        self.count()
        rng = random.Random(order)
        seqs = shuffled(self.running(), order)[:size]
        ids = {s: [(new + i + j) % VOCAB for j in range(k)] for i, s in enumerate(seqs)}
        # a quarter of the time, against a twin given the ids at once (then the ids are given in
        # batch order, as the twin hashes: which of two equal blocks is registered depends on it)
        twin = copy.deepcopy(self.mgr) if order % 4 == 0 else None
        done = 0
        for j in range(k):
            if self.mgr.num_blocks_to_append(seqs) > self.mgr.num_free_blocks:
                self.expect_unchanged(lambda: self.mgr.append_slots_batch(seqs, [PENDING_TOKEN] * len(seqs)),
                                      OutOfBlocksError, "append a token to each of")
                break
            pairs = self.mgr.append_slots_batch(seqs, [PENDING_TOKEN] * len(seqs))
            if twin is not None:
                assert twin.append_slots_batch(seqs, [ids[s][j] for s in seqs]) == pairs
            done += 1
        self.mgr.check_invariants()
        if done and order % 5 == 0:
            before = snapshot_state(self.mgr)
            self.expect_unchanged(lambda: self.mgr.append_slots_batch(seqs[:1], [0]), InvalidArgumentError,
                                  "pending", before)
            self.expect_unchanged(lambda: self.mgr.fork(seqs[0], self.next_id + 1000), InvalidArgumentError,
                                  "pending", before)
            self.expect_unchanged(lambda: self.mgr.swap_out(seqs[:1]), InvalidArgumentError, "pending", before)
        given = {s: 0 for s in seqs}
        while any(n < done for n in given.values()):
            # each call gives the oldest pending id of a random subset of the sequences
            batch = [s for s in seqs if given[s] < done and (twin is not None or rng.random() < 0.6)] or \
                [next(s for s in seqs if given[s] < done)]
            self.mgr.set_last_tokens(batch, [ids[s][given[s]] for s in batch])
            for s in batch:
                given[s] += 1
            if rng.random() < 0.3:
                self.mgr.check_invariants()
        if done and twin is not None:
            # The same tables, ref counts, queue and evictions as the twin. The cached keys may
            # differ: a filled block whose key a free block held is not registered by the twin,
            # but is here if a later append evicted that free block before the ids came.
            got, want = snapshot_state(self.mgr), snapshot_state(twin)
            assert got["seqs"] == want["seqs"] and got["stats"] == want["stats"]
            for name in ("gpu", "cpu"):
                assert got[name]["free_queue"] == want[name]["free_queue"]
                assert got[name]["num_evictions"] == want[name]["num_evictions"]
                assert [b[:2] for b in got[name]["blocks"]] == [b[:2] for b in want[name]["blocks"]]
        for s in seqs:
            self.tokens[s].extend(ids[s][:done])

    @precondition(lambda self: MAX_SEQS > len(self.tokens) > len(self.swapped))
    @rule(pick=st.integers(0, 1 << 16))
    def fork(self, pick):
        self.count()
        running = self.running()
        parent = running[pick % len(running)]
        child = self.new_id()
        refs = [self.mgr.gpu_pool.blocks[b].ref_cnt for b in self.mgr.get_block_table(parent)]
        self.mgr.fork(parent, child)
        assert self.mgr.get_block_table(child) == self.mgr.get_block_table(parent)
        assert [self.mgr.gpu_pool.blocks[b].ref_cnt for b in self.mgr.get_block_table(child)] \
            == [r + 1 for r in refs]
        self.tokens[child], self.extra[child] = list(self.tokens[parent]), self.extra[parent]

    @precondition(lambda self: self.tokens)
    @rule(pick=st.integers(0, 1 << 16))
    def free(self, pick):
        self.count()
        live = sorted(self.tokens)
        sid = live[pick % len(live)]
        swapped = sid in self.swapped
        pool = self.mgr.cpu_pool if swapped else self.mgr.gpu_pool
        table = self.mgr.get_block_table(sid)
        self.expected_tail = ("cpu" if swapped else "gpu",
                              [b for b in reversed(table) if pool.blocks[b].ref_cnt == 1])
        self.mgr.free(sid)
        del self.tokens[sid], self.extra[sid]
        self.chains.pop(sid, None)
        self.swapped.discard(sid)
        self.freed = (self.freed + [sid])[-8:]

    @precondition(lambda self: len(self.tokens) > len(self.swapped))
    @rule(order=st.integers(0, 1 << 32), size=st.integers(1, 3))
    def swap_out(self, order, size):
        self.count()
        group = shuffled(self.running(), order)[:size]
        distinct = list(dict.fromkeys(b for s in group for b in self.mgr.get_block_table(s)))
        if len(distinct) > self.mgr.num_free_cpu_blocks:
            assert not self.mgr.can_swap_out(group)
            self.expect_unchanged(lambda: self.mgr.swap_out(group), OutOfBlocksError,
                                  "cannot swap out sequences")
            return
        tables = {s: self.mgr.get_block_table(s) for s in group}
        pairs = self.mgr.swap_out(group)
        assert [g for g, _ in pairs] == distinct
        cpu_of = dict(pairs)
        for s in group:
            assert self.mgr.get_block_table(s) == [cpu_of[b] for b in tables[s]]
        self.swapped.update(group)

    @precondition(lambda self: self.swapped)
    @rule(order=st.integers(0, 1 << 32), size=st.integers(1, 3))
    def swap_in(self, order, size):
        self.count()
        group = shuffled(sorted(self.swapped), order)[:size]
        cpu, gpu = self.mgr.cpu_pool, self.mgr.gpu_pool
        distinct = list(dict.fromkeys(b for s in group for b in self.mgr.get_block_table(s)))
        revived = {}
        for b in distinct:
            key = cpu.blocks[b].block_key
            hit = gpu.cached_blocks.get(key) if key is not None and gpu.enable_caching else None
            if hit is not None and hit.extra_keys == cpu.blocks[b].extra_keys:
                revived[b] = hit
        need = len(distinct) - len(revived) + len({h.block_id for h in revived.values()
                                                   if h.ref_cnt == 0})
        if need > self.mgr.num_free_blocks:
            self.expect_unchanged(lambda: self.mgr.swap_in(group), OutOfBlocksError,
                                  "cannot swap in sequences")
            return
        tables = {s: self.mgr.get_block_table(s) for s in group}
        pairs = self.mgr.swap_in(group)
        assert [c for c, _ in pairs] == [b for b in distinct if b not in revived]
        gpu_of = dict(pairs) | {c: h.block_id for c, h in revived.items()}
        for s in group:
            assert self.mgr.get_block_table(s) == [gpu_of[b] for b in tables[s]]
        self.swapped.difference_update(group)

    @precondition(lambda self: len(self.tokens) > len(self.swapped))
    @rule(order=st.integers(0, 1 << 32), size=st.integers(1, 6),
          prefill=st.booleans())
    def metadata(self, order, size, prefill):
        self.count()
        rng = random.Random(order)
        seqs = [s for s in self.running() if self.tokens[s]]
        rng.shuffle(seqs)
        seqs = seqs[:size]
        num_new = [rng.randint(0, len(self.tokens[s])) for s in seqs] if prefill else 1
        meta = self.mgr.build_metadata(seqs, num_new)
        slots, bs = [], self.bs
        for i, s in enumerate(seqs):
            table, n = self.mgr.get_block_table(s), len(self.tokens[s])
            k = num_new[i] if prefill else 1
            slots += [table[p // bs] * bs + p % bs for p in range(n - k, n)]
            assert meta.block_tables[i, : len(table)].tolist() == table
        assert meta.slot_mapping.tolist() == slots

    # ---------------------------------------------------------------------- invariants
    @invariant()
    def consistent(self):
        self.check_state()

    def teardown(self):
        self.check_teardown()


@pytest.mark.parametrize("seed_id", range(NUM_SEEDS))
def test_random_operations(seed_id):
    """Rounds of examples (hypothesis seed ``1000 * seed_id + round``) until the seed has run
    MIN_OPS_PER_SEED operations; the count is asserted so a run cannot silently do less."""
    OPS[seed_id] = 0

    def factory():
        return AllocatorMachine(seed_id)

    for round_idx in range(MAX_ROUNDS):
        if OPS[seed_id] >= MIN_OPS_PER_SEED:
            break
        run_state_machine_as_test(
            seed(1000 * seed_id + round_idx)(factory),
            settings=settings(max_examples=EXAMPLES_PER_ROUND,
                              stateful_step_count=STEPS_PER_EXAMPLE, deadline=None,
                              database=None, phases=[Phase.generate, Phase.shrink],
                              suppress_health_check=list(HealthCheck)))
    assert OPS[seed_id] >= MIN_OPS_PER_SEED, (
        f"seed {seed_id} ran only {OPS[seed_id]} operations, fewer than {MIN_OPS_PER_SEED}")
