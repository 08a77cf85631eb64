"""GPU benchmark: one short prepared script for a machine with a GPU (issue 11, target 6).

    python -m benchmarks.gpu [--device auto|cuda|cpu] [--out DIR] [--draws 1000] [--quick] [--no-run]

Measures, all in one run, on ``--device`` (auto: CUDA when present, else CPU as a smoke test):

1. digits per-draw time: the pipeline's chain task (``bif.tasks.pipeline.run_chain``: the
   SGLD chain, its checks and the Parquet block commits, in this process) against a bare
   torch loop on the same device doing the same steps and loss evaluations
   (``benchmarks.pipeline.bare_loop``), and against that loop with the chain's own step (``same_ops``:
   on a GPU the plain loop's per-tensor update launches more kernels than the chain's, so only this
   one prices the pipeline's overhead alone);
2. several chains sharing one device: 1, 2 and 4 chain processes at once, pipeline and bare,
   as total draws per second;
3. a whole ``bif run`` (subprocess: local Prefect server, Dask LocalCluster, 2 chains) with
   ``compute.device`` set to the device (``--no-run`` skips it);
4. when ``bif.examples.tinylm`` exists: evaluation tokens per second of the pipeline's
   per-sample loss evaluation against the model's bare forward pass on the same batches, and against
   that forward pass plus the per-token cross-entropy (the work the loss must do), with torch.profiler's
   table of the pipeline's evaluation;
5. a whole ``bif run`` of the tinylm example (per-token BIF, 4 chains x 200 draws) on the device, twice:
   the first starts the Prefect server and a cluster, the second finds them kept (``--no-run`` skips it).

Writes ``gpu.json`` and ``gpu.md`` to ``--out`` (default ``$OUT``, else ``gpu-bench/``). A stage that
fails is recorded with its traceback and the others still run.

On a machine whose Python lacks the project's packages (the lent H200: torch, pyarrow, xarray are
there, Prefect, Dask and great-expectations are not), carry their wheels and run from a checkout
(``flows/`` and ``tasks/`` are the ``bif.flows`` / ``bif.tasks`` packages of an install, hence the links)::

    pip install --no-index --no-deps --target /tmp/site .whl/*.whl; export PYTHONPATH=/tmp/site
    ln -sfn ../tasks bif/tasks; ln -sfn ../flows bif/flows; python3 -m benchmarks.gpu --out $OUT

Keep pip's compiling (no ``--no-compile``): otherwise stage 3's first run on a fresh Prefect home also compiles
the ``.pyc`` of Prefect's server and its dependencies, ~20 s of its ~50 s on the H200 machine (session 36).
Sized to finish in well under 8 minutes on one H200 (~1 minute on CPU with ``--quick``).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _digits_cfg(workdir: Path, *, device: str, num_chains: int, num_draws: int, name: str) -> Path:
    """A digits config on ``device`` with its own output folder; returns the YAML path."""
    data = yaml.safe_load((ROOT / "bif/examples/digits.yaml").read_text())
    data.update(checkpoint=str(workdir / "digits.pt"), output=str(workdir / name))
    data["sampler"].update(num_chains=num_chains, num_draws=num_draws, draws_per_block=100)
    data["compute"] = {"device": device, "n_workers": num_chains}
    data["quality"] = {"enabled": False, "diagnostics": False}
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _pipeline_chain(args: tuple[str, int]) -> dict:
    """Run chain ``chain`` of the prepared config as the chain task does; its sampling seconds."""
    cfg_path, chain = args
    from bif.config import load_config
    from bif.tasks import pipeline

    cfg = load_config(cfg_path)
    res = pipeline.run_chain(cfg, chain, ref_train_loss_mean=1.0)
    _sync(cfg.compute.device)
    return {"sampling_s": res.sampling_seconds, "draws": res.draws_sampled}


def _bare_chain(args: tuple[str, int]) -> dict:
    cfg_path, _chain = args
    from benchmarks.pipeline import bare_loop
    from bif.config import load_config

    cfg = load_config(cfg_path)
    out = bare_loop(cfg, cfg.sampler.num_draws, device=cfg.compute.device)
    return {"sampling_s": out["seconds"], "draws": cfg.sampler.num_draws}


def _bare_same_ops_chain(args: tuple[str, int]) -> dict:
    """The bare loop with the chain's own step (``same_ops``): the yardstick for the pipeline's overhead alone."""
    cfg_path, _chain = args
    from benchmarks.pipeline import bare_loop
    from bif.config import load_config

    cfg = load_config(cfg_path)
    out = bare_loop(cfg, cfg.sampler.num_draws, device=cfg.compute.device, same_ops=True)
    return {"sampling_s": out["seconds"], "draws": cfg.sampler.num_draws}


def _prepare(cfg_path: Path) -> None:
    from bif.config import load_config
    from bif.tasks import pipeline

    pipeline.prepare_run(load_config(str(cfg_path)))


def _in_processes(fn, cfg_path: Path, k: int) -> dict:
    """``k`` chains at once, one spawned process each; wall time from the first to the last finish."""
    with mp.get_context("spawn").Pool(k) as pool:
        res = pool.map(fn, [(str(cfg_path), c) for c in range(k)])
    slowest = max(r["sampling_s"] for r in res)
    draws = sum(r["draws"] for r in res)
    return {"chains": k, "slowest_chain_s": slowest, "draws_per_s": draws / slowest,
            "per_draw_s_per_chain": slowest / res[0]["draws"]}


def bench_per_draw(workdir: Path, device: str, num_draws: int) -> dict:
    """Pipeline chain task vs bare loop, one chain each, same device, same process kind."""
    cfg = _digits_cfg(workdir, device=device, num_chains=1, num_draws=num_draws, name="one")
    _prepare(cfg)
    bare = _in_processes(_bare_chain, cfg, 1)
    ours = _in_processes(_pipeline_chain, cfg, 1)
    same = _in_processes(_bare_same_ops_chain, cfg, 1)
    return {"draws": num_draws, "pipeline_per_draw_s": ours["per_draw_s_per_chain"],
            "bare_per_draw_s": bare["per_draw_s_per_chain"],
            "ratio": ours["per_draw_s_per_chain"] / bare["per_draw_s_per_chain"],
            "bare_same_ops_per_draw_s": same["per_draw_s_per_chain"],
            "ratio_vs_same_ops": ours["per_draw_s_per_chain"] / same["per_draw_s_per_chain"]}


def bench_sharing(workdir: Path, device: str, num_draws: int, chains: list[int]) -> list[dict]:
    """1, 2, 4 chains at once on one device: total draws/s, pipeline and bare."""
    rows = []
    for k in chains:
        cfg = _digits_cfg(workdir, device=device, num_chains=k, num_draws=num_draws, name=f"share{k}")
        _prepare(cfg)
        ours = _in_processes(_pipeline_chain, cfg, k)
        bare = _in_processes(_bare_chain, cfg, k)
        rows.append({"chains": k, "pipeline_draws_per_s": ours["draws_per_s"], "bare_draws_per_s": bare["draws_per_s"],
                     "ratio": bare["draws_per_s"] / ours["draws_per_s"]})
    return rows


def _timed_runs(workdir: Path, args: list[str], labels: tuple[str, ...], num_draws: int) -> dict:
    """`bif run ARGS --output workdir/LABEL` once per label, one after another, on the Prefect home
    ``workdir/prefect-home`` (the first run on it creates it); the kept server is stopped after."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(workdir / "prefect-home")
    try:
        return {label: _timed_run(args, workdir / label, env, num_draws) for label in labels}
    finally:
        subprocess.run([sys.executable, "-m", "bif.flows.cli", "server", "stop"], env=env, capture_output=True,
                       cwd=ROOT, timeout=60)


