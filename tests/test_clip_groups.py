"""Group-wise clipping (the clip_groups option) against a float64 torch.func oracle.

The oracle groups the parameters by explicit name lists (not by dpcompile's rule), clips each
group of each sample to R/√K and sums; R is chosen so that some groups are clipped and some
are not."""
from __future__ import annotations

import math

import pytest
import torch

import dpcompile
from dpcompile.errors import DPCompileError
from dpcompile.options import DPOptions
from dpcompile.privacy.groups import OUTSIDE, GroupTable, group_key
from models import CNN, MLP, BreakNet, TinyGPT, batch_loss, compiled_clipped_sum, fresh_seed, per_sample_grads

TOL = 1e-5
torch.backends.cuda.matmul.allow_tf32 = False


def oracle(model, x, y, groups: list[list[str]]):
    """(per-sample gradients, (K, B) per-group norms) in float64."""
    grads = per_sample_grads(model, x, y)
    assert sorted(n for names in groups for n in names) == sorted(grads), "the groups must cover every parameter"
    norms = torch.stack([torch.cat([grads[n].flatten(1) for n in names], 1).norm(dim=1) for names in groups])
    return grads, norms


def oracle_sum(grads, norms, groups, R):
    """Σ_i C_ik g_ik with C_ik = min(1, (R/√K)/‖g_ik‖)."""
    factors = (R / math.sqrt(len(groups)) / (norms + 1e-6)).clamp(max=1.0)
    return {n: torch.einsum("b,b...->...", factors[k], grads[n]) for k, names in enumerate(groups) for n in names}


def threshold_between(norms) -> float:
    """R such that R/√K is the median group norm: some groups of some samples clipped, others not."""
    return float(norms.median()) * math.sqrt(norms.shape[0])


