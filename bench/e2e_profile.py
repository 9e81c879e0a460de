"""Steady decode of the engine under the profiler: step time against the bandwidth floor, GPU busy fraction.

Run as the ``engine_profile`` system of ``bench/bench_e2e.py`` (its own process). It admits a full
batch of ShareGPT-like prompts (``max_num_seqs``, or ``params["num_seqs"]``), steps until every
prompt is prefilled, then runs four windows of ``num_steps`` engine steps of the whole batch:

1. the timed windows: one recording device activity only, between two without the profiler
   (its host-side records and its instrumentation of the graph launches cost host time in every
   step, which lengthens a host-bound step):
   - ``decode_step_ms``: median wall time of ``LLMEngine.step()`` (schedule, metadata, forward,
     sampling, outputs) per decode step it runs, over the two windows without the profiler. With
     async scheduling a call launches step t and then reads step t - 1's tokens, so in steady
     decode the median call is one step's period.
   - ``gpu_ms_per_step``: the union of the GPU kernels' and copies' intervals in the device-only
     window, per decode step (its context is the middle of the three windows').
   - ``gpu_busy_fraction``: ``gpu_ms_per_step / decode_step_ms``; ``device_only_window`` also gives
     that window's own step time and busy fraction (union over its wall time).
   - ``floor_ms``: (weight bytes + the batch's K/V bytes at the windows' middle) / device-to-device
     copy rate measured in the same process (bytes read + written per second, as bench_ops.py
     counts it): what one decode step must at least read. ``decode_step_vs_floor`` is their ratio.
2. the breakdown window (``breakdown_window``), host operators recorded too: ``host_ms`` per phase
   of a step (schedule, prepare, forward launch, complete: waiting for the sampled tokens and
   applying them; ``time.perf_counter`` around the engine's own calls, medians), the top host
   operators and device kernels per decode step, and that window's own step time and busy
   fraction (lower: the recording's host cost is in it).
"""

from __future__ import annotations

import contextlib
import time

import numpy as np
import torch

from bench.workloads import _mem