def _timed_run(args: list[str], out_dir: Path, env: dict, num_draws: int) -> dict:
    """`bif run ARGS --output OUT_DIR` as a subprocess: its wall time and its manifest's phases."""
    t0 = time.time()
    res = subprocess.run([sys.executable, "-m", "bif.flows.cli", "run", *args, "--output", str(out_dir)], env=env,
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    wall = time.time() - t0
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-2000:])
    t = json.loads((out_dir / "manifest.json").read_text())["timings"]
    return {"wall_s": wall, "startup_s": t["sampling_started_at"] - t0, "sampling_s": t["sampling_s"],
            "per_draw_s": max(t["chain_sampling_s"]) / num_draws, "chains": len(t["chain_sampling_s"]),
            "after_sampling_s": wall - (t["sampling_started_at"] - t0) - t["sampling_s"]}


def bench_whole_run(workdir: Path, device: str, num_draws: int) -> dict:
    """A whole `bif run` subprocess (2 chains) on the device, on a fresh Prefect home (server stopped after)."""
    cfg = _digits_cfg(workdir, device=device, num_chains=2, num_draws=num_draws, name="whole")
    data = yaml.safe_load(cfg.read_text())
    data["quality"] = {"enabled": True, "diagnostics": True}
    cfg.write_text(yaml.safe_dump(data))
    return _timed_runs(workdir, [str(cfg), "--no-progress"], ("fresh_home", "kept_server"), num_draws)


