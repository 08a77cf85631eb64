"""The tiny-LM example as a user types it: `bif example tinylm`, then `bif run bif/examples/tinylm.yaml`.

The corpus plants key -> value facts (bif.examples.tinylm); facts.json says which train
texts state each fact and where each query uses it. The known structure: for the VALUE
token of a query, the train texts that state the same fact are the most helpful ones
(most negative BIF: upweighting them lowers the query token's loss). We measure it as
precision@k (k = copies per fact) of fact-carrying train texts among the top-k:

- ``token``: the query token's top-k train *tokens* in topk_tokens.parquet (sign negative);
- ``value``: the same, counting only the carriers' VALUE tokens (the exact planted token);
- ``token_corr``: the query token's top-k train tokens by ``bif_corr`` (bif_tokens.zarr): the
  correlation does not favour the high-variance filler tokens that ``bif`` (a covariance) does;
- ``seq_tok``: the top-k train *texts* by ``bif_seq_tok`` (bif_tokens.zarr);
- ``seq``: the top-k train texts for the whole query text (bif.zarr), which also sums the
  filler tokens' noise.

Chance is copies / n_train (1/16) for text-level and token-level counts, and far less for
``value``. Thresholds: the measured figures (comment of THRESHOLDS, README) less a margin.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_cli import user_env  # the user's shell of the README command tests

BIF = str(Path(sys.executable).parent / "bif")
REPO = Path(__file__).resolve().parents[1]

# precision@4 means over the 16 query value tokens; chance 0.0625 (value: 4/928 = 0.004).
# Measured with tinylm.yaml on the example's seed 0 (the one `bif example tinylm` builds):
# token 0.406, value 0.406, token_corr 0.516, seq_tok 0.344, seq 0.328. Over seeds 0, 1, 2 (a
# later build of each, quiet machine) the minima were token 0.297, value 0.266, token_corr 0.562,
# seq_tok 0.25, seq 0.266 (README): every threshold keeps a margin of at least 0.10 over them.
THRESHOLDS = {"token": 0.20, "value": 0.20, "token_corr": 0.25, "seq_tok": 0.15, "seq": 0.12}


def bif(*args: str, cwd: Path, env: dict[str, str], timeout: int = 1200) -> subprocess.CompletedProcess:
    return subprocess.run([BIF, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def structure(run: Path, facts: dict) -> dict[str, list[float]]:
    """Per query VALUE token, precision@k of the fact's carriers (see the module docstring); k = copies."""
    import xarray as xr

    topk = pd.read_parquet(run / "topk_tokens.parquet")
    seq = xr.open_zarr(run / "bif.zarr", consolidated=False)["bif"].values  # (train, query)
    tok = xr.open_zarr(run / "bif_tokens.zarr", consolidated=False)
    seq_tok = tok["bif_seq_tok"].values  # (train, query_token)
    corr = tok["bif_corr"].values  # (train_token, query_token)
    ts = tok["train_sample"].values
    qs, qp = tok["query_sample"].values, tok["query_position"].values
    out: dict[str, list[float]] = {"token": [], "value": [], "token_corr": [], "seq_tok": [], "seq": []}
    for fact in facts["facts"]:
        carriers = set(fact["train_samples"])
        values = set(zip(fact["train_samples"], fact["train_positions"]))
        k = len(carriers)
        for q, pos in zip(fact["query_samples"], fact["query_positions"]):
            rows = topk[(topk["query_sample"] == q) & (topk["query_position"] == pos)
                        & (topk["sign"] == "negative") & (topk["rank"] < k)].sort_values("rank")
            assert len(rows) == k, f"query {q} position {pos} has {len(rows)} negative top-k rows"
            out["token"].append(float(np.mean([s in carriers for s in rows["train_sample"]])))
            out["value"].append(float(np.mean([(s, p) in values for s, p in
                                               zip(rows["train_sample"], rows["train_position"])])))
            col = np.flatnonzero((qs == q) & (qp == pos))
            assert len(col) == 1
            top = np.argsort(corr[:, col[0]], kind="stable")[:k]
            out["token_corr"].append(float(np.mean([ts[t] in carriers for t in top])))
            top = np.argsort(seq_tok[:, col[0]], kind="stable")[:k]  # most negative first
            out["seq_tok"].append(float(np.mean([t in carriers for t in top])))
            top = np.argsort(seq[:, q], kind="stable")[:k]
            out["seq"].append(float(np.mean([t in carriers for t in top])))
    return out


@pytest.fixture(scope="module")
def home(tmp_path_factory, user_prefect_home) -> dict:
    """A user's directory with the example config where the README says it is."""
    cwd = tmp_path_factory.mktemp("user")
    (cwd / "bif" / "examples").mkdir(parents=True)
    shutil.copy(REPO / "bif" / "examples" / "tinylm.yaml", cwd / "bif" / "examples" / "tinylm.yaml")
    return {"cwd": cwd, "env": user_env(user_prefect_home)}