def check(got, want, seed):
    assert set(got) == set(want)
    for name, ref in want.items():
        err = float((got[name] - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
        assert err < TOL, f"{name}: relative error {err:.2e} (seed {seed})"


def by_layer(model):
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return [[n for n in names if n.rsplit(".", 1)[0] == layer] for layer in dict.fromkeys(n.rsplit(".", 1)[0] for n in names)]


CASES = {  # model, batch, clip_groups, the oracle's groups
    "mlp-layer": (MLP, lambda: MLP.batch(8), "layer", by_layer),
    "cnn-layer": (CNN, lambda: CNN.batch(6), "layer", by_layer),
    "gpt_tied-block": (lambda: TinyGPT(tied=True), lambda: TinyGPT.batch(6), "block", lambda m: [
        [n for n, _ in m.named_parameters() if n.startswith("blocks.0.")],
        [n for n, _ in m.named_parameters() if n.startswith("blocks.1.")],
        ["wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"]]),
    "gpt_untied-patterns": (TinyGPT, lambda: TinyGPT.batch(6), ["blocks.0.*", "*.ln*"], lambda m: [
        [n for n, _ in m.named_parameters() if n.startswith("blocks.0.")],
        [n for n, _ in m.named_parameters() if n.startswith("blocks.1.ln")],
        [n for n, _ in m.named_parameters() if not n.startswith(("blocks.0.", "blocks.1.ln"))]]),
}


@pytest.mark.parametrize("strategy", ["auto", "ghost", "instantiate"])
@pytest.mark.parametrize("case", list(CASES))
def test_each_group_is_clipped_to_its_share_of_R(case, strategy):
    seed = fresh_seed()
    torch.manual_seed(seed)
    build, batch, spec, groups_of = CASES[case]
    model = build()
    x, y = batch()
    groups = groups_of(model)
    grads, norms = oracle(model, x, y, groups)
    R = threshold_between(norms)
    share = R / math.sqrt(len(groups))
    assert (norms > share * 1.01).any() and (norms < share * 0.99).any()  # both kinds of groups occur
    got = compiled_clipped_sum(model, x, y, max_grad_norm=R, clip_groups=spec, strategy=strategy)
    check(got, oracle_sum(grads, norms, groups, R), seed)
    state = dpcompile.privacy_state(model)
    assert len(state.clip_group_table) == len(groups)
    # the norms reported are those of each sample's whole gradient, not of a group
    torch.testing.assert_close(state.last_sample_norms.double().cpu(), norms.pow(2).sum(0).sqrt(),
                               rtol=1e-4, atol=1e-7)


def test_graph_breaks_let_each_graph_clip_its_own_groups():
    """Two graphs whose groups do not overlap: each clips and noises its own groups in the graph
    (no deferred per-sample gradients), and the step is released and counted once."""
    seed = fresh_seed()
    torch.manual_seed(seed)
    model = BreakNet()
    x, y = BreakNet.batch(7)
    groups = [["emb.weight"], ["fc1.weight", "fc1.bias"], ["fc2.weight", "fc2.bias"]]  # emb.*, fc1.*, the rest
    grads, norms = oracle(model, x, y, groups)
    R = threshold_between(norms)
    got = compiled_clipped_sum(model, x, y, max_grad_norm=R, clip_groups=["emb.*", "fc1.*"])
    check(got, oracle_sum(grads, norms, groups, R), seed)
    state = dpcompile.privacy_state(model)
    assert len(state.compiled) == 2 and not any(c.deferred for c in state.compiled) and state.steps == 1
    torch.testing.assert_close(state.last_sample_norms.double().cpu(), norms.pow(2).sum(0).sqrt(), rtol=1e-4, atol=1e-7)


def test_a_group_spanning_two_graphs_is_refused_and_nothing_is_released():
    """fc1 (before the break) and fc2 (after it) in one group: each graph would clip its share to
    R/√K on its own, up to 2R/√K for the group."""
    model = BreakNet()
    x, y = BreakNet.batch(5)
    compiled = torch.compile(model, backend="dp", options={"noise_multiplier": 0.0, "clip_groups": ["emb.*"]})
    with pytest.raises(DPCompileError, match="several compiled graphs"):
        batch_loss(compiled(x), y).backward()
    state = dpcompile.privacy_state(model)
    assert all(p.grad is None for p in model.parameters()) and state.steps == 0


def test_graph_breaks_with_groups_keep_noise_once_per_parameter():
    """Noise on: each parameter noised by its own graph, once; std σR/E as without breaks."""
    torch.manual_seed(fresh_seed())
    model = BreakNet()
    model.emb = torch.nn.Embedding(30, 40)  # more coordinates for the std estimate
    model.fc1 = torch.nn.Linear(40, 16)
    x, y = BreakNet.batch(6)
    groups = [["emb.weight"], ["fc1.weight", "fc1.bias"], ["fc2.weight", "fc2.bias"]]
    grads, norms = oracle(model, x, y, groups)
    R, sigma, E = 0.3, 2.0, 8.0
    got = compiled_clipped_sum(model, x, y, max_grad_norm=R, clip_groups=["emb.*", "fc1.*"], noise_multiplier=sigma,
                      expected_batch_size=E)
    want = oracle_sum(grads, norms, groups, R)
    noise = torch.cat([(got[n] / x.shape[0] * E - want[n]).flatten() for n in want])
    assert noise.numel() > 1800 and abs(float(noise.std()) / (sigma * R) - 1) < 0.1


def test_noise_std_stays_sigma_R_over_the_divisor():
    """The sensitivity is still R (Σ_k (R/√K)² = R²): the noise is that of flat clipping."""
    torch.manual_seed(fresh_seed())
    model, (x, y) = MLP(), MLP.batch(16)
    groups = by_layer(model)
    grads, norms = oracle(model, x, y, groups)
    R, sigma, E = 0.5, 3.0, 20.0
    got = compiled_clipped_sum(model, x, y, max_grad_norm=R, clip_groups="layer", noise_multiplier=sigma,
                      expected_batch_size=E)
    want = oracle_sum(grads, norms, groups, R)
    noise = torch.cat([(got[n] / x.shape[0] * E - want[n]).flatten() for n in want])  # p.grad = (Σ + σR z)/E
    assert noise.numel() > 900
    assert abs(float(noise.std()) / (sigma * R) - 1) < 0.12


def test_a_parameter_of_a_new_group_after_the_first_compile_is_refused():
    """Unfreezing a layer adds a group K did not count: R/√K would no longer bound the sum."""
    model, (x, y) = MLP(), MLP.batch(8)
    model.out.requires_grad_(False)
    compiled = torch.compile(model, backend="dp", options={"noise_multiplier": 0.0, "clip_groups": "layer"})
    batch_loss(compiled(x), y).backward()
    assert len(dpcompile.privacy_state(model).clip_group_table) == 2
    model.zero_grad(set_to_none=True)
    model.out.requires_grad_(True)
    with pytest.raises(DPCompileError, match="clip group 'out'"):
        batch_loss(compiled(x), y).backward()
    assert all(p.grad is None for p in model.parameters())


def test_a_graph_of_part_of_the_model_counts_the_groups_of_the_whole_model():
    """Only fc1 takes part in the loss: K is still the model's 3 layers, so fc1 gets R/√3."""
    torch.manual_seed(fresh_seed())

    class Partial(MLP):
        def forward(self, x):
            return self.fc1(x)[:, :5]

    model, (x, y) = Partial(), MLP.batch(8)
    R = 1e-3  # every sample clipped: its fc1 gradient has norm R/√3
    got = compiled_clipped_sum(model, x, y, max_grad_norm=R, clip_groups="layer")
    assert len(dpcompile.privacy_state(model).clip_group_table) == 3
    total = torch.cat([got["fc1.weight"].flatten(), got["fc1.bias"].flatten()]).norm()
    assert total <= x.shape[0] * R / math.sqrt(3) * (1 + 1e-4)


@pytest.mark.parametrize("bad", ["layers", [], ["fc1.*", 3], "", 1.0])
def test_bad_clip_groups_are_refused(bad):
    with pytest.raises(DPCompileError, match="clip_groups"):
        DPOptions.from_dict({"clip_groups": bad})


def test_group_keys_of_hugging_face_names():
    transformers = pytest.importorskip("transformers")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=50))
    names = [n for n, _ in gpt2.named_parameters()]
    blocks = GroupTable(names, "block", 1.0)
    assert len(blocks) == 4 and group_key("transformer.h.2.attn.c_attn.weight", "block") == "transformer.h.2"
    assert group_key("transformer.wte.weight", "block") == OUTSIDE
    assert blocks.threshold == pytest.approx(0.5)
    layers = GroupTable(names, "layer", 1.0)
    assert group_key("transformer.h.0.mlp.c_fc.bias", "layer") == "transformer.h.0.mlp.c_fc"
    assert len(layers) == len({n.rsplit(".", 1)[0] for n in names})
    lora = "base_model.model.model.layers.7.self_attn.q_proj.lora_A.default.weight"
    assert group_key(lora, "block") == "base_model.model.model.layers.7"