def copy_rate_bytes_per_s(nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Device-to-device copy rate (bytes read + written per second), median of ``repeats``."""
    src = torch.empty(nbytes // 2, dtype=torch.int16, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 2):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / float(np.median(times[2:]))


def busy_fraction(prof, wall_s: float) -> float | None:
    """Union of the device intervals (kernels, memcpy, memset) in ``prof`` over ``wall_s``."""
    busy = device_busy_s(prof)
    return None if busy is None else min(1.0, busy / wall_s)


def device_busy_s(prof) -> float | None:
    """Seconds covered by the union of the device intervals (kernels, memcpy, memset) in ``prof``."""
    spans = []
    for e in prof.events():
        if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start:
            spans.append((e.time_range.start, e.time_range.end))
    if not spans:
        return None
    spans.sort()
    busy, (cur_s, cur_e) = 0.0, spans[0]
    for s, e in spans[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    return busy / 1e6


def top_device_ops(prof, num_steps: int, limit: int = 15) -> list[dict]:
    """The device kernels and copies that took the most time, per step (microseconds)."""
    totals: dict[str, list[float]] = {}
    for e in prof.events():
        if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA:
            t = totals.setdefault(e.name, [0.0, 0])
            t[0] += e.time_range.end - e.time_range.start
            t[1] += 1
    rows = sorted(totals.items(), key=lambda kv: -kv[1][0])[:limit]
    return [{"name": name[:120], "us_per_step": us / num_steps, "calls_per_step": n / num_steps}
            for name, (us, n) in rows]


def top_host_ops(prof, num_steps: int, limit: int = 15) -> list[dict]:
    """The host-side operators (CPU self time) that took the most time, per step (microseconds)."""
    rows = [e for e in prof.key_averages() if getattr(e, "self_cpu_time_total", 0) > 0]
    rows.sort(key=lambda e: -e.self_cpu_time_total)
    return [{"name": e.key[:120], "self_us_per_step": e.self_cpu_time_total / num_steps,
             "calls_per_step": e.count / num_steps} for e in rows[:limit]]


def kernels_per_step(prof, num_steps: int) -> float:
    """Device kernels a step (graph-replayed kernels included)."""
    n = sum(1 for e in prof.events() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA)
    return n / num_steps


class _PhaseTimer:
    """Wraps the engine's scheduler, metadata, runner and post-processing calls with perf_counter."""

    def __init__(self, eng):
        self.times: dict[str, list[float]] = {"schedule": [], "prepare": [], "execute": [], "complete": []}
        self.on = False
        import pagedattn.integrations.engine.engine as engine_module  # (its step input builder)

        for name, owner, attr in (("schedule", eng.scheduler, "schedule"),
                                  ("prepare", engine_module, "build_step_input"),
                                  ("execute", eng.runner, "execute"), ("complete", eng, "_complete")):
            setattr(owner, attr, self._wrap(name, getattr(owner, attr)))

    def _wrap(self, name, fn):
        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                if self.on:
                    self.times[name].append(time.perf_counter() - t)
        return timed

    def medians_ms(self) -> dict:
        return {k: float(np.median(v)) * 1e3 for k, v in self.times.items() if v}


def run_engine_profile(path: str, w: dict, dev: str, emit) -> None:
    from bench.e2e_systems import _make_llm, _pool_info, _warmup_engine
    from pagedattn.integrations.engine import SamplingParams

    p = w["params"]
    num_steps = p.get("num_steps", 30)
    t_start = time.perf_counter()
    llm = _make_llm(path, dev, p)
    startup_s = time.perf_counter() - t_start  # load, pool profiling, graph capture (and compilation)
    _warmup_engine(llm, w)
    eng = llm.engine
    eng.stream_outputs = False
    timer = _PhaseTimer(eng)
    n = min(len(w["prompts"]), p.get("num_seqs") or eng.config.max_num_seqs)
    per_call = eng.num_scheduler_steps  # decode steps an engine step runs (multi-step decode)
    for i, prompt in enumerate(w["prompts"][:n]):  # every request outlives both windows
        eng.add_request(str(i), prompt, SamplingParams(
            temperature=0.0, max_tokens=(4 * num_steps + 8) * per_call + 64, ignore_eos=True))
    while eng.scheduler.waiting or any(s.num_computed_tokens < len(s.token_ids) - 1
                                       for g in eng.scheduler.running for s in g.seqs):
        eng.step()
    for _ in range(3):
        eng.step()
    running = list(eng.scheduler.running)
    tokens = sum(len(s.token_ids) + s.num_pending for g in running for s in g.seqs)
    replays_before = getattr(eng.decode_graphs, "num_replays", 0)
    cuda = dev.startswith("cuda")

    def window(activities):
        steps = []
        ctx = torch.profiler.profile(activities=activities) if activities else contextlib.nullcontext()
        with ctx as prof:
            t_all = time.perf_counter()
            for _ in range(num_steps):
                t = time.perf_counter()
                eng.step()
                steps.append(time.perf_counter() - t)
            wall = time.perf_counter() - t_all
        return prof, steps, wall

    # 1. the step time: two windows without the profiler (its records and its instrumentation of
    #    the graph launches cost host time each step) around 2. one recording device activity only:
    #    the GPU's time a step (kernel durations are not lengthened by the host's costs)
    _, steps_a, _ = window(None)
    prof1, steps_b, wall1 = window([torch.profiler.ProfilerActivity.CUDA] if cuda else None)
    _, steps_c, _ = window(None)
    steps = steps_a + steps_c
    # 3. the breakdown window (host ops recorded too, phases timed): where the time goes
    timer.on = True
    prof, steps2, wall2 = window([torch.profiler.ProfilerActivity.CPU]
                                 + ([torch.profiler.ProfilerActivity.CUDA] if cuda else []))
    timer.on = False
    model_steps = num_steps * per_call
    replays = getattr(eng.decode_graphs, "num_replays", 0) - replays_before
    if eng.decode_graphs is not None and replays != 4 * model_steps:
        raise RuntimeError(f"{replays} graph replays in 4 x {num_steps} engine steps of {per_call} decode steps")
    # one decode step (one token a sequence): an engine step runs per_call of them
    res = {"status": "ok", "batch_seqs": len(running), "context_tokens": tokens, "num_steps": model_steps,
           "engine_steps": num_steps, "decode_steps_per_engine_step": per_call,
           "decode_step_ms": float(np.median(steps)) * 1e3 / per_call,
           "decode_step_ms_p90": float(np.percentile(steps, 90)) * 1e3 / per_call,
           "breakdown_window": {"decode_step_ms": float(np.median(steps2)) * 1e3 / per_call,
                                "host_ms": timer.medians_ms(), "top_host_ops": top_host_ops(prof, model_steps)},
           "startup_s": startup_s,
           "engine_overrides": p.get("engine_overrides", {}), "cuda_graphs": eng.decode_graphs is not None,
           "graph_replays": getattr(eng.decode_graphs, "num_replays", 0), **_pool_info(llm), **_mem(dev)}
    if cuda:
        gpu_ms = device_busy_s(prof1) * 1e3 / model_steps
        res["gpu_ms_per_step"] = gpu_ms
        res["gpu_busy_fraction"] = min(1.0, gpu_ms / res["decode_step_ms"])
        res["device_only_window"] = {"decode_step_ms": float(np.median(steps_b)) * 1e3 / per_call,
                                     "gpu_busy_fraction": busy_fraction(prof1, wall1)}
        bw = res["breakdown_window"]
        bw["gpu_busy_fraction"] = busy_fraction(prof, wall2)
        bw["top_gpu_ops"] = top_device_ops(prof, model_steps)
        bw["device_ops_per_step"] = kernels_per_step(prof, model_steps)
        weights = sum(t.numel() * t.element_size() for t in eng.runner.model.parameters())
        # K/V read by a step: the context at the middle of the timed windows (it grows a token a
        # step), the device-only window's middle
        mid_tokens = tokens + len(running) * model_steps * 3 // 2
        kv = mid_tokens * eng.runner.kv_cache_bytes_per_block // eng.block_manager.block_size
        rate = copy_rate_bytes_per_s()
        res.update(weight_bytes=weights, kv_bytes=kv, copy_rate_gb_s=rate / 1e9,
                   floor_ms=(weights + kv) / rate * 1e3)
        res["decode_step_vs_floor"] = res["decode_step_ms"] / res["floor_ms"]
    emit(res)
