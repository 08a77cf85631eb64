"""SGLD against the closed-form Gaussian posterior, resume exactness, and NaN / shape errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bif.config import SamplerConfig
from bif.errors import ChainDivergedError, ProblemError
from bif.examples import linear
from bif.problem import Problem
from bif.moments import bif_in_memory
from bif.sampling.chain import SGLDChain, chain_seed, sample_traces
from bif.store.traces import TraceStore

# Full-batch SGLD on the linear model; its stationary law is known exactly.
LINEAR = dict(num_chains=4, num_draws=1000, num_burnin_steps=400, steps_per_draw=10, step_size=2e-3,
              gamma=10.0, nbeta=40.0, batch_size=40, seed=1)

#: Statistical tolerance: relative Frobenius error of the estimated BIF matrix. With 4000
#: draws at ~10-step thinning the Monte-Carlo error measured over seeds is ~0.04-0.07.
REL_TOL = 0.15


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _separate(chain: SGLDChain) -> SGLDChain:
    """``chain`` forced to evaluate train and query in separate forward passes."""
    chain._joint_evaluation = lambda *a: None
    return chain


@pytest.mark.parametrize("singular", [False, True], ids=["full-rank", "singular-XtX"])
def test_bif_matches_closed_form(singular):
    prob = linear.build(n=40, d=4, m=6, singular=singular, seed=2)
    data = prob.extras["data"]
    if singular:
        assert np.linalg.matrix_rank(data.x_train.T @ data.x_train) < 4
    s = SamplerConfig(**LINEAR)
    train, query = sample_traces(prob, s)
    bif, corr = bif_in_memory(train, query)
    exact = linear.closed_form_bif(data, nbeta=s.nbeta, gamma=s.gamma, step_size=s.step_size)
    continuous = linear.closed_form_bif(data, nbeta=s.nbeta, gamma=s.gamma)
    assert _rel(bif, exact) < REL_TOL
    assert _rel(bif, continuous) < REL_TOL + _rel(exact, continuous)
    assert np.corrcoef(bif.ravel(), exact.ravel())[0, 1] > 0.98
    assert np.all(np.abs(corr) <= 1)


def test_chain_mean_loss_near_posterior_expectation():
    """E[ℓ_i] = ½(r_i² + s_ii): checks the posterior mean and variance, not just covariances."""
    prob = linear.build(n=40, d=4, m=6, seed=3)
    data = prob.extras["data"]
    s = SamplerConfig(**LINEAR | {"num_chains": 2, "num_draws": 800})
    train, _ = sample_traces(prob, s)
    mu, sigma = linear.posterior(data, nbeta=s.nbeta, gamma=s.gamma, step_size=s.step_size)
    r = data.y_train - data.x_train @ mu
    expected = 0.5 * (r**2 + np.einsum("ij,jk,ik->i", data.x_train, sigma, data.x_train))
    # per-sample losses are chi-square-like (sd ~ mean); 1600 correlated draws give a
    # relative error of ~0.03-0.05, so 0.10 is a ~2-3 sigma bound
    assert _rel(train.mean(axis=(0, 1)), expected) < 0.10


def test_resume_reproduces_uninterrupted_chain(tmp_path):
    prob = linear.build(n=30, d=3, m=4, seed=0)
    s = SamplerConfig(num_chains=1, num_draws=12, num_burnin_steps=3, steps_per_draw=2, step_size=1e-3,
                      gamma=5.0, batch_size=8, seed=7, preconditioner="rmsprop")
    full = list(SGLDChain(prob, s, chain=0).run(num_draws=12, draws_per_block=4))
    store = TraceStore(str(tmp_path), loss_dtype="float64")
    first = SGLDChain(prob, s, chain=0).run(num_draws=12, draws_per_block=4)
    for i in range(2):  # commit two blocks, then the process "dies"
        store.write_block(next(first), block_index=i, ref_train_loss_mean=0.0)
    del first
    state, done = store.load_resume_state(0)
    assert done == 2 and state.num_recorded == 8
    resumed = SGLDChain(prob, s, chain=0)
    resumed.load_state(state)
    rest = list(resumed.run(num_draws=12, draws_per_block=4))
    assert [b.draw_start for b in rest] == [8]
    np.testing.assert_array_equal(rest[0].train_losses, full[2].train_losses)
    np.testing.assert_array_equal(rest[0].query_losses, full[2].query_losses)


def test_chain_seeds_differ_and_problem_untouched():
    prob = linear.build(n=20, d=3, m=2)
    before = prob.model.weight.detach().clone()
    s = SamplerConfig(num_chains=2, num_draws=4, num_burnin_steps=0, steps_per_draw=1, step_size=1e-3,
                      batch_size=5, gamma=1.0)
    tr, _ = sample_traces(prob, s)
    assert not np.allclose(tr[0], tr[1])
    assert torch.equal(prob.model.weight, before)
    assert len({chain_seed(0, c) for c in range(100)}) == 100


def test_nan_chain_names_chain_draw_and_sample():
    prob = linear.build(n=20, d=3, m=2)
    s = SamplerConfig(num_chains=1, num_draws=50, num_burnin_steps=0, steps_per_draw=5, step_size=50.0,
                      gamma=0.0, batch_size=20, nbeta=1e6)
    with pytest.raises(ChainDivergedError, match=r"chain 3 diverged: (train|query) sample \d+ has loss") as ei:
        list(SGLDChain(prob, s, chain=3).run(num_draws=50, draws_per_block=10))
    assert ei.value.chain == 3 and ei.value.draw >= 0


@pytest.mark.parametrize("joint", [True, False], ids=["joint-pass", "separate-passes"])
def test_divergence_names_the_first_bad_draw_and_sample_of_the_block(joint):
    """The finite check runs once per block, yet names exactly the first non-finite draw (and its sample),
    whether a draw evaluates train and query in one forward pass (train rows first) or in two."""
    import torch

    prob = linear.build(n=20, d=3, m=2)
    calls = {"train_evals": 0}
    # no-grad evaluations that hold the train set: the measurement at w* (joint: and the joint check at w*),
    # then one per draw; so draw 6 is evaluation 9 (joint) or 8 (separate)
    bad_eval = 9 if joint else 8

    def loss(model, batch):
        out = linear.per_sample_loss(model, batch)
        if not torch.is_grad_enabled() and len(out) >= 20:  # an evaluation that holds the train set
            calls["train_evals"] += 1
            if calls["train_evals"] == bad_eval:
                out = out.clone()
                out[13] = float("inf")  # one transient bad loss: draw 6, train sample 13
        return out

    bad = Problem(model=prob.model, train=prob.train, query=prob.query, loss=loss)
    s = SamplerConfig(num_chains=1, num_draws=20, num_burnin_steps=0, steps_per_draw=1, batch_size=4)
    chain = SGLDChain(bad, s, chain=0)
    if not joint:
        _separate(chain)
    with pytest.raises(ChainDivergedError, match=r"chain 0 diverged: train sample 13 has loss inf") as ei:
        list(chain.run(num_draws=20, draws_per_block=10))
    assert ei.value.draw == 6
    assert (chain._joint is not None) == joint


def test_loss_of_wrong_shape_is_a_problem_error():
    prob = linear.build(n=20, d=3, m=2)
    bad = Problem(model=prob.model, train=prob.train, query=prob.query,
                  loss=lambda model, batch: linear.per_sample_loss(model, batch).mean())
    s = SamplerConfig(num_chains=1, num_draws=2, num_burnin_steps=1, batch_size=4)
    with pytest.raises(ProblemError, match=r"shape \(4,\).*got \(\)"):
        list(SGLDChain(bad, s, chain=0).run(num_draws=2, draws_per_block=2))


@pytest.mark.parametrize("which", ["linear", "tokens"])
def test_one_joint_forward_pass_records_what_two_separate_ones_record(which):
    """Train and query joined into one evaluation batch (small problems): the same draws as two passes."""
    import token_problems

    prob = linear.build(n=20, d=3, m=5) if which == "linear" else token_problems.build(n_train=6, n_query=3)
    s = SamplerConfig(num_chains=1, num_draws=30, num_burnin_steps=5, steps_per_draw=2, step_size=1e-3,
                      batch_size=5, gamma=1.0)
    joint, separate = SGLDChain(prob, s, chain=0), _separate(SGLDChain(prob, s, chain=0))
    a = list(joint.run(num_draws=30, draws_per_block=10))
    b = list(separate.run(num_draws=30, draws_per_block=10))
    assert joint._joint is not None and separate._joint is None
    for x, y in zip(a, b):
        assert x.train_losses.shape == y.train_losses.shape and x.query_losses.shape == y.query_losses.shape
        np.testing.assert_allclose(x.train_losses, y.train_losses, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(x.query_losses, y.query_losses, rtol=1e-9, atol=1e-12)
        assert np.ptp(x.query_losses, axis=0).max() > 0  # the draws move
    assert joint.variables.num_variables() == separate.variables.num_variables()


def test_no_joint_pass_when_shapes_differ_or_the_loss_couples_the_batch():
    """Batches of other trailing shapes cannot join; a loss that depends on the batch (here: centred on the
    batch mean) would record other values joined, so the check at w* keeps the separate passes."""
    import token_problems

    s = SamplerConfig(num_chains=1, num_draws=3, num_burnin_steps=0, steps_per_draw=1, step_size=1e-3,
                      batch_size=5, gamma=1.0)
    short = token_problems.build(n_train=6, n_query=3)
    ids, valid = short.query.tensors
    short = Problem(model=short.model, train=short.train,
                    query=torch.utils.data.TensorDataset(ids[:, :6], valid[:, :6]), loss=short.loss)
    chain = SGLDChain(short, s, chain=0)
    list(chain.run(num_draws=3, draws_per_block=3))
    assert chain._joint is None

    lin = linear.build(n=20, d=3, m=5)

    def centred(model, batch):
        x, y = batch
        err = (model(x).squeeze(-1) - y) ** 2
        return err - err.mean() + 1.0

    coupled = Problem(model=lin.model, train=lin.train, query=lin.query, loss=centred)
    chain = SGLDChain(coupled, s, chain=0)
    list(chain.run(num_draws=3, draws_per_block=3))
    assert chain._joint is None


def test_a_device_the_workers_cannot_use_is_a_config_error_naming_it():
    """compute.device 'cuda' without CUDA (or a GPU index past the last, or no device at all) is a ConfigError that
    names the device; it failed in the loss at w* with a hint about the loss's batch."""
    from bif.errors import ConfigError
    from bif.sampling.chain import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for device in (f"cuda:{count}", *(() if count else ("cuda",))):
        with pytest.raises(ConfigError, match=rf"compute.device is '{device}', but .*use 'auto'"):
            resolve_device(device)
    with pytest.raises(ConfigError, match=r"compute.device 'gpu' is not a torch device"):
        resolve_device("gpu")
