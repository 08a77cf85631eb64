"""Per-token BIF (issue 9, section 1): token losses through the real flow, against numpy on the stored traces.

The problem (tests/token_problems.py) is a float64 bigram LM over padded integer sequences;
its loss returns ((B, T) losses, mask). Expected values are recomputed here with numpy from
the Parquet trace files the run stored, never from the pipeline's own code.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr

import token_problems as tp
from bif import schema as S
from bif.config import SamplerConfig, build_config
from bif.errors import CheckpointError, ConfigError, ProblemError
from bif.flows.attribution import run_attribution
from bif.problem import load_checkpoint
from bif.sampling.chain import SGLDChain
from bif.warnings import BifWarning

SAMPLER = {"num_chains": 2, "num_draws": 60, "num_burnin_steps": 10, "steps_per_draw": 2, "step_size": 1e-3,
           "gamma": 100.0, "batch_size": 4, "seed": 5, "draws_per_block": 25, "trace_dtype": "float64"}
ARGS = {"n_train": 6, "n_query": 3, "length": 8, "prompt": 1, "min_len": 1}


def _cfg(out, address=None, args=ARGS, **over):
    data = {"problem": "token_problems:build", "problem_args": args, "output": str(out), "sampler": SAMPLER,
            "covariance": {"train_block_size": 5, "query_block_size": 3, "topk": 3, "token_matrix": True},
            "compute": {"address": address} if address else {}}
    for k, v in over.items():
        data[k] = data[k] | v if isinstance(v, dict) else v
    return build_config(data)


def _valid_tokens(args, split):
    """(sample, position) of every valid token, from the problem's own data and mask rule (numpy)."""
    prob = tp.build(**args)
    ids, valid = (prob.train if split == S.TRAIN else prob.query).tensors
    mask = valid[:, 1:].numpy().copy()
    mask[:, :args.get("prompt", 0)] = False
    s, p = np.nonzero(mask)
    return list(zip(s.tolist(), p.tolist()))


def _token_traces(out, split):
    """(chains*draws, tokens) float64 token traces of ``split`` read from the stored Parquet files, and their keys."""
    tr = pd.read_parquet(out / S.TRACES_DIR)
    tr = tr[tr[S.SPLIT] == split].sort_values([S.SAMPLE, S.POSITION, S.CHAIN, S.DRAW])
    keys = tr[[S.SAMPLE, S.POSITION]].drop_duplicates()
    mat = tr[S.LOSS].to_numpy().reshape(len(keys), -1).T  # (chain*draw, tokens)
    return mat, list(map(tuple, keys.to_numpy().tolist()))


def _neg_cov(x, y):
    xc, yc = x - x.mean(0), y - y.mean(0)
    return -(xc.T @ yc) / (x.shape[0] - 1)


def _seg_sum(mat, keys, n):
    samples = np.array([k[0] for k in keys])
    return np.stack([mat[:, samples == i].sum(axis=1) for i in range(n)], axis=1)


