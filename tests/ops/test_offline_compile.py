"""The Triton kernels compile for a Hopper GPU with the arguments their launchers pass, on any machine.

The interpreter that runs the kernels on the CPU accepts what the GPU compiler refuses (an unknown keyword
argument, a construct with no GPU lowering), so the CPU suite compiles the decode kernel (the default, every
opt-in order of its loads, several KV heads a program), its merge and the prefill kernel for sm_90a through the
real launchers, in a child process without ``TRITON_INTERPRET`` (under it ``triton.jit`` makes interpreted
functions). Uses ``bench/compile_report.py``; nothing runs on a GPU.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHILD = """
import json
from bench.bench_decode_skew import ENGINE
from bench.bench_prefill import PFULL
from bench.compile_report import decode_compile_report, prefill_compile_report
decode = decode_compile_report({"default": {}, "pf0": dict(prefetch=0), "pf1": dict(prefetch=1), "pf2": dict(prefetch=2),
                                "pf3": dict(prefetch=3), "pf4_s3": dict(prefetch=4, num_stages=3),
                                "kv2": dict(kv_heads_per_program=2)}, ENGINE)
prefill = prefill_compile_report({"default": {}}, PFULL)
print("RESULT" + json.dumps({"decode": decode, "prefill": prefill}))
"""


def test_kernels_compile_for_sm90_through_their_launchers():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    line = next(x for x in res.stdout.splitlines() if x.startswith("RESULT"))
    report = json.loads(line[len("RESULT"):])
    for name, row in report["decode"].items():
        assert "error" not in row, (name, row)
        assert row["decode"]["regs"] and not row["decode"]["ptxas"], (name, row["decode"])
        assert row["merge"] is not None and row["merge"]["regs"], (name, row["merge"])
    prefill = report["prefill"]["default"]
    assert "error" not in prefill and prefill["regs"] and not prefill["ptxas"], prefill
