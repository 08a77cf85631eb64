"""The sampler seam: kernels against their hand-written equations, the registry, and a custom kernel in a chain."""
from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

from bif.config import SamplerConfig
from bif.errors import BifError, ConfigError
from bif.examples import linear
from bif.sampling import kernels as K
from bif.sampling.chain import SGLDChain, sample_chains, sample_traces
from bif.store.traces import TraceStore

NBETA, GAMMA, EPS = 40.0, 3.0, 1e-2


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 2), (4,)]
    params = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    grads = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    anchor = [p + 0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
    return params, grads, anchor


def _step(kernel, params, grads, anchor, seed=5):
    with torch.no_grad():
        kernel.step(params, grads, anchor=anchor, nbeta=NBETA, gamma=GAMMA, step_size=EPS,
                    generator=torch.Generator().manual_seed(seed))


def _noises(params, seed=5):
    """ξ as the kernels draw it: one N(0, I) draw of all elements, flattened in parameter order."""
    g = torch.Generator().manual_seed(seed)
    flat = torch.randn(sum(p.numel() for p in params), generator=g, dtype=params[0].dtype)
    return [v.view(p.shape) for v, p in zip(flat.split([p.numel() for p in params]), params)]


def test_registry_has_the_builtin_kernels_and_maps_the_preconditioner():
    assert {"sgld", "psgld"} <= set(K.registered_kernels())
    assert K.get_kernel("sgld") is K.SGLD and K.get_kernel("psgld") is K.PSGLD
    assert K.kernel_name(SamplerConfig()) == "sgld"
    assert K.kernel_name(SamplerConfig(preconditioner="rmsprop")) == "psgld"


def test_unknown_kernel_is_a_config_error_naming_it_and_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown sampler kernel 'sghmc_nope'.*psgld, sgld.*register_kernel"):
        K.get_kernel("sghmc_nope")
    assert issubclass(ConfigError, BifError)
    prob = linear.build(n=10, d=2, m=2)
    with pytest.raises(ConfigError, match="sghmc_nope"):
        SGLDChain(prob, SamplerConfig(), chain=0, kernel="sghmc_nope")


def test_register_rejects_a_non_kernel_and_a_taken_name():
    with pytest.raises(TypeError):
        K.register_kernel("x_not_a_kernel")(object)
    with pytest.raises(ConfigError, match="'sgld' is already registered"):
        @K.register_kernel("sgld")
        class Other(K.Kernel):
            pass


def test_sgld_step_is_the_equation():
    """w ← w - ε/2·(nβ·g + γ(w - w*)) + √ε·ξ, ξ from the generator in parameter order."""
    params, grads, anchor = _tensors()
    want = [p - EPS / 2 * (NBETA * g + GAMMA * (p - a)) + math.sqrt(EPS) * xi
            for p, g, a, xi in zip(params, grads, anchor, _noises(params))]
    kernel = K.SGLD(["a", "b"], params, SamplerConfig())
    before = [g.clone() for g in grads]
    _step(kernel, params, grads, anchor)
    for p, w in zip(params, want):
        torch.testing.assert_close(p, w, rtol=1e-12, atol=1e-12)
    assert all(torch.equal(g, b) for g, b in zip(grads, before))  # gradients are not modified
    assert kernel.state_dict() is None


def test_sgld_step_is_the_equation_in_float32_and_with_mixed_dtypes():
    """float32 parameters (the chains' usual dtype) to float32 rounding; parameters of two dtypes draw one ξ per
    tensor in parameter order instead of one flat draw."""
    params, grads, anchor = _tensors(3)
    params32, grads32, anchor32 = ([t.float() for t in ts] for ts in (params, grads, anchor))
    want = [p - EPS / 2 * (NBETA * g + GAMMA * (p - a)) + math.sqrt(EPS) * xi
            for p, g, a, xi in zip(params32, grads32, anchor32, _noises(params32))]
    _step(K.SGLD(["a", "b"], params32, SamplerConfig()), params32, grads32, anchor32)
    for p, w in zip(params32, want):
        torch.testing.assert_close(p, w, rtol=1e-6, atol=1e-6)
    mixed, mgrads, manchor = ([ts[0], ts[1].float()] for ts in _tensors(4))
    g = torch.Generator().manual_seed(5)
    xis = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in mixed]
    want = [p - EPS / 2 * (NBETA * gr + GAMMA * (p - a)) + math.sqrt(EPS) * xi
            for p, gr, a, xi in zip(mixed, mgrads, manchor, xis)]
    _step(K.SGLD(["a", "b"], mixed, SamplerConfig()), mixed, mgrads, manchor)
    torch.testing.assert_close(mixed[0], want[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mixed[1], want[1], rtol=1e-6, atol=1e-6)
    assert [p.dtype for p in mixed] == [torch.float64, torch.float32]


def test_sgld_noise_is_fresh_at_every_step():
    """Two steps from the same generator state and the same w, grads: the second's ξ continues the stream."""
    params, grads, anchor = _tensors(5)
    kernel = K.SGLD(["a", "b"], params, SamplerConfig())
    gen = torch.Generator().manual_seed(7)
    start = [p.clone() for p in params]
    with torch.no_grad():
        kernel.step(params, grads, anchor=anchor, nbeta=NBETA, gamma=GAMMA, step_size=EPS, generator=gen)
        first = [p.clone() for p in params]
        for p, s0 in zip(params, start):
            p.copy_(s0)
        kernel.step(params, grads, anchor=anchor, nbeta=NBETA, gamma=GAMMA, step_size=EPS, generator=gen)
    ref = torch.Generator().manual_seed(7)
    n = sum(p.numel() for p in params)
    xi1, xi2 = torch.randn(n, generator=ref, dtype=torch.float64), torch.randn(n, generator=ref, dtype=torch.float64)
    assert not torch.equal(xi1, xi2)
    delta = torch.cat([(b - a).reshape(-1) for a, b in zip(first, params)])  # the same drift: the difference is noise
    torch.testing.assert_close(delta, math.sqrt(EPS) * (xi2 - xi1), rtol=1e-10, atol=1e-12)


def test_sgld_drift_without_prior_is_a_gradient_step():
    """With γ = 0 and the noise taken out, an SGLD step is one SGD step with learning rate ε/2·nβ."""
    params, grads, anchor = _tensors(1)
    want = [p - EPS / 2 * NBETA * g for p, g in zip(params, grads)]
    kernel = K.SGLD(["a", "b"], params, SamplerConfig())
    noise = _noises(params)
    with torch.no_grad():
        kernel.step(params, grads, anchor=anchor, nbeta=NBETA, gamma=0.0, step_size=EPS,
                    generator=torch.Generator().manual_seed(5))
    for p, w, xi in zip(params, want, noise):
        torch.testing.assert_close(p - math.sqrt(EPS) * xi, w, rtol=1e-12, atol=1e-12)


def test_psgld_steps_are_the_equation_and_keep_v():
    """Two steps (V carries over) of V ← αV + (1-α)d⊙d, G = 1/(√V + e), w ← w - ε/2·G⊙d + √ε·√G⊙ξ."""
    s = SamplerConfig(preconditioner="rmsprop", rmsprop_alpha=0.9, rmsprop_eps=1e-3)
    params, grads, anchor = _tensors(2)
    kernel = K.PSGLD(["a", "b"], params, s)
    ref = [p.clone() for p in params]
    v = [torch.zeros_like(p) for p in params]
    for seed in (5, 6):
        for i, (g, a, xi) in enumerate(zip(grads, anchor, _noises(ref, seed))):
            d = NBETA * g + GAMMA * (ref[i] - a)
            v[i] = 0.9 * v[i] + 0.1 * d * d
            G = 1.0 / (v[i].sqrt() + 1e-3)
            ref[i] = ref[i] - EPS / 2 * G * d + math.sqrt(EPS) * G.sqrt() * xi
        _step(kernel, params, grads, anchor, seed=seed)
    for p, w in zip(params, ref):
        torch.testing.assert_close(p, w, rtol=1e-12, atol=1e-12)
    state = kernel.state_dict()
    assert set(state) == {"a", "b"}
    for name, want in zip("ab", v):
        torch.testing.assert_close(state[name], want, rtol=1e-12, atol=1e-12)
    fresh = K.PSGLD(["a", "b"], params, s)
    fresh.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(fresh.v, kernel.v))
    fresh.load_state_dict(None)  # a state without V (e.g. an SGLD state) leaves V as it is
    assert all(torch.equal(x, y) for x, y in zip(fresh.v, kernel.v))