def _numpy_topk(bif, k):
    """{(query token, sign): [train tokens]} in the total order bif desc, ties to the smaller train id."""
    out = {}
    nt = bif.shape[0]
    for j in range(bif.shape[1]):
        order = sorted(range(nt), key=lambda i: (-bif[i, j], i))
        out[(j, "positive")] = order[:min(k, -(-nt // 2))]
        out[(j, "negative")] = order[::-1][:min(k, nt // 2)]
    return out


@pytest.fixture(scope="module")
def token_run(tmp_path_factory, dask_address):
    out = tmp_path_factory.mktemp("tokens") / "run"
    manifest = run_attribution(_cfg(out, dask_address), show_progress=False)
    return out, manifest


@pytest.mark.e2e
def test_token_run_matches_numpy_on_its_stored_traces(token_run):
    out, manifest = token_run
    assert manifest["status"] == S.STATUS_COMPLETE
    assert manifest["quality"]["passed"] and manifest["diagnostics"]["num_chains"] == 2
    train_keys, query_keys = _valid_tokens(ARGS, S.TRAIN), _valid_tokens(ARGS, S.QUERY)
    # default nbeta = valid train tokens; the manifest lists the token outputs
    assert manifest["resolved"]["nbeta"] == len(train_keys)
    assert manifest["n_train_tokens"] == len(train_keys) and manifest["n_query_tokens"] == len(query_keys)
    assert set(manifest["token_outputs"]) == {S.TOKENS_FILE, S.TOPK_TOKENS_FILE, S.BIF_TOKENS_ZARR}
    # traces hold valid tokens only (the prompt position 0 and the padding never appear), every draw
    x, tkeys = _token_traces(out, S.TRAIN)
    y, qkeys = _token_traces(out, S.QUERY)
    assert tkeys == train_keys and qkeys == query_keys
    assert x.shape[0] == 2 * 60 and 0 not in {p for _, p in tkeys}
    # tokens.parquet: one row per valid token, texts from render_tokens, ref losses at w*
    toks = pd.read_parquet(out / S.TOKENS_FILE)
    assert list(toks.columns) == list(S.TOKENS_COLUMNS)
    assert list(map(tuple, toks[toks[S.SPLIT] == S.TRAIN][[S.SAMPLE, S.POSITION]].to_numpy().tolist())) == train_keys
    prob = tp.build(**ARGS)
    ids = prob.train.tensors[0]
    assert [tp.VOCAB[int(ids[s, p + 1])] for s, p in train_keys] == toks[toks[S.SPLIT] == S.TRAIN][S.TOKEN].tolist()
    # sequence level: bif.zarr = -Cov of the summed token traces (a sample with no valid token sums to 0)
    seq = xr.open_zarr(out / S.BIF_ZARR, consolidated=False).load()
    xs, ys = _seg_sum(x, tkeys, ARGS["n_train"]), _seg_sum(y, qkeys, ARGS["n_query"])
    np.testing.assert_allclose(seq[S.BIF].values, _neg_cov(xs, ys), rtol=2e-6, atol=1e-9)
    # token level: bif_tokens.zarr = -Cov of the token traces, coords = valid (sample, position)
    ds = xr.open_zarr(out / S.BIF_TOKENS_ZARR, consolidated=False).load()
    bif = _neg_cov(x, y)
    assert ds[S.BIF].dims == (S.TRAIN_TOKEN_DIM, S.QUERY_TOKEN_DIM)
    np.testing.assert_allclose(ds[S.BIF].values, bif, rtol=2e-6, atol=1e-9)
    corr = bif / np.sqrt(np.outer(x.var(0, ddof=1), y.var(0, ddof=1)))
    np.testing.assert_allclose(ds[S.BIF_CORR].values, corr, rtol=1e-5, atol=1e-6)
    assert list(zip(ds[S.TRAIN_SAMPLE].values.tolist(), ds[S.TRAIN_POSITION].values.tolist())) == train_keys
    assert list(zip(ds[S.QUERY_SAMPLE].values.tolist(), ds[S.QUERY_POSITION].values.tolist())) == query_keys
    # mixed levels: their own reductions equal the segment sums of the token matrix, and numpy
    tsamp = ds[S.TRAIN_SAMPLE].values
    qsamp = ds[S.QUERY_SAMPLE].values
    row_sums = np.stack([bif[tsamp == i].sum(0) for i in range(ARGS["n_train"])])
    col_sums = np.stack([bif[:, qsamp == j].sum(1) for j in range(ARGS["n_query"])], axis=1)
    np.testing.assert_allclose(ds[S.BIF_SEQ_TOK].values, row_sums, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(ds[S.BIF_TOK_SEQ].values, col_sums, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(ds[S.BIF_SEQ_TOK].values, _neg_cov(xs, y), rtol=2e-6, atol=1e-9)
    # topk_tokens.parquet = numpy's top-k per query token, with coordinates and texts
    top = pd.read_parquet(out / S.TOPK_TOKENS_FILE)
    assert list(top.columns) == list(S.TOPK_TOKENS_COLUMNS)
    want = _numpy_topk(bif, 3)
    got: dict = {}
    for r in top.itertuples(index=False):
        j = query_keys.index((getattr(r, S.QUERY_SAMPLE), getattr(r, S.QUERY_POSITION)))
        got.setdefault((j, getattr(r, S.SIGN)), []).append(
            (getattr(r, S.RANK), train_keys.index((getattr(r, S.TRAIN_SAMPLE), getattr(r, S.TRAIN_POSITION))),
             getattr(r, S.BIF)))
    assert set(got) == set(want)
    for key, rows in got.items():
        rows.sort()
        assert [i for _, i, _ in rows] == want[key], key
        np.testing.assert_allclose([b for _, _, b in rows], bif[want[key], key[0]], rtol=1e-9)
    first = top.iloc[0]
    assert first[S.TRAIN_CONTEXT].count("⟦" + first[S.TRAIN_TOKEN].lstrip() + "⟧") == 1


@pytest.mark.e2e
def test_bif_show_tokens_prints_the_token_table(token_run, capsys):
    from bif.flows.cli import main

    out, _ = token_run
    top = pd.read_parquet(out / S.TOPK_TOKENS_FILE)
    assert main(["show", str(out), "--query", "1", "--tokens", "-k", "1"]) == 0
    text = capsys.readouterr().out
    row = top[(top[S.QUERY_SAMPLE] == 1) & (top[S.RANK] == 0)].iloc[0]
    assert "⟦" in text and f"{row[S.BIF]:.4g}" in text
    assert main(["show", str(out), "--query", "99", "--tokens"]) == 2  # clear error, exit 2


@pytest.mark.e2e
def test_token_results_do_not_depend_on_blocks_or_the_token_matrix(token_run, tmp_path):
    """Re-reduce the same traces with other block sizes, fan-in and token_matrix off: same results."""
    from bif.tasks import pipeline

    out, manifest = token_run
    ref_top = pd.read_parquet(out / S.TOPK_TOKENS_FILE)
    ref_seq = xr.open_zarr(out / S.BIF_ZARR, consolidated=False)[S.BIF].values
    ref_tok = xr.open_zarr(out / S.BIF_TOKENS_ZARR, consolidated=False)[S.BIF].values
    info = pipeline.RunInfo(**manifest["run_info"] | {"loss_bounds": tuple(manifest["run_info"]["loss_bounds"])})
    for i, cov in enumerate([{"train_block_size": 2, "query_block_size": 1, "split_every": 2, "token_matrix": False},
                             {"train_block_size": 64, "query_block_size": 64, "split_every": 3,
                              "token_train_block_size": 7}]):
        copy = tmp_path / f"copy{i}"
        shutil.copytree(out, copy, ignore=shutil.ignore_patterns(S.BIF_TOKENS_ZARR, S.TOPK_TOKENS_FILE))
        cfg = _cfg(copy, covariance=cov)
        pipeline.reduce_covariance(cfg, info)
        top = pd.read_parquet(copy / S.TOPK_TOKENS_FILE)
        pd.testing.assert_frame_equal(top.drop(columns=[S.BIF, S.BIF_CORR]),
                                      ref_top.drop(columns=[S.BIF, S.BIF_CORR]))
        np.testing.assert_allclose(top[S.BIF], ref_top[S.BIF], rtol=1e-10)
        # a float32 output is reduced with float32 GEMMs (tasks/covariance.py): another grouping of the draws moves
        # an entry by float32 rounding of the accumulation, bounded relative to the matrix's scale, not the entry's
        np.testing.assert_allclose(xr.open_zarr(copy / S.BIF_ZARR, consolidated=False)[S.BIF].values, ref_seq,
                                   rtol=1e-6, atol=1e-6 * np.abs(ref_seq).max())
        tok = copy / S.BIF_TOKENS_ZARR
        assert tok.exists() == bool(cov.get("token_matrix", True))
        if tok.exists():
            np.testing.assert_allclose(xr.open_zarr(tok, consolidated=False)[S.BIF].values, ref_tok, rtol=1e-6)


def _check_reduction_progress(events: list[tuple[str, int, int]]) -> None:
    """A token run's reduction reports the blocks of bif.zarr, then the token reduction's own, each counted to its
    own total; `bif run`'s bars (bif.flows.progress) end full, one per stage. (One count for both read "3/2" on the
    tiny LM.)"""
    from bif.flows.progress import RunProgress

    stages = [e[0] for e in events]
    assert stages == sorted(stages, key=["covariance", "tokens"].index) and set(stages) == {"covariance", "tokens"}
    for stage in ("covariance", "tokens"):
        dones = [done for s, done, _ in events if s == stage]
        totals = {total for s, _, total in events if s == stage}
        assert dones == sorted(set(dones)) and totals == {dones[-1]}, (stage, events)
    bars = RunProgress(None, num_chains=2, num_draws=30, enabled=False)
    for stage, done, total in events:
        bars._handle((0.0, {"stage": stage, "done": done, "total": total}))
    last = {stage: total for stage, _, total in events}
    shown = {t.description: (t.completed, t.total) for t in bars.progress.tasks}
    assert shown == {"covariance blocks": (last["covariance"],) * 2, "token blocks": (last["tokens"],) * 2}


def test_two_sequences_of_eight_tokens_without_mask(tmp_path):
    """The smallest LM case: 2 train x 2 query sequences, (B, T) losses without a mask (all 8 positions valid),
    through every stage (in this process): traces, reductions, gates, diagnostics."""
    from bif.tasks import pipeline

    args = {"n_train": 2, "n_query": 2, "length": 9, "form": "plain", "seed": 3}
    cfg = _cfg(tmp_path / "tiny", args=args, covariance={"topk": 20},
               sampler={"num_draws": 30, "draws_per_block": 30})
    info = pipeline.prepare_run(cfg)
    assert info.nbeta == 16 and info.n_train_tokens == 16
    for c in range(2):
        pipeline.run_chain(cfg, c, ref_train_loss_mean=info.ref_train_loss_mean)
    events: list[tuple[str, int, int]] = []
    pipeline.reduce_covariance(cfg, info, progress=lambda *e: events.append(e))
    _check_reduction_progress(events)
    assert pipeline.quality_gates(cfg, info).passed
    assert pipeline.diagnostics(cfg)["num_samples"] == {"train": 2, "query": 2}
    x, tkeys = _token_traces(tmp_path / "tiny", S.TRAIN)
    assert tkeys == [(s, p) for s in range(2) for p in range(8)]
    top = pd.read_parquet(tmp_path / "tiny" / S.TOPK_TOKENS_FILE)
    # k = 20 > 16 train tokens: each query token lists all 16, split 8 / 8 between the signs
    assert len(top) == 16 * 16
    assert (top.groupby([S.QUERY_SAMPLE, S.QUERY_POSITION, S.SIGN]).size() == 8).all()


def test_default_nbeta_is_the_number_of_valid_train_tokens():
    prob = tp.build(**ARGS)
    n_valid = len(_valid_tokens(ARGS, S.TRAIN))
    chain = SGLDChain(prob, SamplerConfig(), chain=0)
    assert chain.nbeta == n_valid and chain.variables.num_variables(S.TRAIN) == n_valid
    assert SGLDChain(prob, SamplerConfig(nbeta=7.0), chain=0).nbeta == 7.0
    # (B, T) without a mask: every position is a variable
    plain = SGLDChain(tp.build(n_train=3, length=5, form="plain"), SamplerConfig(), chain=0)
    assert plain.nbeta == 3 * 4
    assert plain.variables.token_positions(S.TRAIN).tolist() == [0, 1, 2, 3] * 3


def test_a_b_by_1_loss_is_per_sample_unless_the_run_has_tokens():
    """A (B, 1) loss without a mask (a regression's F.mse_loss(..., reduction="none") of a (B, 1) output) is one loss
    per sample: it made a token run with T = 1 (the same figures), which `bif calibrate` and TRAK refuse. In a run
    whose other batches are per-token, a (B, 1) batch is one token per sample, as before."""
    from bif.evaluation.retrain import has_token_losses
    from bif.problem import Problem
    from bif.sampling.chain import checked_loss, measure, sample_traces

    column = tp.build(n_train=5, n_query=3, length=2, form="plain", seed=4)  # one position: (B, 1) losses
    assert column.loss(column.model, column.train.tensors).shape == (5, 1)
    flat = Problem(model=column.model, train=column.train, query=column.query,
                   loss=lambda m, b: column.loss(m, b)[:, 0])  # the same losses as (B,)
    assert not has_token_losses(column) and not has_token_losses(flat)
    m, values = measure(column, column.model, [column.train.tensors], [5], S.TRAIN)
    assert not m.tokens and m.num_variables == 5
    torch.testing.assert_close(values, flat.loss(flat.model, flat.train.tensors).to(torch.float64))
    sampler = SamplerConfig(num_chains=1, num_draws=6, num_burnin_steps=2, step_size=1e-3, batch_size=5)
    got, want = sample_traces(column, sampler), sample_traces(flat, sampler)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.asarray(got[0]).shape[-1] == 5  # per sample, no token axis

    # batches of 3 positions and of 1 position in one split: a token run, the (B, 1) batch one token per sample
    plain = tp.build(n_train=4, length=4, form="plain", seed=1)
    mixed = Problem(model=plain.model, train=plain.train, query=plain.query,
                    loss=lambda mdl, b: plain.loss(mdl, b) if b[0].shape[0] == 3 else plain.loss(mdl, b)[:, :1])
    batches = [tuple(t[:3] for t in plain.train.tensors), tuple(t[3:] for t in plain.train.tensors)]
    m, values = measure(mixed, mixed.model, batches, [3, 1], S.TRAIN)
    assert m.tokens and m.counts.tolist() == [3, 3, 3, 1] and values.numel() == 10
    assert checked_loss(mixed, mixed.model, batches[1], 1).shape == (1,)


def test_minibatch_loss_is_the_mean_over_valid_tokens():
    from bif.sampling.chain import minibatch_loss

    prob = tp.build(**ARGS)
    batch = [t[:4] for t in prob.train.tensors]
    losses, mask = prob.loss(prob.model, batch)
    want = losses[mask].mean()
    assert torch.allclose(minibatch_loss(prob, prob.model, batch, 4), want)


def test_a_mask_of_the_wrong_dtype_or_shape_is_a_clear_error():
    with pytest.raises(ProblemError, match=r"mask with dtype torch.float64.*must be a bool Tensor"):
        SGLDChain(tp.build(form="bad_mask"), SamplerConfig(), chain=0).reference_losses()
    prob = tp.build()

    def short_mask(model, batch):
        losses, mask = prob.loss(model, batch)
        return losses, mask[:, :-1]

    from dataclasses import replace

    with pytest.raises(ProblemError, match=r"mask .*shape"):
        SGLDChain(replace(prob, loss=short_mask), SamplerConfig(), chain=0).reference_losses()


def test_params_globs_freeze_the_others(tmp_path):
    from bif.store.run import RunStore
    from bif.store.traces import state_from_bytes

    prob = tp.build(**ARGS)
    anchor = prob.model.emb.weight.detach().clone()
    s = SamplerConfig(num_draws=6, num_burnin_steps=3, steps_per_draw=2, step_size=1e-3, gamma=100.0,
                      batch_size=4, params=["head.*"], draws_per_block=3)
    chain = SGLDChain(prob, s, chain=0)
    assert chain.names == ["head.weight", "head.bias"]
    moved = []

    def check(_):
        assert torch.equal(chain.model.emb.weight, anchor)  # bit-identical to w* at every draw
        moved.append(not torch.equal(chain.model.head.weight, prob.model.head.weight))

    store = RunStore(str(tmp_path / "run"))
    for i, block in enumerate(chain.run(num_draws=6, draws_per_block=3, on_draw=check)):
        store.write_block(block, block_index=i, ref_train_loss_mean=1.0)
    assert all(moved) and len(moved) == 6
    state = state_from_bytes(store.read_bytes(f"{S.STATE_DIR}/{S.block_name(0, 1, 'pt')}"))
    assert set(state.params) == {"head.weight", "head.bias"}
    with pytest.raises(ConfigError, match=r"sampler.params \['decoder\.\*', 'x'\] matches none.*emb.weight"):
        SGLDChain(prob, SamplerConfig(params=["decoder.*", "x"]), chain=0)


def test_bf16_autocast_is_ignored_with_a_warning_on_cpu():
    prob = tp.build(**ARGS)
    with pytest.warns(BifWarning, match="CUDA only"):
        chain = SGLDChain(prob, SamplerConfig(autocast="bf16"), chain=0)
    assert chain.autocast is None


def test_safetensors_checkpoint_with_tied_weights_loads(tmp_path):
    from safetensors.torch import save_file

    src = tp.build(tie=True, seed=1).model
    state = {k: v.detach().clone() for k, v in src.state_dict().items() if k != "head.weight"}  # tied key stored once
    save_file(state, str(tmp_path / "model.safetensors"))
    dst = tp.build(tie=True, seed=2).model
    assert not torch.equal(dst.emb.weight, src.emb.weight)
    digest = load_checkpoint(dst, str(tmp_path / "model.safetensors"))
    assert len(digest) == 64
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    assert dst.head.weight is dst.emb.weight  # still tied
    # an untied model needs every key: a missing one is named
    with pytest.raises(CheckpointError, match="head.weight"):
        load_checkpoint(tp.build(seed=2).model, str(tmp_path / "model.safetensors"))
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="could not be read as safetensors"):
        load_checkpoint(dst, str(tmp_path / "bad.safetensors"))


def test_token_chain_resumes_bit_identically_after_a_lost_block(tmp_path):
    """A token run's chain killed after one block resumes to the same trace bytes; checksums cover token blocks."""
    from bif.tasks import pipeline

    cfg = _cfg(tmp_path / "a", sampler={"num_draws": 50, "draws_per_block": 25})
    info = pipeline.prepare_run(cfg)
    pipeline.run_chain(cfg, 0, ref_train_loss_mean=info.ref_train_loss_mean)
    files = sorted((tmp_path / "a" / S.TRACES_DIR).rglob("*.parquet"))
    full = [f.read_bytes() for f in files]
    files[1].unlink()  # the second block was never committed
    files[0].write_bytes(full[0][:-20] + b"x" * 20)  # and the first is damaged: the checksum catches it
    res = pipeline.run_chain(cfg, 0, ref_train_loss_mean=info.ref_train_loss_mean)
    assert res.draws_sampled == 50
    assert [f.read_bytes() for f in files] == full


def test_trace_gates_check_token_blocks_against_their_layout():
    """A token block with a lost row or a row at a masked position is caught by the trace aggregates."""
    import pyarrow as pa

    from bif.quality.aggregates import trace_block_stats
    from bif.store.traces import trace_table

    prob = tp.build(**ARGS)
    chain = SGLDChain(prob, SamplerConfig(num_burnin_steps=0, steps_per_draw=1, batch_size=4), chain=0)
    block = next(chain.run(num_draws=3, draws_per_block=3))
    table, _ = trace_table(block, loss_dtype="float32")
    kw = dict(chain=0, block=0, draw_start=0, num_draws=3, n_train=ARGS["n_train"], n_query=ARGS["n_query"],
              loss_bounds=(0.0, float("inf")))
    ok = trace_block_stats(table, **kw)
    assert ok["schema_ok"] and ok["n_missing"] == 0 and ok["n_out_of_range"] == 0 and ok["n_duplicate"] == 0
    assert ok["expected_rows"] == 3 * (len(_valid_tokens(ARGS, S.TRAIN)) + len(_valid_tokens(ARGS, S.QUERY)))
    lost = trace_block_stats(table.slice(1), **kw)
    s0, p0 = _valid_tokens(ARGS, S.TRAIN)[0]
    assert lost["n_missing"] == 1 and lost["first_missing"] == f"draw=0 split=train sample={s0} position={p0}"
    pos = table.column(S.POSITION).to_numpy().copy()
    pos[0] = 0  # the prompt position is masked: it must never be a variable
    moved = table.set_column(table.schema.get_field_index(S.POSITION), S.POSITION, pa.array(pos))
    bad = trace_block_stats(moved, **kw)
    assert bad["n_out_of_range"] == 1 and bad["n_missing"] == 1


@pytest.mark.e2e
def test_the_run_summary_of_a_token_run_points_to_the_token_view(token_run):
    from bif.flows.cli import run_summary

    out, manifest = token_run
    lines = run_summary(manifest, str(out))
    assert lines[-1].startswith(f"top-k: bif show {out} --query 0  (per token: --tokens)  ")
    # nbeta defaults to the valid train tokens here, not to n_train (the summary said "(= n_train)")
    assert f"sampler: nβ={manifest['n_train_tokens']:g} (= valid train tokens)  " in lines[1]
    sequences_only = {k: v for k, v in manifest.items() if k != "token_outputs"}
    assert run_summary(sequences_only, str(out))[-1].startswith(f"top-k: bif show {out} --query 0     report: ")


TOKENS_NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "explore_tokens.ipynb"


def test_tokens_notebook_defaults_to_the_tiny_lm_run_and_is_committed_without_outputs():
    import nbformat
    import yaml

    nb = nbformat.read(TOKENS_NOTEBOOK, as_version=4)
    output = yaml.safe_load((TOKENS_NOTEBOOK.parents[1] / "bif" / "examples" / "tinylm.yaml").read_text())["output"]
    assert f'RUN = os.environ.get("BIF_RUN", "{output}")' in nb.cells[0].source
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")


@pytest.mark.e2e
def test_tokens_notebook_runs_on_a_token_run(token_run, tmp_path, monkeypatch):
    """notebooks/explore_tokens.ipynb top to bottom (nbclient) on this file's token run, its longest query: the
    counts of tokens.parquet, each query token's rank-0 helper and opponent from topk_tokens.parquet, one plot, and
    the top train sequences of bif.zarr."""
    pytest.importorskip("ipykernel")
    import nbformat
    from nbclient import NotebookClient

    out, _ = token_run
    top = pd.read_parquet(out / S.TOPK_TOKENS_FILE)
    query = int(top.groupby(S.QUERY_SAMPLE)[S.QUERY_POSITION].nunique().idxmax())  # its longest query sequence
    monkeypatch.setenv("BIF_RUN", str(out))
    monkeypatch.setenv("BIF_QUERY", str(query))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(TOKENS_NOTEBOOK, as_version=4)
    NotebookClient(nb, kernel_name="python3", timeout=240, resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "\n".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert f"run: {out}  status: complete" in text
    toks = pd.read_parquet(out / S.TOKENS_FILE)
    counts = toks[S.SPLIT].astype(str).value_counts()
    assert f"{counts[S.TRAIN]} train tokens, {counts[S.QUERY]} query tokens; up to 3 train tokens" in text
    first = top[(top[S.QUERY_SAMPLE] == query) & (top[S.RANK] == 0)]
    assert first[S.QUERY_POSITION].nunique() >= 2
    for context in first[S.TRAIN_CONTEXT]:
        assert context.strip() in text, context
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 1
    column = xr.open_zarr(out / S.BIF_ZARR, consolidated=False)[S.BIF].sel({S.QUERY_DIM: query}).to_series()
    for i in (column.idxmin(), column.idxmax()):
        assert f"  {int(i):5d}  {column[i]:+10.4g}  " in text


def test_in_process_scoring_gives_the_runs_sequence_level_bif(token_run):
    """`bif lds` scores BIF in one process (``bif.evaluation.scoring.bif_arrays``, the chains of
    ``sample_traces``): on a token problem it is the run's ``bif.zarr``, one column per sequence. It was the token
    matrix (valid tokens x valid tokens), which LDS compared with sequence losses."""
    from bif.evaluation.scoring import bif_arrays

    out, _ = token_run
    bif, corr = bif_arrays(tp.build(**ARGS), SamplerConfig(**SAMPLER))
    seq = xr.open_zarr(out / S.BIF_ZARR, consolidated=False).load()
    assert bif.shape == corr.shape == (ARGS["n_train"], ARGS["n_query"])
    np.testing.assert_allclose(bif, seq[S.BIF].values, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(corr, seq[S.BIF_CORR].values, rtol=1e-6, atol=1e-9)