def bench_tinylm_run(workdir: Path, device: str, quick: bool) -> dict | None:
    """A whole `bif run` of the tinylm example (per-token BIF, tinylm.yaml's 4 chains x 200 draws) on the device."""
    try:
        import bif.examples.tinylm as tinylm
    except ImportError:
        return None
    example = workdir / "tinylm-example"
    t0 = time.perf_counter()
    tinylm.save_example(str(example))
    train_s = time.perf_counter() - t0
    sets = [f"compute.device={device}", f"problem_args.model={example}", f"problem_args.train={example}/train.jsonl",
            f"problem_args.query={example}/query.jsonl", f"checkpoint={example}/model.safetensors"]
    if quick:
        sets += ["sampler.num_draws=20", "sampler.num_burnin_steps=10", "sampler.draws_per_block=10"]
    draws = 20 if quick else 200
    args = [str(ROOT / "bif/examples/tinylm.yaml"), "--no-progress", "--allow-warnings"]
    for kv in sets:
        args += ["--set", kv]
    # the first starts the server and a cluster (the digits runs' server was stopped); the second finds them kept
    runs = _timed_runs(workdir, args, ("tinylm-first", "tinylm-second"), draws)
    return {"example_train_s": train_s, "draws": draws, "chains": runs["tinylm-first"]["chains"],
            "first": runs["tinylm-first"], "second": runs["tinylm-second"]}


