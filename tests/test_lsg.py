"""LSG (low-rank + sparse gradients): the projected clipped sums against a float64 oracle that
applies the same projection to torch.func per-sample gradients; noise only on the kept
coordinates; accounting unchanged; choices private by construction and checkpointable."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import dpcompile
from dpcompile.errors import DPCompileError
from dpcompile.privacy.state import stream_seed
from models import MLP, TinyGPT, batch_loss, per_sample_grads

TOL = 1e-5


class MatmulNet(nn.Module):
    """Weights stored (in, out) and used as x @ W (HF Conv1D's layout)."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(10, 20) / 3)
        self.w2 = nn.Parameter(torch.randn(20, 5) / 4)

    def forward(self, x):
        return torch.tanh(x @ self.w1) @ self.w2

    @staticmethod
    def batch(b):
        return torch.randn(b, 10), torch.randint(0, 5, (b,))


MODELS = {
    "mlp": (MLP, ["*.weight"]),
    "gpt": (lambda: TinyGPT(tied=False), ["blocks.*.qkv.weight", "blocks.*.fc*.weight", "lm_head.weight"]),
    "matmul": (MatmulNet, ["w*"]),
}


def compile_lsg(model, lsg, **options):
    options = {"noise_multiplier": 0.0, "max_grad_norm": 0.05, "insecure_seed": 7, "lsg": lsg, **options}
    return torch.compile(model, backend="dp", options=options)


def lsg_plans(model):
    """{param name: LSGPlan} of every compiled graph of the model."""
    state = dpcompile.privacy_state(model)
    return {ctx.param_names[pos]: plan for ctx in state.compiled for pos, plan in ctx.plan.get("lsg", {}).items()}


def chosen_projections(model, step):
    """(L, R, index) the runtime fed to each lsg weight at `step` (cached by the projector)."""
    state = dpcompile.privacy_state(model)
    params = dict(model.named_parameters())
    out = {}
    for name, plan in lsg_plans(model).items():
        w = params[name].mT if plan.transposed else params[name]
        left, right, index = state.lsg.inputs(name, w, plan.rank, plan.kept, step)
        out[name] = (left.double().cpu(), right.double().cpu(), index.cpu(), plan.transposed)
    return out


def reduce(g, left, right, index):
    """(B, n, m) -> (B, k): the kept coordinates of (G Rᵀ, Lᵀ G), written independently."""
    coords = torch.cat([torch.einsum("bnm,rm->bnr", g, right).flatten(1),
                        torch.einsum("nr,bnm->brm", left, g).flatten(1)], 1)
    return coords[:, index]


def expand(coords, left, right, index):
    n, r = left.shape
    full = torch.zeros(r * (n + right.shape[1]), dtype=coords.dtype)
    full[index] = coords
    d_left, d_right = full[: n * r].view(n, r), full[n * r:].view(r, -1)
    core = left.T @ d_left
    return d_left @ right + left @ d_right - left @ core @ right


def oracle_lsg_sum(model, x, y, max_grad_norm, projections, groups=None):
    """Σ_i C_i ĝ_i in float64, ĝ_i = each sample's gradient with lsg weights in the reduced space.
    groups (lists of names): each group of ĝ_i clipped to R/√K on its own; norms then (K, B)."""
    grads = per_sample_grads(model, x, y)
    pieces = {}
    for name, g in grads.items():
        if name in projections:
            left, right, index, transposed = projections[name]
            pieces[name] = reduce(g.mT if transposed else g, left, right, index)
        else:
            pieces[name] = g.flatten(1)
    groups = groups or [list(pieces)]
    norms = torch.stack([torch.cat([pieces[n] for n in names], 1).norm(dim=1) for names in groups])
    factors = (max_grad_norm / len(groups) ** 0.5 / (norms + 1e-6)).clamp(max=1.0)
    factor_of = {n: factors[k] for k, names in enumerate(groups) for n in names}
    norms = norms[0] if len(groups) == 1 else norms
    out = {}
    for name, piece in pieces.items():
        summed = factor_of[name] @ piece
        if name in projections:
            left, right, index, transposed = projections[name]
            full = expand(summed, left, right, index)
            out[name] = full.T if transposed else full
        else:
            out[name] = summed.view(grads[name].shape[1:])
    return out, norms


def assert_close(got, want):
    for name, ref in want.items():
        err = float((got[name] - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
        assert err < TOL, f"{name}: relative error {err:.2e}"


CONFIGS = [("weights", "update", 1.0), ("weights", "update", 0.3), ("random", "random", 0.5)]


@pytest.mark.parametrize("name,subspace,mask,density",
                         [(n, *c) for n in ("mlp", "matmul") for c in CONFIGS] + [("gpt", "weights", "update", 0.3)])
def test_lsg_clipped_sum_matches_projected_oracle(name, subspace, mask, density):
    factory, layers = MODELS[name]
    torch.manual_seed(int(torch.seed() % 2**31))
    model = factory()
    x, y = type(model).batch(5) if name != "mlp" else MLP.batch(5)
    compiled = compile_lsg(model, {"layers": layers, "rank": 3, "density": density, "subspace": subspace,
                                   "mask": mask})
    batch_loss(compiled(x), y).backward()
    got = {k: p.grad.double() * x.shape[0] for k, p in model.named_parameters()}
    projections = chosen_projections(model, step=0)
    assert projections, "no weight went through lsg"
    want, norms = oracle_lsg_sum(model, x, y, 0.05, projections)
    assert (norms > 0.05).all()
    assert_close(got, want)
    for name_, (left, right, index, _) in projections.items():
        eye = torch.eye(left.shape[1], dtype=torch.float64)
        assert torch.allclose(left.T @ left, eye, atol=1e-5) and torch.allclose(right @ right.T, eye, atol=1e-5)
        assert len(index) == lsg_plans(model)[name_].kept


def test_full_density_lsg_is_the_orthogonal_projection_of_the_clipped_sum():
    """Density 1: the released gradient is P(Σ C_i G_i), P(G) = LLᵀG + GRᵀR − LLᵀGRᵀR (an
    independent formula), with C_i from the reduced norms."""
    torch.manual_seed(1)
    model = MLP()
    x, y = MLP.batch(6)
    compiled = compile_lsg(model, {"layers": ["fc2.weight"], "rank": 4, "density": 1.0})
    batch_loss(compiled(x), y).backward()
    left, right, _, _ = chosen_projections(model, 0)["fc2.weight"]
    grads = per_sample_grads(model, x, y)
    g = grads["fc2.weight"]
    reduced_sq = (g @ right.T).pow(2).sum((1, 2)) + (left.T @ g).pow(2).sum((1, 2))
    other_sq = sum(v.flatten(1).pow(2).sum(1) for k, v in grads.items() if k != "fc2.weight")
    factors = (0.05 / ((reduced_sq + other_sq).sqrt() + 1e-6)).clamp(max=1.0)
    clipped = torch.einsum("b,bnm->nm", factors, g)
    pl, pr = left @ left.T, right.T @ right
    want = pl @ clipped + clipped @ pr - pl @ clipped @ pr
    got = model.fc2.weight.grad.double() * x.shape[0]
    assert float((got - want).abs().max() / want.abs().max()) < TOL


def test_noise_is_added_in_the_reduced_dimension_only():
    torch.manual_seed(2)
    model = MLP()
    x, y = MLP.batch(4)
    sigma, clip = 1.3, 0.05
    compiled = compile_lsg(model, {"layers": ["fc1.weight", "fc2.weight"], "rank": 2, "density": 0.5},
                           noise_multiplier=sigma, max_grad_norm=clip)
    batch_loss(compiled(x), y).backward()
    noisy = {k: p.grad.double().clone() for k, p in model.named_parameters()}
    state = dpcompile.privacy_state(model)
    ctx = state.compiled[0]
    plans = lsg_plans(model)
    full_dims = sum(p.numel() for k, p in model.named_parameters() if k not in plans)
    assert ctx.plan["noise_numel"] == full_dims + sum(p.kept for p in plans.values())
    projections = chosen_projections(model, 0)
    want, _ = oracle_lsg_sum(model, x, y, clip, projections)
    gen = torch.Generator().manual_seed(stream_seed(state.seed, 0, ctx.noise_key))
    z = torch.randn(ctx.plan["noise_numel"], generator=gen).double()
    for position, (offset, numel) in ctx.plan["noise_slices"].items():
        name = ctx.param_names[position]
        noise = sigma * clip * z[offset:offset + numel]
        if name in plans:
            left, right, index, _ = projections[name]
            assert numel == len(index) < left.shape[1] * (left.shape[0] + right.shape[1])
            expected = (want[name] + expand(noise, left, right, index)) / x.shape[0]
        else:
            expected = (want[name] + noise.view(want[name].shape)) / x.shape[0]
        assert torch.allclose(noisy[name], expected, rtol=1e-4, atol=1e-6), name


def test_update_mask_follows_the_last_update_and_accounting_is_unchanged():
    torch.manual_seed(3)
    base, reduced = MLP(), MLP()
    reduced.load_state_dict(base.state_dict())
    options = {"noise_multiplier": 1.1, "max_grad_norm": 1.0, "sample_rate": 0.01, "expected_batch_size": 8, "insecure_seed": 5}
    plain = torch.compile(base, backend="dp", options=options)
    lowrank = compile_lsg(reduced, {"layers": ["fc2.weight"], "rank": 2, "density": 0.25}, **options)
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (base, reduced)]
    for step in range(3):
        x, y = MLP.batch(8)
        for model, opt in zip((plain, lowrank), opts):
            opt.zero_grad()
            batch_loss(model(x), y).backward()
            before = reduced.fc2.weight.detach().clone()
            opt.step()
        if step == 1:
            update = reduced.fc2.weight.detach() - before
    state = dpcompile.privacy_state(reduced)
    left, right, index, _ = chosen_projections(reduced, 2)["fc2.weight"]
    importance = torch.cat([(update.double() @ right.T).abs().flatten(), (left.T @ update.double()).abs().flatten()])
    assert set(index.tolist()) == set(importance.topk(len(index)).indices.tolist())
    assert state.accountant.state_dict() == dpcompile.privacy_state(base).accountant.state_dict()
    assert dpcompile.privacy_spent(reduced, 1e-5) == dpcompile.privacy_spent(base, 1e-5)


def test_resumed_run_makes_the_same_lsg_choices_and_gradients():
    def run(steps, resume_from=None):
        torch.manual_seed(4)
        model = MLP()
        compiled = compile_lsg(model, {"layers": ["*.weight"], "rank": 2, "density": 0.5, "refresh": 2},
                               noise_multiplier=1.0)
        opt = torch.optim.SGD(model.parameters(), lr=0.3)
        data = [MLP.batch(6) for _ in range(4)]
        start = 0
        if resume_from is not None:
            batch_loss(compiled(data[0][0]), data[0][1])  # compile and create the state
            model.load_state_dict(resume_from["model"])
            dpcompile.privacy_state(model).load_state_dict(resume_from["privacy"])
            start = resume_from["step"]
        for step in range(start, steps):
            opt.zero_grad()
            batch_loss(compiled(data[step][0]), data[step][1]).backward()
            opt.step()
        state = dpcompile.privacy_state(model)
        return model, {"model": {k: v.clone() for k, v in model.state_dict().items()},
                       "privacy": state.state_dict(), "step": steps}

    full, _ = run(4)
    torch._dynamo.reset()
    _, checkpoint = run(2)
    torch._dynamo.reset()
    resumed, _ = run(4, resume_from=checkpoint)
    for (k, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("lsg,match", [
    ({"layers": ["nothing.*"]}, "match no trainable parameter"),
    ({"layers": ["wte.weight"]}, "only applies to Linear"),
    ({"layers": ["blocks.0.qkv.weight"], "rank": 40}, "exceeds the smaller side"),
])
def test_lsg_refusals_name_the_problem(lsg, match):
    model = TinyGPT(tied=False)
    x, y = TinyGPT.batch(3)
    compiled = compile_lsg(model, lsg)
    with pytest.raises(Exception, match=match):
        batch_loss(compiled(x), y).backward()


@pytest.mark.parametrize("lsg,match", [
    ({"rank": 0}, "rank"), ({"density": 1.5}, "density"), ({"subspace": "data"}, "subspace"),
    ({"mask": "topk"}, "mask"), ({"ranks": 2}, "unknown lsg option"), ("fc*", "must be a dict"),
])
def test_invalid_lsg_options_are_refused(lsg, match):
    with pytest.raises(DPCompileError, match=match):
        dpcompile.DPOptions.from_dict({"lsg": lsg})


def test_lsg_with_group_wise_clipping_matches_the_projected_oracle():
    """clip_groups="layer" next to lsg: each layer's reduced gradient clipped to R/√K."""
    torch.manual_seed(int(torch.seed() % 2**31))
    model, (x, y) = MLP(), MLP.batch(6)
    lsg = {"layers": ["*.weight"], "rank": 3, "density": 0.5}
    groups = [[f"{layer}.weight", f"{layer}.bias"] for layer in ("fc1", "fc2", "out")]
    probe = copy.deepcopy(model)
    batch_loss(compile_lsg(probe, lsg, max_grad_norm=1e6)(x), y).backward()  # the step-0 projections
    _, norms = oracle_lsg_sum(probe, x, y, 1e6, chosen_projections(probe, step=0), groups)
    R = float(norms.median()) * 3 ** 0.5  # some groups clipped, some not
    torch._dynamo.reset()
    batch_loss(compile_lsg(model, lsg, max_grad_norm=R, clip_groups="layer")(x), y).backward()
    projections = chosen_projections(model, step=0)
    want, norms = oracle_lsg_sum(model, x, y, R, projections, groups)
    share = R / 3 ** 0.5
    assert (norms > share * 1.01).any() and (norms < share * 0.99).any()
    assert_close({k: p.grad.double() * x.shape[0] for k, p in model.named_parameters()}, want)