def test_the_inspection_report_states_the_groups_and_their_threshold():
    from dpcompile.tools import inspection

    report = inspection.inspect_model(MLP(), torch.randn(8, 10), options={"clip_groups": "layer", "max_grad_norm": 3.0})
    summary = report.privacy_summary()
    assert "3 groups" in summary["clipped_per"] and f"{3.0 / math.sqrt(3):.4g}" in summary["clipped_per"]
    assert "clip group" in str(report)
    schedule = report.record("schedule")
    assert schedule.notes and "moved" in schedule.notes[0]  # each group's clipped sums follow its own norms


def test_poisson_batch_sizes_clip_per_group_through_one_symbolic_graph():
    """Batches of 4, 1 and 6 samples (B = 1 gets a static graph of its own); dynamic sizes share one."""
    seed = fresh_seed()
    torch.manual_seed(seed)
    model = TinyGPT(tied=True)
    compiled = torch.compile(model, backend="dp", options={"noise_multiplier": 0.0, "max_grad_norm": 0.05,
                                                           "clip_groups": "block"})
    groups = CASES["gpt_tied-block"][3](model)
    for size in (4, 1, 6):
        x, y = TinyGPT.batch(size)
        if size > 1:
            torch._dynamo.mark_dynamic(x, 0)
        model.zero_grad(set_to_none=True)
        batch_loss(compiled(x), y).backward()
        grads, norms = oracle(model, x, y, groups)
        check({k: p.grad.double() * size for k, p in model.named_parameters()}, oracle_sum(grads, norms, groups, 0.05),
              seed)
    assert len(dpcompile.privacy_state(model).compiled) == 2  # one symbolic-B graph, one B = 1 graph


def test_make_private_accounts_group_wise_clipping_like_flat_clipping():
    """make_private passes clip_groups to the backend; σ, steps and ε are those of flat clipping."""
    from torch.utils.data import DataLoader, TensorDataset

    spent = {}
    for groups in (None, "layer"):
        torch.manual_seed(0)
        net = MLP()
        data = TensorDataset(*MLP.batch(64))
        extra = {"clip_groups": groups} if groups else {}
        model, opt, loader = dpcompile.make_private(net, torch.optim.SGD(net.parameters(), lr=0.1),
                                                    DataLoader(data, batch_size=16), target_epsilon=4.0, epochs=1,
                                                    max_grad_norm=1.0, **extra)
        for x, y in loader:
            batch_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        state = dpcompile.privacy_state(net)
        assert (state.clip_group_table is not None) == (groups is not None)
        spent[groups] = (state.options.noise_multiplier, state.steps, dpcompile.privacy_spent(net, 1e-5))
    assert spent[None] == spent["layer"]


def test_the_onnx_export_of_a_group_wise_step_matches_the_oracle():
    """The exported private step keeps the groups: (Σ_i Σ_k C_ik g_ik + σR z) / B in onnxruntime."""
    pytest.importorskip("onnxruntime")
    from dpcompile.tools.export import export_onnx

    torch.manual_seed(fresh_seed())
    model, (x, y) = MLP(), MLP.batch(8)
    groups = by_layer(model)
    grads, norms = oracle(model, x, y, groups)
    R, sigma = threshold_between(norms), 0.5
    exported = export_onnx(model, x, target=y, options={"max_grad_norm": R, "noise_multiplier": sigma,
                                                        "clip_groups": "layer"})
    assert max(exported.errors.values()) < 1e-4  # against the dp backend's own step
    outputs = exported.run(exported.example_feeds, exported.session())
    noise = torch.from_numpy(exported.example_feeds["dp_noise"]).double()
    for name, total in oracle_sum(grads, norms, groups, R).items():
        offset, numel = exported.noise_slices[name]
        want = (total + sigma * R * noise[offset:offset + numel].view(total.shape)) / x.shape[0]
        got = torch.from_numpy(outputs[f"grad.{name}"]).double()
        assert float((got - want).abs().max() / want.abs().max()) < 1e-4, name