def bench_tinylm(workdir: Path, device: str, repeats: int) -> dict | None:
    """Tokens/s of the pipeline's per-sample loss evaluation vs the bare forward pass (None: no tinylm)."""
    try:
        import bif.examples.tinylm as tinylm  # added by the LM work; absent on older trees
    except ImportError:
        return None
    import torch

    from bif.config import load_config
    from bif.sampling.chain import SGLDChain, evaluate_losses
    from bif.tasks.pipeline import materialize_problem

    here = os.getcwd()
    os.chdir(workdir)  # the example writes to, and its config reads from, runs/example/tinylm
    try:
        tinylm.save_example()
        cfg = load_config(str(ROOT / "bif/examples/tinylm.yaml"), output=str(workdir / "tinylm-run"),
                          overrides=[f"compute.device={device}"])
        problem, _ = materialize_problem(cfg)
        chain = SGLDChain(problem, cfg.sampler, chain=0, device=device)
        batches, _ = chain.eval_data
        sizes = chain._train_sizes
        tokens = 0
        for b in batches:
            if isinstance(b, dict):
                mask = b.get("attention_mask")
                tokens += int(mask.sum()) if mask is not None else b["input_ids"].numel()
            else:
                tokens += b[0].numel()
        out = torch.empty(chain.n_train, dtype=chain.loss_dtype, device=chain.device)

        def pipeline_eval():
            evaluate_losses(problem, chain.model, batches, sizes, out)

        @torch.no_grad()
        def bare_forward():
            for b in batches:
                chain.model(**b) if isinstance(b, dict) else chain.model(b[0])

        @torch.no_grad()
        def bare_loss():
            """The forward pass plus the per-token cross-entropy summed per sequence: the work the loss must do."""
            for b in batches:
                ids = b["input_ids"]
                logits = chain.model(input_ids=ids, attention_mask=b["attention_mask"], use_cache=False).logits
                nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                        ids[:, 1:].reshape(-1), reduction="none")
                nll.view(ids.shape[0], -1).sum(dim=1)

        figures = {}
        for name, fn in (("pipeline", pipeline_eval), ("bare_forward", bare_forward), ("bare_loss", bare_loss)):
            fn()  # warm-up
            _sync(device)
            t = time.perf_counter()
            for _ in range(repeats):
                fn()
            _sync(device)
            figures[f"{name}_tokens_per_s"] = repeats * tokens / (time.perf_counter() - t)
        figures["tokens_per_eval"] = tokens
        figures["ratio"] = figures["bare_forward_tokens_per_s"] / figures["pipeline_tokens_per_s"]
        figures["ratio_vs_bare_loss"] = figures["bare_loss_tokens_per_s"] / figures["pipeline_tokens_per_s"]
        figures["profile"] = _profile(pipeline_eval, device)
        return figures
    finally:
        os.chdir(here)


