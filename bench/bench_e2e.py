"""End-to-end benchmark: our engine vs transformers' generate and continuous batching, plus the
vLLM paper's Fig. 2 (KV slot utilization), Fig. 12 (normalized latency vs request rate) and Fig. 15
(blocks saved by sharing), on random-weight Llama shapes, in one run with a progress bar.

    python bench/bench_e2e.py              # 1.1B and 8B on one GPU, about 10 minutes
    python bench/bench_e2e.py --quick      # 1.1B only, fewer requests
    python bench/bench_e2e.py --dry-run    # CPU, tiny model, short requests, results to a temp dir

Every system runs in its own process (``--system NAME --workload FILE --out JSON``) under a timeout;
a stage that errors or times out is recorded with its stderr tail and the run goes on. A global
budget (``--budget-s``) skips the stages that no longer fit. Results: ``bench/results/<card>/e2e.json``
and PNGs, the headline ratios into ``bench/results/summary.json`` (see ``bench/summary.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T_START = time.time()
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import workloads as wl  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny model, few short requests, temp dir")
    ap.add_argument("--quick", action="store_true", help="1.1B only, fewer requests")
    ap.add_argument("--models", default=None, help="comma list of llama-1.1b, llama-8b, tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-s", type=float, default=None, help="whole-run budget (default 560; dry run 300)")
    ap.add_argument("--timeout-s", type=float, default=None, help="per-system timeout (default per stage, ~120)")
    ap.add_argument("--requests", type=int, default=None,
                    help="ShareGPT-like throughput requests (1000; the 8B shape runs the first 256)")
    ap.add_argument("--alpaca-requests", type=int, default=None, help="Alpaca-like throughput requests (1000; quick 500)")
    ap.add_argument("--sharing-requests", type=int, default=None, help="Alpaca-like requests per Fig. 15 setting")
    ap.add_argument("--hf-generate-requests", type=int, default=None, help="static-batch subset (64)")
    ap.add_argument("--hf-cb-requests", type=int, default=None,
                    help="transformers CB requests: the first 256 (the engine also times these alone)")
    ap.add_argument("--rates", default=None, help="Poisson rates, req/s, comma list (default 4,16,32)")
    ap.add_argument("--out-dir", default=None, help="default bench/results/<card> (dry run: a temp dir)")
    ap.add_argument("--model-dir", default=None, help="where the random models are saved (default: temp)")
    ap.add_argument("--stages", default=None,
                    help="comma list: run only these stages (e.g. engine_sharegpt,engine_profile; builds always run)")
    # worker mode
    ap.add_argument("--system", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workload", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--device", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


# --------------------------------------------------------------------------------- worker
def worker(args) -> None:
    from bench import e2e_systems

    out = Path(args.out)

    def emit(res: dict) -> None:
        res = dict(res, system=args.system, process_s=time.time() - T_START)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=1))
        os.replace(tmp, out)

    w = wl.load_workload(args.workload)
    if args.system == "build":
        t0 = time.time()
        path = wl.build_model(w["params"]["model_name"], args.model, args.device, w["seed"])
        emit({"status": "ok", "path": path, "build_s": time.time() - t0})
        return
    e2e_systems.SYSTEMS[args.system](args.model, w, args.device, emit)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # don't wait on a peer's lingering threads (its result is written)


def run_stage(stage: dict, budget_end: float, tmp: Path, log) -> dict:
    """Run one worker process under its timeout; its result, or status timeout / error / skipped."""
    left = budget_end - time.time()
    if left < stage["min_s"]:
        return {"status": "skipped", "reason": f"budget: {left:.0f} s left, stage needs {stage['min_s']} s"}
    timeout = min(stage["timeout"], left)
    params = dict(stage["params"], deadline=time.time() + timeout - stage.get("margin", 12))
    wf = wl.save_workload(dict(stage["workload"], params=params), tmp / f"{stage['key']}.workload.json")
    out = tmp / f"{stage['key']}.json"
    err = tmp / f"{stage['key']}.stderr"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--system", stage["system"], "--workload", wf,
           "--out", str(out), "--model", stage["model"], "--device", stage["device"]]
    t0 = time.time()
    with open(err, "w") as ef:
        proc = subprocess.Popen(cmd, stdout=ef, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
            status = "ok" if rc == 0 else "error"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc, status = None, "timeout"
    res = json.loads(out.read_text()) if out.exists() else {}
    if status != "ok":
        res["result_status"] = res.get("status")
        res["status"] = status
        res["stderr_tail"] = err.read_text()[-3000:]
    res.update(rc=rc, wall_s=time.time() - t0, timeout_s=timeout)
    log(f"[{stage['key']}] {res['status']} in {res['wall_s']:.1f} s"
        + (f" ({res.get('output_tokens_per_s', 0) or 0:,.0f} tok/s)" if "output_tokens_per_s" in res else ""))
    return res


DEFINITIONS = {
    "output_tokens_per_s": "output tokens of the timed run / its wall time (model load and a short warm-up "
                           "excluded); HF generate counts each request's own tokens only (not the padding steps "
                           "of a static batch); partial runs (deadline) count what was produced / completed",
    "kv_utilization": "engine metrics kv_utilization_mean: mean over steps of token slots holding tokens / "
                      "slots of the allocated blocks (block size 16), ShareGPT-like run",
    "fig2": "sums over steps of the throughput run: stored token slots / allocated paged slots, vs a contiguous "
            "reservation per running request of prompt + max_tokens, or of max_model_len",
    "sharing_saving": "1 - sum over steps of blocks in use / sum over steps of the blocks every live sequence "
                      "would hold alone (ceil(tokens / block size) each); prefix caching off, so only fork / "
                      "copy-on-write sharing counts; the summary figure is the smallest over n = 2, 4, 6 "
                      "(resp. beam width 2, 4, 6)",
    "throughput_vs_hf_cb": "engine tokens/s on the whole ShareGPT-like workload (1,000 requests) over the "
                           "fastest transformers continuous-batching configuration that produced a figure (it "
                           "runs the first hf_cb_requests = 256 of them, partial: a rate over what it made)",
    "throughput_vs_hf_cb_same_requests": "the same, the engine timed on those first 256 requests alone (same "
                                         "process, prefix cache reset between the runs)",
    "normalized_latency": "mean over requests of (finish - arrival) / output tokens, Poisson arrivals",
}


# ------------------------------------------------------------------------------- the plan
def plan(args, dev: str, model_dir: Path) -> list[dict]:
    dry, quick = args.dry_run, args.quick
    models = (args.models.split(",") if args.models else
              ["tiny"] if dry else ["llama-1.1b"] if quick else ["llama-1.1b", "llama-8b"])
    scale = 0.1 if dry else 1.0
    n_share = args.requests or (12 if dry else 1000)
    n_alp = args.alpaca_requests or (16 if dry else 500 if quick else 1000)
    n_sharing = args.sharing_requests or (6 if dry else 128)  # per Fig. 15 setting (block counts: a ratio)
    n_gen = args.hf_generate_requests or (8 if dry else 64)
    n_cb = args.hf_cb_requests or (8 if dry else 256)  # the engine times these alone too (first_n)
    rates = [float(r) for r in args.rates.split(",")] if args.rates else ([2.0, 8.0] if dry else [4.0, 16.0, 32.0])
    T = args.timeout_s
    cpu = {"cpu_blocks": 1024} if dry else {}
    stages = []
    for mi, name in enumerate(models):
        vocab = wl.MODELS[name]["vocab_size"]
        path = str(model_dir / name)
        sg = wl.make_workload("sharegpt", n_share, args.seed, vocab, scale=scale)
        if name == "llama-8b":  # its engine stage: the first 256 (1,000 would not fit the 10 minutes)
            sg = wl.subset(sg, min(n_share, 256))
        al = wl.make_workload("alpaca", max(n_alp, n_sharing), args.seed + 1, vocab, scale=scale)
        big, first = name == "llama-8b", mi == 0

        def st(key, system, w, timeout, min_s, prio=None, optional=False, **params):
            stages.append(dict(
                key=f"{name}.{key}", stage=key, model_name=name, system=system, workload=w, model=path, device=dev,
                timeout=T or timeout, min_s=min_s, params={**cpu, **params}, optional=optional,
                prio=(0 if first else 2) if prio is None else prio))
        # priority order (the budget skips from the end): the first model's headline stages (0), its
        # latency sweep and Alpaca-like throughput (1), the other models' throughput stages (2), the
        # synchronous and eager profiles (3)
        st("build", "build", wl.subset(sg, 0), 200 if big else 120, 60 if big else 20, model_name=name)
        # the first model's engine also times the requests the transformers CB stages run, alone
        st("engine_sharegpt", "engine", sg, 120, 50 if big else 40, **({"first_n": n_cb} if first else {}))
        if first:
            # the full batch is 256 sequences (the engine's default max_num_seqs is 1024): 64 decode steps
            st("engine_profile", "engine_profile", sg, 100, 40, num_steps=16, num_seqs=256)
        # its 256 requests take ~110 s on an H100: the slot ends it partial (a rate over the tokens made)
        st("hf_cb_graphs", "hf_cb", wl.subset(sg, n_cb if first else max(n_cb // 2, 1)), 60 if first else 70,
           45, cb_config=dict(use_cuda_graph=True, use_async_batching=False, max_memory_percent=0.5))
        if first:
            # partial too; short slots leave the 8B shape's stages room in the 560 s budget (compiled
            # engine stages start ~7-20 s later than uncompiled ones)
            st("hf_cb_default", "hf_cb", wl.subset(sg, n_cb), 45, 40, cb_config={})
        # static batches of 32 finish no batch in the slot either (a rate over the tokens made)
        # (loading the model takes ~10-20 s of the slot; a partial run timed over < 5 s is no figure)
        st("hf_generate", "hf_generate", wl.subset(sg, n_gen), 50 if first else 55, 40, batch_size=32)
        if first:
            settings = [["n", 1], ["n", 2], ["n", 4], ["n", 6], ["beam", 2], ["beam", 4], ["beam", 6]]
            # blocks saved by sharing (a memory figure): no compiled blocks, to save their start-up
            st("engine_sharing", "engine_sharing", wl.subset(al, n_sharing), 75, 30, settings=settings,
               engine_overrides=dict(compile_decode=False))
            st("engine_latency", "engine_latency", sg, 80, 30, prio=1, rates=rates,
               arrival_window_s=4 if dry else 6)
            st("engine_alpaca", "engine", wl.subset(al, n_alp), 45, 25, prio=1)
            # decoder blocks not compiled (compile_decode is the default): only when asked for by --stages
            st("engine_profile_uncompiled", "engine_profile", sg, 90, 40, prio=1, num_steps=30, optional=True,
               engine_overrides=dict(compile_decode=False))
            st("engine_profile_threaded", "engine_profile", sg, 90, 40, prio=1, num_steps=30, optional=True,
               engine_overrides=dict(threaded_graph_launch=True))
            st("engine_sharegpt_uncompiled", "engine", sg, 120, 40, prio=1, optional=True,
               engine_overrides=dict(compile_decode=False))
            # other multi-step decode settings (the default runs 4 decode steps a schedule): only when
            # asked for by --stages
            for k in (1, 2, 8):
                st(f"engine_sharegpt_steps{k}", "engine", sg, 120, 40, prio=1, optional=True,
                   engine_overrides=dict(num_scheduler_steps=k))
            # other sequence counts a step than the default 1024 (256, then 512: the defaults until 2026-11-27)
            for n in (256, 512):
                st(f"engine_sharegpt_seqs{n}", "engine", sg, 120, 40, prio=1, optional=True,
                   engine_overrides=dict(max_num_seqs=n, max_num_batched_tokens=max(8192, n)))
            # a larger step token budget (vLLM's LLM default on >= 70 GB cards; the engine's is 8192): on request
            st("engine_sharegpt_tokens16k", "engine", sg, 120, 40, prio=1, optional=True,
               engine_overrides=dict(max_num_batched_tokens=16384))
            # prompt and mixed steps through eager blocks (EngineConfig.compile_prefill=False; compiled by
            # default since Engine v15): on request
            st("engine_sharegpt_eager_prefill", "engine", sg, 120, 40, prio=1, optional=True,
               engine_overrides=dict(compile_prefill=False))
            st("engine_profile_steps1", "engine_profile", sg, 90, 40, prio=1, num_steps=30, optional=True,
               engine_overrides=dict(num_scheduler_steps=1))
            # sibling projections not fused (EngineConfig.fuse_projections=False; fused by default): on request
            st("engine_sharegpt_unfused", "engine", sg, 120, 40, prio=1, optional=True, first_n=n_cb,
               engine_overrides=dict(fuse_projections=False))
            st("engine_profile_unfused", "engine_profile", sg, 90, 40, prio=1, num_steps=16, optional=True,
               engine_overrides=dict(fuse_projections=False))
            # a KV pool of 40,960 blocks (655k token slots; the default fills the card: ~203k blocks for the 1.1B
            # shape), so that the blocks a step reads lie in ~13 GiB instead of ~68 GiB: on request
            st("engine_sharegpt_pool40k", "engine", sg, 120, 40, prio=1, optional=True, first_n=n_cb,
               engine_overrides=dict(num_gpu_blocks=40960))
            st("engine_profile_pool40k", "engine_profile", sg, 90, 40, prio=1, num_steps=16, optional=True,
               engine_overrides=dict(num_gpu_blocks=40960))
            # a small batch (the end of a throughput run, where the host bounds the step)
            st("engine_profile_small", "engine_profile", sg, 90, 40, prio=1, num_steps=16, optional=True,
               num_seqs=16)
            st("engine_profile_steps8", "engine_profile", sg, 90, 40, prio=1, num_steps=8, optional=True,
               engine_overrides=dict(num_scheduler_steps=8))
            # diagnostics (synchronous steps, no graphs): only when asked for by --stages
            st("engine_profile_sync", "engine_profile", sg, 90, 40, prio=3, num_steps=30, optional=True,
               engine_overrides=dict(async_scheduling=False))
            st("engine_profile_eager", "engine_profile", sg, 90, 40, prio=3, num_steps=30, optional=True,
               engine_overrides=dict(enforce_eager=True))
    if args.stages:
        keep = set(args.stages.split(",")) | {"build"}
        unknown = keep - {s["stage"] for s in stages}
        if unknown:
            raise SystemExit(f"--stages: unknown stage(s) {sorted(unknown)}; known: "
                             f"{sorted({s['stage'] for s in stages})}")
        stages = [s for s in stages if s["stage"] in keep]
    else:
        stages = [s for s in stages if not s["optional"]]
    return sorted(stages, key=lambda x: x["prio"])


# --------------------------------------------------------------------------------- report
def figures(res: dict, first: str) -> dict:
    """The five headline figures from the first model's results (missing ones are left out)."""
    r = res.get(first, {})
    tps = (lambda k: (r.get(k) or {}).get("output_tokens_per_s") if wl.usable(r.get(k)) else None)
    figs, ours = {}, tps("engine_sharegpt")
    cb = [v for v in (tps("hf_cb_default"), tps("hf_cb_graphs")) if v]
    if ours and cb:
        figs["throughput_vs_hf_cb"] = (ours / max(cb), ">= 20")
        same = ((r.get("engine_sharegpt") or {}).get("first_n") or {})
        if same.get("output_tokens_per_s") and not same.get("partial"):
            figs["throughput_vs_hf_cb_same_requests"] = (same["output_tokens_per_s"] / max(cb), ">= 20")
    if ours and tps("hf_generate"):
        figs["throughput_vs_hf_generate"] = (ours / tps("hf_generate"), ">= 200")
    # a stage cut off before any request finished (e.g. the 8B shape alone under a short --budget-s) has no mean
    eng = r.get("engine_sharegpt") or {}
    kv = eng.get("kv_utilization_mean") if eng.get("completed") else None
    if kv is not None:
        figs["kv_utilization"] = (kv, ">= 0.98")
    sh = [s for s in (r.get("engine_sharing") or {}).get("settings", []) if s.get("saving_mean") is not None]
    par = [s["saving_mean"] for s in sh if s["kind"] == "n" and s["width"] > 1]
    beam = [s["saving_mean"] for s in sh if s["kind"] == "beam"]
    prof = r.get("engine_profile") if wl.usable(r.get("engine_profile")) else {}
    if prof.get("decode_step_vs_floor") is not None:
        figs["decode_step_vs_floor"] = (prof["decode_step_vs_floor"], "<= 3")
    if prof.get("gpu_busy_fraction") is not None:
        figs["gpu_busy_fraction"] = (prof["gpu_busy_fraction"], ">= 0.9")
    if par:
        figs["parallel_sampling_saving"] = (min(par), ">= 0.061")
    if beam:
        figs["beam_search_saving"] = (min(beam), ">= 0.376")
    return figs


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.system:
        return worker(args)
    import torch
    from tqdm.auto import tqdm

    from bench import workloads as e2e_plots
    from bench.summary import RESULTS_DIR, SUMMARY_PATH, card_name, update_figures

    dev = "cpu" if args.dry_run or not torch.cuda.is_available() else "cuda"
    card = "CPU (dry run)" if args.dry_run else card_name()
    tmp = Path(tempfile.mkdtemp(prefix="pagedattn-e2e-"))
    out_dir = Path(args.out_dir) if args.out_dir else (tmp / "results" if args.dry_run else
                                                       RESULTS_DIR / wl.card_slug(card))
    summary_path = (out_dir / "summary.json") if args.dry_run else SUMMARY_PATH
    model_dir = Path(args.model_dir) if args.model_dir else tmp / "models"
    budget = args.budget_s or (300 if args.dry_run else 560)
    budget_end = T_START + budget
    stages = plan(args, dev, model_dir)
    res: dict = {"card": card, "device": dev, "args": vars(args), "budget_s": budget, "definitions": DEFINITIONS,
                 "workloads": {}, "torch": torch.__version__}
    bar = tqdm(stages, desc="e2e", dynamic_ncols=True)
    for stage in bar:
        bar.set_postfix_str(stage["key"])
        m, key = stage["model_name"], stage["stage"]  # model names hold dots ("llama-1.1b")
        w = stage["workload"]
        res["workloads"][stage["key"]] = {k: w[k] for k in ("dataset", "num_requests", "mean_prompt_len",
                                                             "mean_output_len", "total_output_tokens")}
        if key != "build" and (res.get(m, {}).get("build") or {}).get("status") != "ok":
            r = {"status": "skipped", "reason": "model build failed"}
        else:
            r = run_stage(stage, budget_end, tmp, bar.write)
        res.setdefault(m, {})[key] = r
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "e2e.json").write_text(json.dumps(res, indent=1, default=str))
    bar.close()
    res["total_s"] = time.time() - T_START
    first = stages[0]["model_name"]
    figs = figures(res, first)
    res["figures"] = {k: v for k, (v, _) in figs.items()}
    res["partial_stages"] = [f"{m}.{k}" for m in wl.MODELS for k, r in (res.get(m) or {}).items()
                             if isinstance(r, dict) and (r.get("partial") or r.get("status") != "ok")]
    (out_dir / "e2e.json").write_text(json.dumps(res, indent=1, default=str))
    pngs = e2e_plots.plot_all(res, out_dir)
    if figs:
        cmd = ("python bench/bench_e2e.py" + (" --quick" if args.quick else "") + (" --dry-run" if args.dry_run else "")
               + (f" --stages {args.stages}" if args.stages else ""))
        update_figures(figs, card, f"{cmd}  # {first}", path=summary_path)
    e2e_plots.print_table(res, figs)
    if not args.model_dir:
        shutil.rmtree(model_dir, ignore_errors=True)  # the 8B checkpoint is 16 GB
    print(f"results: {out_dir / 'e2e.json'}; plots: {', '.join(p.name for p in pngs)}; "
          f"summary: {summary_path}; total {res['total_s']:.0f} s")


if __name__ == "__main__":
    main()
