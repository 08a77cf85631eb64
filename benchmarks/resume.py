"""What a resume saves over a restart: digits, `bif run` killed (SIGKILL, whole process group) once every
chain has committed half of its blocks, then rerun into the same output (resume) vs a fresh output
(restart). One-off measurement, not a timed test:

    python -m benchmarks.resume [--draws 400] [--chains 2] [--n-train 800] [--workdir DIR]

Prints the wall times of `bif run` (each starts its own Prefect server and Dask cluster, as a user's
does) and the manifests' sampling times, and writes docs/resume.json.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIF = str(Path(sys.executable).parent / "bif")


def _run(args: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    res = subprocess.run([BIF, *args], cwd=cwd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"bif {' '.join(args)} failed:\n{res.stdout}\n{res.stderr}")
    return time.perf_counter() - t0


def _blocks(out: Path) -> int:
    return len(list((out / "traces").glob("chain-*/block-*.parquet")))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--draws", type=int, default=400)
    ap.add_argument("--chains", type=int, default=2)
    ap.add_argument("--n-train", type=int, default=800)
    ap.add_argument("--block", type=int, default=20, help="draws_per_block")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default="docs/resume.json")
    a = ap.parse_args(argv)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="bif-resume-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(work / "prefect-home"))
    os.environ.pop("PREFECT_API_URL", None)
    ckpt = work / "digits.pt"
    if not ckpt.exists():
        _run(["example", "digits", str(ckpt), "--epochs", "100"], work)
    sets = ["--set", f"checkpoint={ckpt}", "--set", f"problem_args.n_train={a.n_train}",
            "--set", f"sampler.num_chains={a.chains}", "--set", f"sampler.num_draws={a.draws}",
            "--set", f"sampler.draws_per_block={a.block}", "--set", "quality.allow_warnings=true", "--no-progress"]
    cfg = str(Path(__file__).resolve().parents[1] / "bif" / "examples" / "digits.yaml")
    total_blocks = a.chains * (a.draws // a.block)
    _run(["run", cfg, *sets, "--output", str(work / "warm")], work)  # Prefect database and caches created once

    # the interrupted run: killed once every chain has half of its blocks
    killed = work / "killed"
    t0 = time.perf_counter()
    proc = subprocess.Popen([BIF, "run", cfg, *sets, "--output", str(killed)], cwd=work, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    per_chain = a.draws // a.block
    while proc.poll() is None:
        counts = [len(list((killed / "traces" / f"chain-{c}").glob("block-*.parquet"))) for c in range(a.chains)]
        if min(counts) >= per_chain // 2:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    t_killed = time.perf_counter() - t0
    at_kill = _blocks(killed)
    time.sleep(1)

    t_resume = _run(["run", cfg, *sets, "--output", str(killed)], work)
    t_restart = _run(["run", cfg, *sets, "--output", str(work / "restart")], work)
    m_res = json.loads((killed / "manifest.json").read_text())
    m_new = json.loads((work / "restart" / "manifest.json").read_text())
    out = {"draws": a.draws, "chains": a.chains, "n_train": a.n_train, "draws_per_block": a.block,
           "blocks_total": total_blocks, "blocks_at_kill": at_kill, "killed_after_s": round(t_killed, 1),
           "resume_wall_s": round(t_resume, 1), "restart_wall_s": round(t_restart, 1),
           "resume_sampling_s": round(m_res["timings"]["sampling_s"], 1),
           "restart_sampling_s": round(m_new["timings"]["sampling_s"], 1),
           "resumed_blocks": m_res.get("resumed_blocks"),
           "saved_wall_s": round(t_restart - t_resume, 1),
           "saved_wall_share": round(1 - t_resume / t_restart, 3),
           "saved_sampling_share": round(1 - m_res["timings"]["sampling_s"] / m_new["timings"]["sampling_s"], 3),
           "machine": f"{os.cpu_count()} cores; shared with other jobs unless stated"}
    print(json.dumps(out, indent=2))
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
