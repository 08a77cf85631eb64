"""Per-token BIF on the tiny LM: ``bif run`` against devinterp 2.0.1, same model, sampler settings and draws.

    python -m benchmarks.lm_devinterp [--dir runs/example/tinylm] [--num-draws 200] [--out docs/lm_devinterp.json]

Both tools sample the same tiny GPT-2 (``bif example tinylm``; built into ``--dir`` if it is
missing) with the sampler block of ``bif/examples/tinylm.yaml``: chains, draws, burn-in,
steps per draw, step size ε, localization γ, nβ and minibatch size. Measured, each in its
own subprocess, with the peak resident memory summed over the process tree (main process,
Prefect server, Dask nannies and workers) sampled every 0.1 s:

- ``bif`` sequence level: ``bif run`` with ``covariance.token_matrix: false`` (bif.zarr and
  the token top-k tables);
- ``bif`` token level: the same run with ``token_matrix: true`` (adds bif_tokens.zarr);
- devinterp: ``devinterp.slt.sampling.sample`` once (its chains run one after another in one
  process), then ``compute_bif`` at ``correlation_method="sequence"`` and ``"token"``; its
  sequence-level (token-level) wall time is sampling + the sequence (token) reduction.

Agreement, like with like: devinterp returns correlations, so its matrices are compared
with ``-bif_corr`` (our sign: BIF = -Cov): the Pearson correlation over all (train, query)
sequence pairs, and over all (valid train token, valid query token) pairs. devinterp has no
padding mask: its loss function here is the same next-token cross-entropy with padded
positions set to 0 (a constant, so they carry no covariance), its sequence loss is the
*mean* over the T-1 positions (ours: the sum over valid tokens; for a correlation the two
differ by a constant factor per sequence), and nβ is scaled by (positions / valid tokens)
of the train set so that its SGLD gradient (mean over all B·(T-1) positions) matches ours
(mean over valid tokens). Both tools pad every text to the same length T (devinterp needs
one length). The two estimates use independent SGLD noise, so their agreement is bounded by
each one's Monte-Carlo error: we also report the split-half agreement of our own run
(chains 0..C/2-1 against the rest).

Figures on a shared 2-core machine are noisy; the script prints a JSON summary and writes it
to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_YAML = ROOT / "bif" / "examples" / "tinylm.yaml"


class PeakRSS:
    """Peak of the summed memory of a process and all its descendants, sampled every ``interval`` s.

    Summed PSS (proportional set size: a page shared by k processes counts 1/k in each), so
    pages that forked Dask workers share with their forkserver count once; the summed RSS of
    the same samples is kept too (``peak_rss``), which counts them in every process.
    """

    def __init__(self, pid: int, interval: float = 0.1):
        import psutil

        self.proc, self.interval, self.peak, self.peak_rss = psutil.Process(pid), interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        rss_at_pss, next_pss = 0, 0.0
        while not self._stop.is_set():
            try:
                procs = [self.proc] + self.proc.children(recursive=True)
            except psutil.NoSuchProcess:
                return
            total_rss = sum(_memory(p, "rss") for p in procs)
            now = time.monotonic()
            if now >= next_pss or total_rss > 1.05 * rss_at_pss:
                # PSS reads every mapping of every process: ~25% of a core every 0.1 s. So: when the RSS
                # sum has grown 5% since the last PSS reading, else every 5 s
                self.peak = max(self.peak, sum(_memory(p, "pss") for p in procs))
                rss_at_pss, next_pss = total_rss, now + 5.0
            self.peak_rss = max(self.peak_rss, total_rss)
            self._stop.wait(self.interval)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak / 2**30


def _memory(proc, kind: str) -> int:
    """``proc``'s RSS or PSS in bytes (0 once it is gone)."""
    import psutil

    try:
        return proc.memory_full_info().pss if kind == "pss" else proc.memory_info().rss
    except psutil.Error:
        return 0