@pytest.fixture(scope="module")
def example(home) -> dict:
    """`bif example tinylm` as typed."""
    res = bif("example", "tinylm", cwd=home["cwd"], env=home["env"])
    assert res.returncode == 0, res.stderr
    return {"res": res, "dir": home["cwd"] / "runs" / "example" / "tinylm"}


def test_example_writes_model_tokenizer_corpus_and_facts(example):
    from bif.lm import build

    d = example["dir"]
    assert "wrote the tiny LM" in example["res"].stdout and "runs/example/tinylm" in example["res"].stdout
    for name in ("config.json", "model.safetensors", "tokenizer.json", "train.jsonl", "query.jsonl", "facts.json"):
        assert (d / name).is_file(), name
    facts = json.loads((d / "facts.json").read_text())
    prob = build(str(d), str(d / "train.jsonl"), str(d / "query.jsonl"))
    assert len(prob.train) == facts["num_train"] == 64 and len(prob.query) == facts["num_query"] == 16
    carriers = [s for f in facts["facts"] for s in f["train_samples"]]
    assert len(carriers) == len(set(carriers)) == 32  # each carrier states exactly one fact
    for f in facts["facts"]:  # the planted VALUE token sits where facts.json says, in train and query
        for split, samples, positions in (("train", f["train_samples"], f["train_positions"]),
                                          ("query", f["query_samples"], f["query_positions"])):
            for s, p in zip(samples, positions):
                toks = prob.render_tokens(split, s)
                assert toks[p - 2:p + 1] == [f" {f['key']}", " is", f" {f['value']}"]  # mid-text: with spaces
    others = set(range(64)) - set(carriers)
    assert all("code" not in prob.train.texts[i] for i in others)
    # the model learned the facts: the query VALUE tokens are predicted far better than chance (1/12 values)
    assert facts["query_fact_accuracy"] >= 0.6
    with __import__("torch").no_grad():
        losses, mask = prob.loss(prob.model, {"input_ids": prob.query.input_ids,
                                              "attention_mask": prob.query.attention_mask})
    value_losses = [float(losses[q, p]) for f in facts["facts"] for q, p in zip(f["query_samples"],
                                                                                 f["query_positions"])]
    assert np.median(value_losses) < 0.5 < np.log(12)


def test_lds_retrains_the_tiny_lm_from_scratch_as_the_readme_types_it(home, example):
    """The README's `bif lds` of the tiny LM (``fit_steps``: bif.lm's ``fit``), as typed, with fewer subsets and
    methods appended (argparse keeps the last): 4 retrainings on the workers, GradDot and EK-FAC on the Hugging
    Face model, each a finite LDS over the 16 query texts."""
    (line,) = re.findall(r"^```bash\n(bif lds bif/examples/tinylm\.yaml .*)\n```$", (REPO / "README.md").read_text(),
                         re.M)
    args = line.split()[1:] + ["--num-subsets", "4", "--num-seeds", "1", "--methods", "graddot,ekfac"]
    assert "--set" in args and "problem_args.fit_steps=300" in args
    res = bif(*args, cwd=home["cwd"], env=home["env"])
    assert res.returncode == 0, res.stdout + res.stderr
    assert re.search(r"^ground truth: \S+ \(retrained, 4 retrainings\)$", res.stdout, re.M), res.stdout
    summary = json.loads(next((home["cwd"] / "runs" / "example" / "tinylm-run" / "lds").glob(
        "*/results/latest/summary.json")).read_text())
    lds = {m["method"]: m["lds"] for m in summary["methods"]}
    assert set(lds) == {"graddot", "ekfac"} and all(np.isfinite(v) for v in lds.values()), lds
    for name, value in lds.items():
        assert re.search(rf"^\s+{name}  LDS {re.escape(f'{value:+.3f}')} ± ", res.stdout, re.M), res.stdout
    gt = pd.read_parquet(next((home["cwd"] / "runs" / "example" / "tinylm-run" / "lds").glob("*/ground_truth.parquet")))
    assert len(gt) == 4 * 16 and (gt["loss"] > 0).all()


@pytest.mark.slow
def test_run_ranks_the_fact_carrying_texts_at_the_top(home, example):
    cwd, env = home["cwd"], home["env"]
    res = bif("run", "bif/examples/tinylm.yaml", cwd=cwd, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    # one bar per reduction, each full (one bar for both read "3/2")
    bars = {ln.split("━")[0].strip(): re.search(r"(\d+)/(\d+)", ln).groups() for ln in res.stderr.splitlines()
            if ln.startswith(("covariance blocks", "token blocks"))}
    assert set(bars) == {"covariance blocks", "token blocks"} and all(a == b for a, b in bars.values()), res.stderr
    run = cwd / "runs" / "example" / "tinylm-run"
    assert json.loads((run / "manifest.json").read_text())["status"] == "complete"
    facts = json.loads((example["dir"] / "facts.json").read_text())
    prec = structure(run, facts)
    chance = len(facts["facts"][0]["train_samples"]) / facts["num_train"]
    means = {k: float(np.mean(v)) for k, v in prec.items()}
    print("precision@k means", means, "chance", chance)
    for key, threshold in THRESHOLDS.items():
        assert means[key] >= threshold > chance, (key, means, prec[key])
