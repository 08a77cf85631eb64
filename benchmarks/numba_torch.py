"""torch SGLD steps before and after one R-hat/ESS call in the same process: numba's thread pool against torch.

    python -m benchmarks.numba_torch            # ~1-2 min on 2 CPU cores

Each variant runs in ``--workers`` fresh processes at once (default: one per core, as a LocalCluster
whose workers all sample), each with the environment of a Dask worker (``OMP_NUM_THREADS=1``, one
torch thread): a digits SGLD chain (batch 128, 5 steps per draw) is timed per draw, then
:func:`bif.quality.diagnostics.rhat_ess` runs once on a (4, 200, 2000) array, then the chain is
timed again. Variants:

- ``numba default``: ``NUMBA_NUM_THREADS`` = the core count (numba's own default, what every
  worker had before the cap);
- ``capped (bif)``: what :mod:`bif.flows.runtime` gives its workers (``NUMBA_NUM_THREADS=1``,
  ``OMP_WAIT_POLICY=PASSIVE``);
- ``control``: no diagnostics call (a numpy sort instead), to show the drift of the machine
  between the two timings.

Prints a table and writes ``docs/numba_torch.json``. With idle cores beside it the spinning pool
costs nothing (``--workers 1`` on a quiet 2-core machine: 0.85x); it hurts when every core is busy,
as in a cluster whose workers all sample.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, time, numpy as np, torch
torch.set_num_threads(1)
from bif.config import SamplerConfig
from bif.examples.digits import build, train_model
from bif.sampling.chain import SGLDChain
from bif.quality.diagnostics import rhat_ess
p = build(); train_model(p.model, p.train, seed=0, epochs=50)
s = SamplerConfig(num_chains=1, num_draws=100, num_burnin_steps=0, steps_per_draw=5, step_size=3.5e-4,
                  gamma=170.0, batch_size=128, seed=0, draws_per_block=50)
def per_draw():
    best = []
    for _ in range(2):
        ch = SGLDChain(p, s, chain=0); t = time.perf_counter()
        for _b in ch.run(num_draws=100, draws_per_block=50): pass
        best.append((time.perf_counter() - t) / 100)
    return min(best)
before = per_draw()
import os
t = time.perf_counter()
if os.environ.get("BENCH_NO_DIAGNOSTICS"):
    np.sort(np.random.default_rng(0).normal(size=(4, 200, 2000)), axis=1)  # control: no numba at all
else:
    rhat_ess(np.random.default_rng(0).normal(size=(4, 200, 2000)))
diag = time.perf_counter() - t
after = per_draw()
import sys
numba = sys.modules.get("numba")
layer = numba.threading_layer() if numba and not os.environ.get("BENCH_NO_DIAGNOSTICS") else None
print(json.dumps({"before_ms": 1e3 * before, "after_ms": 1e3 * after, "rhat_ess_s": diag,
                  "numba_threads": numba.config.NUMBA_NUM_THREADS if numba else None, "layer": layer}))
"""


def run(extra: dict[str, str], workers: int) -> dict:
    """``workers`` processes at once, like the workers of a LocalCluster on every core; their mean."""
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_NUM_THREADS", "OMP_WAIT_POLICY")}
    env |= {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"} | extra
    procs = [subprocess.Popen([sys.executable, "-c", CHILD], env=env, stdout=subprocess.PIPE, text=True, cwd=ROOT)
             for _ in range(workers)]
    outs = []
    for p in procs:
        stdout, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"a benchmark process failed (exit {p.returncode})")
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    return {k: (float(np.mean([o[k] for o in outs])) if isinstance(outs[0][k], float) else outs[0][k])
            for k in outs[0]}


def main(argv=None) -> int:
    cores = str(os.cpu_count() or 1)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=int(cores),
                    help="processes at once, like a LocalCluster's workers (default: one per core)")
    args = ap.parse_args(argv)
    variants = {"numba default": {"NUMBA_NUM_THREADS": cores},
                "capped (bif)": {"NUMBA_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"},
                "control": {"BENCH_NO_DIAGNOSTICS": "1"}}
    rows = {}
    for name, extra in variants.items():
        r = run(extra, args.workers)
        rows[name] = r | {"slowdown": r["after_ms"] / r["before_ms"]}
        print(f"{name:>14}: {r['before_ms']:.2f} ms/draw before, {r['after_ms']:.2f} ms/draw after one rhat_ess "
              f"({rows[name]['slowdown']:.2f}x; numba threads {r['numba_threads']}, layer {r['layer']}, "
              f"rhat_ess {r['rhat_ess_s']:.1f} s incl. JIT)", flush=True)
    (ROOT / "docs" / "numba_torch.json").write_text(json.dumps({"cores": int(cores), "workers": args.workers,
                                                                "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