def timed(cmd: list[str], *, env: dict | None = None) -> tuple[float, float, str]:
    """Run ``cmd``; (wall seconds, peak GiB of its process tree, its stdout). Fails loudly on error."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    mem = PeakRSS(proc.pid)
    out, err = proc.communicate()
    wall, peak = time.perf_counter() - t0, mem.stop()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    return wall, {"peak_gib": round(peak, 2), "peak_rss_sum_gib": round(mem.peak_rss / 2**30, 2)}, out


def settings(num_draws: int | None) -> dict:
    """The sampler block of tinylm.yaml (num_draws overridden if given)."""
    cfg = yaml.safe_load(EXAMPLE_YAML.read_text())
    s = dict(cfg["sampler"])
    if num_draws:
        s["num_draws"] = num_draws
    return s


def padded_length(model_dir: str) -> int:
    """One length T for both splits: the longest train or query text, in tokens."""
    from bif.lm import build

    p = build(model_dir, f"{model_dir}/train.jsonl", f"{model_dir}/query.jsonl", max_length=512)
    return max(p.train.input_ids.shape[1], p.query.input_ids.shape[1])


# -- devinterp, in its own process -------------------------------------------------------------
def devinterp_worker(model_dir: str, sampler: dict, length: int, out: str) -> None:
    """Sample with devinterp and write its sequence- and token-level correlations + timings to ``out`` (.npz)."""
    import random
    import resource

    import torch
    from datasets import Dataset as HFDataset
    from devinterp.slt.bif import compute_bif
    from devinterp.slt.sampling import sample

    from bif.lm import build

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    # the model as transformers loads it: bif's fused tanh-GELU (bif.lm.fuse_activations) is bif's own
    # speed-up, not something a devinterp user gets
    prob = build(model_dir, f"{model_dir}/train.jsonl", f"{model_dir}/query.jsonl", max_length=length,
                 padding="max_length", fused_activations=False)
    pad = int(prob.extras["tokenizer"].pad_token_id)
    tr, qu = prob.train.input_ids, prob.query.input_ids  # (n, T) each, same T
    bs = int(sampler["batch_size"])
    if len(tr) % bs or len(qu) % bs:
        raise SystemExit(f"devinterp evaluates whole batches: n_train {len(tr)} and n_query {len(qu)} must be "
                         f"multiples of batch_size {bs}")
    valid = (prob.train.attention_mask[:, 1:] > 0).sum().item()
    positions = tr.shape[0] * (tr.shape[1] - 1)
    nbeta = float(sampler.get("nbeta") or valid) * positions / valid

    def loss_fn(model, input_ids):  # (B, T) -> (B, T-1): next-token CE, padded targets set to 0
        logits = model(input_ids, use_cache=False).logits
        logp = torch.log_softmax(logits[:, :-1].float(), -1)
        nll = -logp.gather(-1, input_ids[:, 1:, None])[..., 0]
        return nll.masked_fill(input_ids[:, 1:] == pad, 0.0)

    def hf(ids):
        return HFDataset.from_dict({"input_ids": ids.tolist()}).with_format("torch")

    obs = {"train": (hf(tr), len(tr) // bs), "query": (hf(qu), len(qu) // bs)}
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        samples = sample(prob.model, hf(tr), obs, lr=float(sampler["step_size"]), n_beta=nbeta,
                         localization=float(sampler["gamma"]), num_chains=int(sampler["num_chains"]),
                         num_draws=int(sampler["num_draws"]), batch_size=bs,
                         num_burnin_steps=int(sampler["num_burnin_steps"]),
                         num_steps_bw_draws=int(sampler["steps_per_draw"]), init_seed=int(sampler.get("seed", 0)),
                         device="cpu", output_path=f"{tmp}/samples.zarr", loss_fn=loss_fn)
        t_sample = time.perf_counter() - t0
        mem_sample = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        # rows of the observables: devinterp evaluates a fixed shuffled order (obs_seed 1337); undo it
        order = {k: np.asarray(random.Random(1337).sample(range(len(v)), len(v))) for k, v in (("train", tr), ("query", qu))}
        for k, v in (("train", tr), ("query", qu)):
            stored = np.asarray(samples.dataset[f"input_ids_{k}"].values)
            assert (stored == v.numpy()[order[k]]).all(), f"devinterp's {k} rows are not in the expected order"
        t0 = time.perf_counter()
        seq = compute_bif(samples, correlation_method="sequence", device="cpu")["influences"].values
        t_seq = time.perf_counter() - t0
        mem_seq = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        t0 = time.perf_counter()
        tok = compute_bif(samples, correlation_method="token", device="cpu")["influences"].values
        t_tok = time.perf_counter() - t0
        mem_tok = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    # keys are sorted (query, train): rows 0..n_query-1 are query, then train; map back to sample ids
    nq = len(qu)
    rows_q, rows_t = np.arange(nq), nq + np.arange(len(tr))
    inv_t, inv_q = np.argsort(order["train"]), np.argsort(order["query"])
    seq_tq = seq[np.ix_(rows_t[inv_t], rows_q[inv_q])]  # (n_train, n_query) by sample id
    tok_tq = tok[np.ix_(rows_t[inv_t], rows_q[inv_q])]  # (n_train, n_query, T-1, T-1)
    np.savez(out, seq=seq_tq, tok=tok_tq, timings=np.array([setup, t_sample, t_seq, t_tok]),
             mem=np.array([mem_sample, mem_seq, mem_tok]), nbeta=nbeta)


# -- our run ---------------------------------------------------------------------------------
def bif_config(model_dir: str, sampler: dict, length: int, output: str, token_matrix: bool, path: Path) -> Path:
    cfg = yaml.safe_load(EXAMPLE_YAML.read_text())
    cfg["problem_args"].update(model=model_dir, train=f"{model_dir}/train.jsonl", query=f"{model_dir}/query.jsonl",
                               max_length=length, padding="max_length")
    cfg["checkpoint"] = f"{model_dir}/model.safetensors"
    cfg["output"] = output
    cfg["sampler"] = sampler
    cfg.setdefault("covariance", {})["token_matrix"] = token_matrix
    cfg.setdefault("quality", {})["allow_warnings"] = True
    path.write_text(yaml.safe_dump(cfg))
    return path


def split_half(output: str, num_chains: int) -> float:
    """Pearson r between -Corr of sequence losses from chains [0, C/2) and from [C/2, C) of our run."""
    import pandas as pd

    df = pd.read_parquet(f"{output}/traces")
    seq = df.groupby(["chain", "draw", "split", "sample"], observed=True)["loss"].sum().reset_index()
    halves = []
    for chains in (range(num_chains // 2), range(num_chains // 2, num_chains)):
        part = seq[seq["chain"].isin(list(chains))]
        mats = {s: part[part["split"] == s].pivot_table(index=["chain", "draw"], columns="sample", values="loss")
                for s in ("train", "query")}
        a, b = (m.to_numpy() - m.to_numpy().mean(0) for m in (mats["train"], mats["query"]))
        corr = (a.T @ b) / np.outer(np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=0)).clip(1e-30)
        halves.append(corr.ravel())
    return float(np.corrcoef(halves[0], halves[1])[0, 1])


def agreement(output: str, dv: dict) -> dict:
    import xarray as xr

    ours = xr.open_zarr(f"{output}/bif.zarr", consolidated=False)
    mine = np.asarray(ours["bif_corr"].values)  # (train, query), = -Corr
    seq_r = float(np.corrcoef(mine.ravel(), -dv["seq"].ravel())[0, 1])
    res = {"sequence_pearson": seq_r}
    tok_path = f"{output}/bif_tokens.zarr"
    if os.path.exists(tok_path):
        tk = xr.open_zarr(tok_path, consolidated=False)
        ts, tp = (np.asarray(tk[c].values) for c in ("train_sample", "train_position"))
        qs, qp = (np.asarray(tk[c].values) for c in ("query_sample", "query_position"))
        theirs = -dv["tok"][ts[:, None], qs[None, :], (tp - 1)[:, None], (qp - 1)[None, :]]
        res["token_pearson"] = float(np.corrcoef(np.asarray(tk["bif_corr"].values).ravel(), theirs.ravel())[0, 1])
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="runs/example/tinylm", help="the tiny LM (built with `bif example tinylm` if missing)")
    ap.add_argument("--num-draws", type=int, default=None, help="draws per chain (default: tinylm.yaml's)")
    ap.add_argument("--out", default="docs/lm_devinterp.json", help="where to write the JSON summary")
    ap.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    ap.add_argument("--worker", choices=["devinterp"], help=argparse.SUPPRESS)
    ap.add_argument("--args", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        devinterp_worker(**json.loads(a.args))
        return 0
    bif = str(Path(sys.executable).with_name("bif"))
    model_dir = str(Path(a.dir).resolve())
    if not Path(model_dir, "model.safetensors").exists():
        subprocess.run([bif, "example", "tinylm", model_dir], check=True, cwd=ROOT)
    sampler = settings(a.num_draws)
    length = padded_length(model_dir)
    work = Path(a.work or tempfile.mkdtemp(prefix="bif-lm-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)  # PREFECT_API_URL, if set, is used: a server of your own spares each run its start-up
    result: dict = {"sampler": sampler, "padded_length": length, "machine": f"{os.cpu_count()} cores, shared"}
    if not env.get("PREFECT_API_URL"):  # runs after the first find the kept server: time those
        subprocess.run([bif, "server", "start"], check=True, cwd=ROOT, capture_output=True)
    partial = work / "partial.json"  # finished stages, so a rerun with the same --work skips them
    done = json.loads(partial.read_text()) if partial.exists() else {}
    for level, token_matrix in (("sequence", False), ("token", True)):
        out = str(work / f"bif-{level}")
        if f"bif_{level}" not in done:
            cfg = bif_config(model_dir, sampler, length, out, token_matrix, work / f"{level}.yaml")
            wall, peak, _ = timed([bif, "run", str(cfg), "--no-progress"], env=env)
            done[f"bif_{level}"] = {"wall_s": round(wall, 1), **peak}
            partial.write_text(json.dumps(done))
        result[f"bif_{level}"] = done[f"bif_{level}"]
        print(level, result[f"bif_{level}"], file=sys.stderr, flush=True)
    npz = str(work / "devinterp.npz")
    args = json.dumps({"model_dir": model_dir, "sampler": sampler, "length": length, "out": npz})
    if "devinterp" not in done:
        wall, peak, _ = timed([sys.executable, "-m", "benchmarks.lm_devinterp", "--worker", "devinterp",
                               "--args", args])
        done["devinterp"] = [wall, peak]
        partial.write_text(json.dumps(done))
    wall, peak = done["devinterp"]
    dv = dict(np.load(npz))
    setup, t_sample, t_seq, t_tok = dv["timings"]
    result["devinterp"] = {"process_wall_s": round(wall, 1), **peak,
                           "setup_s": round(float(setup), 1), "sample_s": round(float(t_sample), 1),
                           "bif_sequence_s": round(float(t_seq), 2), "bif_token_s": round(float(t_tok), 2),
                           "maxrss_gib_after": {k: round(float(v), 3) for k, v in zip(("sample", "sequence", "token"),
                                                                                       dv["mem"])},
                           "nbeta": float(dv["nbeta"])}
    # devinterp's end to end per level: its process start-up, set-up and sampling, plus that level's reduction
    overhead = wall - (t_seq + t_tok)
    result["devinterp_sequence_wall_s"] = round(float(overhead + t_seq), 1)
    result["devinterp_token_wall_s"] = round(float(overhead + t_tok), 1)
    result["speedup_sequence"] = round(result["devinterp_sequence_wall_s"] / result["bif_sequence"]["wall_s"], 2)
    result["speedup_token"] = round(result["devinterp_token_wall_s"] / result["bif_token"]["wall_s"], 2)
    result["agreement"] = agreement(str(work / "bif-token"), dv)
    result["agreement"]["bif_split_half_sequence_pearson"] = round(split_half(str(work / "bif-token"),
                                                                              int(sampler["num_chains"])), 3)
    text = json.dumps(result, indent=1)
    print(text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
