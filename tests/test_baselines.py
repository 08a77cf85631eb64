"""Baselines: sign conventions, exactness against retraining, and solver agreement.

The tiny problem is L2 softmax regression fit exactly by Newton's method
(bif.examples.logistic), so retraining has no seed noise and, with damping = l2, the
damped Hessian is exactly the Hessian of the training objective.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from bif.evaluation.baselines import bif_scores
from bif.evaluation.baselines.graddot import gradcos_scores, graddot_scores
from bif.evaluation.baselines.influence import influence_scores
from bif.config import SamplerConfig
from bif.examples.logistic import build, newton_fit
from bif.evaluation.lds import draw_subsets, lds
from bif.moments import bif_in_memory
from bif.evaluation.retrain import ground_truth, query_losses
from bif.sampling.chain import sample_traces

torch.set_num_threads(1)
L2 = 0.05


@pytest.fixture(scope="module")
def problem():
    return build(n=60, d=5, num_classes=3, n_query=12, l2=L2, seed=0)


@pytest.fixture(scope="module")
def exact_if(problem):
    return influence_scores(problem, damping=L2, solver="explicit")


@pytest.fixture(scope="module")
def truth(problem):
    masks = draw_subsets(60, num_subsets=40, alpha=0.5, seed=0)
    return ground_truth(problem, masks, num_seeds=1)


def test_layout_matches_bif_zarr(problem, exact_if):
    assert exact_if.dims == ("train", "query") and exact_if.shape == (60, 12)
    np.testing.assert_array_equal(exact_if["train"], np.arange(60))
    np.testing.assert_array_equal(exact_if["query"], np.arange(12))
    assert exact_if.dtype == np.float64 and exact_if.name == "influence"
    ds = bif_scores(np.zeros((60, 12)), np.zeros((60, 12)))
    assert set(ds.data_vars) == {"bif", "bif_corr"} and ds["bif"].dims == ("train", "query")


def test_explicit_cg_and_lissa_agree(problem, exact_if):
    cg = influence_scores(problem, damping=L2, solver="cg")
    lissa = influence_scores(problem, damping=L2, solver="lissa", lissa_depth=2000)
    scale = float(abs(exact_if).max())
    np.testing.assert_allclose(cg.values, exact_if.values, atol=1e-9 * scale)
    np.testing.assert_allclose(lissa.values, exact_if.values, atol=1e-6 * scale)
    # stochastic LiSSA (minibatch HVPs, averaged) is only roughly right
    sto = influence_scores(problem, damping=L2, solver="lissa", lissa_depth=300, lissa_batch_size=30, lissa_repeats=3)
    assert np.corrcoef(sto.values.ravel(), exact_if.values.ravel())[0, 1] > 0.95


def test_cg_stops_on_negative_curvature_and_at_its_cap():
    """Truncated CG: a query whose Krylov space meets negative curvature stops there (flagged), one that stays in
    the positive eigenspace is solved exactly, and no solve runs past the iteration cap (default min(P, 1000))."""
    from bif.evaluation.baselines.influence import CG_MAX_ITER, solve_cg

    d = torch.tensor([4.0, 2.0, 1.0, 0.5, -0.3, 3.0], dtype=torch.float64)
    hvp = lambda v: d[:, None] * v  # noqa: E731  H = diag(d), indefinite
    rhs = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 1.0],  # no component on the negative eigenvector: solvable
                        [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]], dtype=torch.float64).T
    info: dict = {}
    x = solve_cg(hvp, rhs, damping=0.0, info=info)
    np.testing.assert_allclose(x[:, 0], rhs[:, 0] / torch.where(d > 0, d, 1.0), rtol=1e-12, atol=1e-12)
    assert info["negative_curvature"] == 1 and info["unconverged"] == 0 and info["iterations"] <= 6
    assert torch.isfinite(x).all()
    # the explicit solve of the same indefinite system would flip the sign of the -0.3 direction; damping fixes it
    x_damped = solve_cg(hvp, rhs, damping=0.5, info=info)
    np.testing.assert_allclose(x_damped, rhs / (d + 0.5)[:, None], rtol=1e-10)
    assert info["negative_curvature"] == 0 and info["unconverged"] == 0
    # the cap: a positive definite system too ill-conditioned to reach 1e-10 within it
    p = CG_MAX_ITER + 200
    spread = torch.logspace(-8, 0, p, dtype=torch.float64)
    x = solve_cg(lambda v: spread[:, None] * v, torch.ones(p, 1, dtype=torch.float64), damping=0.0, info=info)
    assert info["iterations"] == CG_MAX_ITER and info["unconverged"] == 1 and info["negative_curvature"] == 0
    solve_cg(lambda v: spread[:, None] * v, torch.ones(p, 1, dtype=torch.float64), damping=0.0, max_iter=5, info=info)
    assert info["iterations"] == 5


def test_an_unconverged_cg_influence_warns_and_says_so_in_its_attributes(problem):
    from bif.warnings import BifWarning

    with pytest.warns(BifWarning, match="did not converge in 2 iterations"):
        cg = influence_scores(problem, damping=L2, solver="cg", cg_max_iter=2)
    assert cg.attrs["cg_iterations"] == 2 and cg.attrs["cg_unconverged"] == 12
    assert cg.attrs["cg_negative_curvature"] == 0 and "indefinite" not in cg.attrs
    assert influence_scores(problem, damping=L2, solver="cg").attrs["cg_unconverged"] == 0


def test_exact_if_equals_the_upweighting_derivative(problem, exact_if):
    """dφ_q/dε for weight 1 + ε on train i (objective normalized by n) equals τ[i, q]."""
    x, y = problem.train.tensors
    eps = 1e-5
    for i in (0, 7, 33):
        w = torch.ones(60, dtype=torch.float64)
        w[i] += eps
        up = newton_fit(x, y, num_classes=3, l2=L2, sample_weight=w)
        w[i] -= 2 * eps
        down = newton_fit(x, y, num_classes=3, l2=L2, sample_weight=w)
        deriv = (query_losses(problem, up) - query_losses(problem, down)) / (2 * eps)
        np.testing.assert_allclose(deriv, exact_if.values[i], rtol=1e-4, atol=1e-8)


def test_exact_if_predicts_leave_one_out(problem, exact_if):
    """Removing i changes φ_q by about -τ[i, q] (first order; LOO also renormalizes by n - 1)."""
    x, y = problem.train.tensors
    base = query_losses(problem, problem.model)
    drop, pred = [], []
    for i in range(0, 60, 4):
        keep = torch.arange(60) != i
        m = newton_fit(x[keep], y[keep], num_classes=3, l2=L2)
        drop.append(query_losses(problem, m) - base)
        pred.append(-exact_if.values[i])
    drop, pred = np.ravel(drop), np.ravel(pred)
    assert np.corrcoef(drop, pred)[0, 1] > 0.97
    slope = float(drop @ pred / (pred @ pred))
    assert 0.8 < slope < 1.25


def _bif(problem):
    s = SamplerConfig(num_chains=2, num_draws=200, num_burnin_steps=100, steps_per_draw=2, step_size=1e-2,
                      gamma=10.0, batch_size=60, seed=0)
    return bif_in_memory(*sample_traces(problem, s))


def test_every_method_has_clearly_positive_lds(problem, exact_if, truth):
    """A flipped sign would show as a negative LDS; exact fits make the ground truth noise-free."""
    b, bc = _bif(problem)
    scores = {"influence": exact_if.values, "graddot": graddot_scores(problem).values,
              "gradcos": gradcos_scores(problem).values, "bif": b, "bif_corr": bc}
    res = {k: lds(v, truth.masks, truth.outputs) for k, v in scores.items()}
    assert res["influence"].mean > 0.9
    for name, r in res.items():
        assert r.mean > 0.6 and r.mean > 5 * r.stderr, (name, r.mean, r.stderr)
        assert lds(-scores[name], truth.masks, truth.outputs).mean == pytest.approx(-r.mean)


def test_ekfac_sign_and_agreement(problem, exact_if, truth):
    pytest.importorskip("kronfluence")
    from bif.evaluation.baselines.ekfac import ekfac_scores

    ek = ekfac_scores(problem, damping=L2)
    assert ek.dims == ("train", "query")
    assert np.corrcoef(ek.values.ravel(), exact_if.values.ravel())[0, 1] > 0.9
    assert lds(ek.values, truth.masks, truth.outputs).mean > 0.8


def test_trak_sign(problem, truth):
    pytest.importorskip("trak")
    from bif.evaluation.baselines.trak import trak_scores

    tr = trak_scores(problem, proj_dim=200, lambda_reg=0.1)
    assert tr.dims == ("train", "query")
    assert lds(tr.values, truth.masks, truth.outputs).mean > 0.6
    with pytest.raises(ValueError, match="proj_dim must be >= 200"):
        trak_scores(problem, proj_dim=100)


def test_bad_damping_and_solver_are_rejected(problem):
    with pytest.raises(ValueError, match="damping"):
        influence_scores(problem, damping=-1.0)
    with pytest.raises(ValueError, match="solver"):
        influence_scores(problem, solver="newton")


def test_token_problems_score_sequences_and_trak_refuses_them():
    """Per-token losses ((losses, mask) pairs): a baseline scores each sequence's loss, the sum of its valid token
    losses, so GradDot is the dot product of those sums' gradients, taken here by plain autograd one sequence at a
    time (torch.func was handed the pair's first item, a (1, T) tensor, and failed: not a scalar), and EK-FAC
    without curvature the same on its tracked head. TRAK's classifier task cannot score them: a message, where
    traker failed inside its vmap."""
    import token_problems as tp

    from bif.errors import ProblemError
    from bif.evaluation.baselines.trak import trak_scores

    prob = tp.build(n_train=7, n_query=3, length=6, min_len=2, prompt=1)

    def graddot_by_hand(params):
        def grad_of_sequence(ds, i):
            losses, mask = prob.loss(prob.model, tuple(t[i:i + 1] for t in ds.tensors))
            return torch.cat([g.reshape(-1) for g in torch.autograd.grad((losses * mask).sum(), params)])

        g_train = torch.stack([grad_of_sequence(prob.train, i) for i in range(7)])
        g_query = torch.stack([grad_of_sequence(prob.query, j) for j in range(3)])
        return -(g_train @ g_query.T).numpy() / 7

    want = graddot_by_hand(list(prob.model.parameters()))
    assert np.abs(want).max() > 1e-3
    np.testing.assert_allclose(graddot_scores(prob).values, want, rtol=1e-10, atol=1e-14)
    if importlib.util.find_spec("kronfluence"):  # EK-FAC without curvature (identity) on its tracked nn.Linear head
        from bif.evaluation.baselines.ekfac import ekfac_scores

        np.testing.assert_allclose(ekfac_scores(prob, strategy="identity").values,
                                   graddot_by_hand([prob.model.head.weight, prob.model.head.bias]), rtol=1e-10,
                                   atol=1e-14)
    q = query_losses(prob, prob.model)
    losses, mask = prob.loss(prob.model, prob.query.tensors)
    np.testing.assert_allclose(q, (losses * mask).sum(dim=1).detach().numpy(), rtol=1e-12)
    with pytest.raises(ProblemError, match=r"^TRAK \(traker's image-classification task\) scores a classifier"):
        trak_scores(prob, proj_dim=200)


def test_a_model_that_branches_on_its_input_gets_its_gradients_one_sample_at_a_time():
    """vmap cannot batch data-dependent control flow (``if x.sum() > 0``); such a model's per-sample gradients are
    taken one sample at a time, with the same values as plain autograd (it raised torch's vmap error)."""
    from torch.utils.data import TensorDataset

    from bif.problem import Problem

    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 1)

        def forward(self, x):
            out = self.lin(x)[:, 0]
            return out * 2.0 if bool(x.sum() > 0) else out  # data-dependent: one sample's sign

    torch.manual_seed(0)
    model = Branchy().double()
    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.randn(6, dtype=torch.float64)
    prob = Problem(model=model, train=TensorDataset(x, y), query=TensorDataset(x[:2], y[:2]),
                   loss=lambda m, b: (m(b[0]) - b[1]) ** 2)

    def grad_by_hand(i):
        loss = prob.loss(model, (x[i:i + 1], y[i:i + 1]))[0]
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])

    g = torch.stack([grad_by_hand(i) for i in range(6)])
    assert {bool(x[i].sum() > 0) for i in range(6)} == {True, False}  # both branches taken
    np.testing.assert_allclose(graddot_scores(prob).values, -(g @ g[:2].T).numpy() / 6, rtol=1e-12)