def test_kernel_selection_matches_the_preconditioner():
    prob = linear.build(n=20, d=3, m=2, seed=1)
    s = SamplerConfig(num_chains=1, num_draws=3, num_burnin_steps=2, steps_per_draw=2, step_size=1e-3, batch_size=5,
                      preconditioner="rmsprop")
    assert isinstance(SGLDChain(prob, s, chain=0).kernel, K.PSGLD)
    assert isinstance(SGLDChain(prob, SamplerConfig(), chain=0).kernel, K.SGLD)
    by_config = sample_traces(prob, s)
    by_name = sample_traces(prob, s.model_copy(update={"preconditioner": "none"}), kernel="psgld")
    np.testing.assert_array_equal(by_config[0], by_name[0])


class _ScaledGD(K.Kernel):
    """Toy kernel: noise-free gradient descent on the localized objective, counting its steps as state."""

    def __init__(self, names, params, settings):
        super().__init__(names, params, settings)
        self.count = torch.zeros((), dtype=torch.int64)

    def step(self, params, grads, *, anchor, nbeta, gamma, step_size, generator):
        for p, g, a in zip(params, grads, anchor):
            p.sub_(K.localized_drift(g, p, a, nbeta=nbeta, gamma=gamma), alpha=step_size / 2)
        self.count += 1

    def state_dict(self):
        return {"count": self.count.clone()}

    def load_state_dict(self, state):
        if state is not None:
            self.count.copy_(state["count"])