def _profile(fn, device: str, repeats: int = 3, rows: int = 15) -> str:
    """torch.profiler's table of ``fn`` run ``repeats`` times: the ops that take the device's (or CPU's) time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        for _ in range(repeats):
            fn()
        _sync(device)
    key = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def _phases(run: dict) -> str:
    """One timed run (:func:`_timed_run`) as 'wall s (start-up s / per draw ms / after sampling s)'."""
    return (f"{run['wall_s']:.1f} s ({run['startup_s']:.1f} s / {1e3 * run['per_draw_s']:.2f} ms / "
            f"{run['after_sampling_s']:.1f} s)")


def render_markdown(r: dict) -> str:
    dev = r["machine"]["device"]
    rows = [f"GPU benchmark on {dev} ({r['machine'].get('gpu') or 'no GPU'}), torch {r['machine']['torch']}, "
            f"measured {r['machine']['date']} in one run.", "", "| what | measured |", "|---|---|"]
    p = r.get("per_draw")
    if isinstance(p, dict):
        for what, bare, ratio in (
                (f"time per draw, pipeline chain task vs bare {dev} loop (1 chain, {p['draws']} draws)",
                 "bare_per_draw_s", "ratio"),
                ("the same vs the bare loop with the chain's own step (same ops)", "bare_same_ops_per_draw_s",
                 "ratio_vs_same_ops")):
            if ratio in p:
                rows.append(f"| digits: {what} | {1e3 * p['pipeline_per_draw_s']:.2f} ms vs {1e3 * p[bare]:.2f} ms = "
                            f"{p[ratio]:.2f}x |")
    for s in r.get("sharing") if isinstance(r.get("sharing"), list) else []:
        rows.append(f"| digits: {s['chains']} chain(s) sharing one {dev}: total draws/s, pipeline vs bare | "
                    f"{s['pipeline_draws_per_s']:.0f} vs {s['bare_draws_per_s']:.0f} (bare {s['ratio']:.2f}x) |")
    w = r.get("whole_run")
    if isinstance(w, dict) and "kept_server" in w:
        fresh = w["fresh_home"]["wall_s"]
        rows.append(f"| whole `bif run` on {dev}, 2 chains: wall (start-up / per draw / after sampling) | "
                    f"{_phases(w['kept_server'])}; first run on a fresh Prefect home {fresh:.1f} s |")
    t = r.get("tinylm")
    if isinstance(t, dict) and "ratio" in t:
        for what, bare, ratio in (
                ("evaluation tokens/s, pipeline loss evaluation vs bare forward", "bare_forward_tokens_per_s", "ratio"),
                ("the same vs bare forward plus per-token cross-entropy", "bare_loss_tokens_per_s",
                 "ratio_vs_bare_loss")):
            if ratio in t:
                rows.append(f"| tinylm: {what} | {t['pipeline_tokens_per_s']:,.0f} vs {t[bare]:,.0f} "
                            f"(bare {t[ratio]:.2f}x) |")
    t = r.get("tinylm_run")
    if isinstance(t, dict) and "second" in t:
        rows.append(f"| whole `bif run` of tinylm on {dev} (per-token BIF, {t['chains']} chains x {t['draws']} draws): "
                    f"wall (start-up / per draw / after sampling) | second run {_phases(t['second'])}; "
                    f"first {_phases(t['first'])} |")
    for key in ("per_draw", "sharing", "whole_run", "tinylm", "tinylm_run"):
        if isinstance(r.get(key), str):
            rows.append(f"| {key} | failed: {r[key].splitlines()[-1][:200]} |")
        elif r.get(key, "absent") is None:
            rows.append(f"| {key} | not available in this tree |")
    probe = r["machine"].get("memory")
    if probe:
        from benchmarks.machine import describe

        rows.append(f"| machine: fresh memory | {describe(probe)} |")
    return "\n".join(rows) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto (CUDA when present), cuda, cuda:N or cpu")
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu-bench", help="folder for gpu.json / gpu.md")
    ap.add_argument("--draws", type=int, default=1000, help="draws per chain (default 1000)")
    ap.add_argument("--chains", default="1,2,4", help="chain counts sharing the device (default 1,2,4)")
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke test of the script itself")
    ap.add_argument("--no-run", action="store_true", help="skip the whole `bif run` subprocess")
    args = ap.parse_args(argv)
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    draws = 100 if args.quick else args.draws
    chains = [int(c) for c in args.chains.split(",")]
    gpu = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else None
    from benchmarks.machine import memory_probe

    results: dict = {"machine": {"device": device, "gpu": gpu, "torch": torch.__version__, "cores": os.cpu_count(),
                                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                 "memory": memory_probe(idle_s=2.5)}}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bif-gpu-bench-"))
    t_all = time.perf_counter()

    def save() -> None:
        results["seconds"] = time.perf_counter() - t_all
        (out_dir / "gpu.json").write_text(json.dumps(results, indent=1, default=str))
        (out_dir / "gpu.md").write_text(render_markdown(results))

    try:
        from bif.examples.digits import save_checkpoint

        save_checkpoint(str(work / "digits.pt"))
        stages = [("per_draw", lambda: bench_per_draw(work, device, draws)),
                  ("sharing", lambda: bench_sharing(work, device, draws, chains)),
                  ("whole_run", None if args.no_run else lambda: bench_whole_run(work, device, draws)),
                  ("tinylm", lambda: bench_tinylm(work, device, 3 if args.quick else 20)),
                  ("tinylm_run", None if args.no_run else lambda: bench_tinylm_run(work, device, args.quick))]
        for name, fn in stages:
            if fn is None:
                continue
            t = time.perf_counter()
            try:
                results[name] = fn()
            except Exception:  # noqa: BLE001 - one failed stage must not lose the others' figures
                results[name] = traceback.format_exc()
            results.setdefault("stage_seconds", {})[name] = time.perf_counter() - t
            print(f"{name}: {json.dumps(results[name], default=str)[:600]}", flush=True)
            save()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    save()
    print(render_markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