@pytest.fixture
def toy_kernel():
    cls = K.register_kernel("test_toy_gd")(_ScaledGD)
    yield cls
    K._KERNELS.pop("test_toy_gd")


def test_custom_kernel_runs_through_the_chain_with_resume(toy_kernel, tmp_path):
    prob = linear.build(n=30, d=3, m=4, seed=0)
    s = SamplerConfig(num_chains=2, num_draws=8, num_burnin_steps=3, steps_per_draw=2, step_size=1e-3, gamma=5.0,
                      batch_size=30)  # full batch: the toy kernel is deterministic
    traces = sample_chains(prob, s, kernel="test_toy_gd")
    assert traces.train.shape == (2, 8, 30) and traces.query.shape == (2, 8, 4) and traces.distance.shape == (2, 8)
    # no noise: the chains agree up to the order of the full-batch sum (each chain permutes the batch)
    np.testing.assert_allclose(traces.train[0], traces.train[1], rtol=1e-12)
    # gradient descent from w* (not a minimizer of the train loss here): the loss falls, w leaves w*
    assert np.all(np.diff(traces.train[0].mean(axis=1)) < 0) and np.all(np.diff(traces.distance[0]) > 0)
    # resume through the store: the kernel's state travels in ChainState.precond
    full = list(SGLDChain(prob, s, chain=0, kernel=toy_kernel).run(num_draws=8, draws_per_block=4))
    store = TraceStore(str(tmp_path), loss_dtype="float64")
    store.write_block(full[0], block_index=0, ref_train_loss_mean=0.0)
    state, done = store.load_resume_state(0)
    assert done == 1 and int(state.precond["count"]) == 3 + 4 * 2
    resumed = SGLDChain(prob, s, chain=0, kernel="test_toy_gd")
    resumed.load_state(state)
    rest = list(resumed.run(num_draws=8, draws_per_block=4))
    np.testing.assert_array_equal(rest[0].train_losses, full[1].train_losses)
    assert int(resumed.kernel.count) == 3 + 8 * 2


def test_a_kernel_in_its_own_module_is_found_by_name(tmp_path, monkeypatch):
    """A new kernel is one file, bif/sampling/<name>.py: get_kernel imports it (so Dask workers find it too)."""
    import bif.sampling

    (tmp_path / "toy_lazy_kernel.py").write_text(
        "from bif.sampling.kernels import SGLD, register_kernel\n\n"
        "@register_kernel('toy_lazy_kernel')\nclass ToyLazy(SGLD):\n    pass\n")
    monkeypatch.setattr(bif.sampling, "__path__", [*bif.sampling.__path__, str(tmp_path)])
    try:
        cls = K.get_kernel("toy_lazy_kernel")
        assert cls.__name__ == "ToyLazy" and issubclass(cls, K.Kernel) and cls.name == "toy_lazy_kernel"
    finally:
        K._KERNELS.pop("toy_lazy_kernel", None)
        sys.modules.pop("bif.sampling.toy_lazy_kernel", None)
    with pytest.raises(ConfigError, match="unknown sampler kernel 'measure'"):  # a module that registers nothing
        K.get_kernel("measure")


def test_a_parameter_the_loss_does_not_use_follows_the_prior_and_the_noise():
    """Its gradient is 0 (not None, which the update cannot take): one step from w* moves it by √ε·ξ exactly,
    and the used weights' step is unchanged by its presence."""
    prob = linear.build(n=20, d=3, m=2, seed=2)
    s = SamplerConfig(num_chains=1, num_draws=2, num_burnin_steps=0, steps_per_draw=1, step_size=1e-3, gamma=5.0,
                      batch_size=20, seed=3)
    plain = SGLDChain(prob, s, chain=0)
    prob.model.register_parameter("unused", torch.nn.Parameter(torch.zeros(4, dtype=torch.float64)))
    extra = SGLDChain(prob, s, chain=0)
    assert extra.names == ["weight", "unused"]
    plain.sgld_step()
    extra.sgld_step()
    # one flat draw over [weight (1, 3), unused (4,)]: the weight's noise is the draw's first 3 values in both
    torch.testing.assert_close(extra.params[0], plain.params[0], rtol=1e-12, atol=1e-12)
    g = torch.Generator().manual_seed(extra.gen_noise.initial_seed())
    xi = torch.randn(7, generator=g, dtype=torch.float64)
    torch.testing.assert_close(extra.params[1].detach(), math.sqrt(1e-3) * xi[3:], rtol=1e-12, atol=1e-12)
