"""Compiled clipped sums against the float64 torch.func oracle, on fresh random inputs."""
from __future__ import annotations

import re

import pytest
import torch

import dpcompile
from dpcompile.tools.inspection import report_of
from models import (CNN, DEVICE, MLP, BreakNet, Conv1dNet, TinyGPT, batch_loss, compiled_clipped_sum, fresh_seed,
                    oracle_clipped_sum)

TOL = 1e-5
torch.backends.cuda.matmul.allow_tf32 = False  # DEVICE=cuda: float32 matmuls as float32
torch.backends.cudnn.allow_tf32 = False


def assert_close(got, want, seed):
    for name, ref in want.items():
        err = float((got[name] - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
        assert err < TOL, f"{name}: relative error {err:.2e} (seed {seed})"


MODELS = {
    "mlp": lambda: MLP(),
    "cnn": lambda: CNN(),
    "conv1d_scale": lambda: Conv1dNet(),
    "gpt_untied": lambda: TinyGPT(tied=False),
    "gpt_tied": lambda: TinyGPT(tied=True),
}


# What each model checks, for the README's supported-layers table (docs/layer_table.py).
COVERS = {
    "mlp": ("nn.Linear",),
    "cnn": ("nn.Conv2d (grouped, strided)", "nn.GroupNorm", "F.max_pool2d", "F.pad"),
    "conv1d_scale": ("nn.Conv1d", "elementwise scale parameter"),
    "gpt_untied": ("nn.Embedding", "nn.LayerNorm", "F.scaled_dot_product_attention"),
    "gpt_tied": ("tied input/output embedding (phantom clipping)",),
}
GPT = COVERS["gpt_untied"] + ("nn.Linear",)


def covered(*names):
    return [pytest.param(n, marks=pytest.mark.covers(*COVERS[n])) for n in names]


@pytest.mark.parametrize("strategy", ["auto", "ghost", "instantiate"])
@pytest.mark.parametrize("name", covered(*MODELS))
def test_clipped_sum_matches_oracle(name, strategy):
    seed = fresh_seed()
    torch.manual_seed(seed)
    model = MODELS[name]()
    x, y = type(model).batch(5)
    R = 0.05  # small enough that every sample is clipped...
    got = compiled_clipped_sum(model, x, y, max_grad_norm=R, strategy=strategy)
    want, norms = oracle_clipped_sum(model, x, y, R)
    assert (norms > R).all()
    assert_close(got, want, seed)
    state = dpcompile.privacy_state(model)
    assert torch.allclose(state.last_sample_norms.double().cpu(), norms, rtol=1e-4)


@pytest.mark.parametrize("name", covered("mlp", "gpt_tied"))
def test_partial_clipping_matches_oracle(name):
    """A bound between the smallest and largest norm: some samples clipped, some not."""
    seed = fresh_seed()
    torch.manual_seed(seed)
    model = MODELS[name]()
    x, y = type(model).batch(6)
    _, norms = oracle_clipped_sum(model, x, y, 1.0)
    R = float(norms.median())
    got = compiled_clipped_sum(model, x, y, max_grad_norm=R)
    want, _ = oracle_clipped_sum(model, x, y, R)
    assert_close(got, want, seed)


@pytest.mark.covers(*GPT, options={"clipping": "automatic"})
def test_automatic_clipping_matches_oracle():
    seed = fresh_seed()
    torch.manual_seed(seed)
    model = TinyGPT()
    x, y = TinyGPT.batch(4)
    got = compiled_clipped_sum(model, x, y, max_grad_norm=0.7, clipping="automatic", automatic_gamma=0.05)
    want, _ = oracle_clipped_sum(model, x, y, 0.7, clipping="automatic", gamma=0.05)
    assert_close(got, want, seed)


@pytest.mark.covers("nn.Linear", options={"reduction": "sum"})
def test_sum_reduction_matches_oracle():
    seed = fresh_seed()
    torch.manual_seed(seed)
    model = MLP()
    x, y = MLP.batch(7)
    options = {"noise_multiplier": 0.0, "loss_reduction": "sum", "max_grad_norm": 0.3}
    compiled = torch.compile(model, backend="dp", options=options)
    batch_loss(compiled(x), y, "sum").backward()
    want, _ = oracle_clipped_sum(model, x, y, 0.3)
    assert_close({k: p.grad.double() * 7 for k, p in model.named_parameters()}, want, seed)


@pytest.mark.covers("nn.Linear on (B, H, T, d) inputs")
def test_linear_with_several_leading_dims():
    """nn.Linear applied to (B, H, T, d) inputs: the samples are the outer of three flattened dims."""
    seed = fresh_seed()
    torch.manual_seed(seed)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.head = torch.nn.Linear(6, 5), torch.nn.Linear(5, 3)

        def forward(self, x):
            return self.head(torch.relu(self.inner(x)).mean((1, 2)))

        @staticmethod
        def batch(b):
            return torch.randn(b, 2, 3, 6), torch.randint(0, 3, (b,))

    model = Net()
    x, y = Net.batch(5)
    got = compiled_clipped_sum(model, x, y, max_grad_norm=0.1)
    want, _ = oracle_clipped_sum(model, x, y, 0.1)
    assert_close(got, want, seed)


def test_graph_break_clips_with_the_global_norm():
    """Two compiled graphs, one backward each: the clip factor must use both graphs' norms."""
    seed = fresh_seed()
    torch.manual_seed(seed)
    model = BreakNet()
    x, y = BreakNet.batch(6)
    _, norms = oracle_clipped_sum(model, x, y, 1.0)
    R = float(norms.median())
    got = compiled_clipped_sum(model, x, y, max_grad_norm=R)
    want, _ = oracle_clipped_sum(model, x, y, R)
    assert_close(got, want, seed)
    state = dpcompile.privacy_state(model)
    assert len(state.compiled) == 2 and all(ctx.deferred for ctx in state.compiled)
    assert state.steps == 1  # one release for the whole backward, not one per graph


def test_a_compiled_training_function_with_a_graph_break_clips_once_with_the_global_norm():
    """torch.compile(step_fn) over a model with a graph break: the region after the break (with
    parameters of its own) joins the state of the region that ran before it in the same call,
    so one clip covers both (each region clipped on its own would let one sample reach 2R)."""
    seed = fresh_seed()
    torch.manual_seed(seed)
    model = BreakNet()
    x, y = BreakNet.batch(6)
    _, norms = oracle_clipped_sum(model, x, y, 1.0)
    R = float(norms.median())

    def step(net, x, y):
        return batch_loss(net(x), y)

    torch._dynamo.reset()
    torch.compile(step, backend="dp", options={"noise_multiplier": 0.0, "max_grad_norm": R})(model, x, y).backward()
    want, _ = oracle_clipped_sum(model, x, y, R)
    assert_close({k: p.grad.double() * len(x) for k, p in model.named_parameters()}, want, seed)  # Σ, not mean
    state = dpcompile.privacy_state(model)
    assert all(getattr(p, "_dpcompile_state") is state for p in model.parameters()) and state.steps == 1


@pytest.mark.covers(*GPT, options={"dtype": "bf16 autocast"})
def test_bf16_autocast_matches_oracle_to_bf16_precision():
    """Under autocast the weight-gradient sites run in bf16 and are cast to the fp32 parameters."""
    seed = fresh_seed()
    torch.manual_seed(seed)
    model = TinyGPT()
    x, y = TinyGPT.batch(4)
    model.to(DEVICE)
    compiled = torch.compile(model, backend="dp", options={"noise_multiplier": 0.0, "max_grad_norm": 0.05})
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = compiled(x.to(DEVICE))
    batch_loss(out.float().cpu(), y).backward()
    want, norms = oracle_clipped_sum(model, x, y, 0.05)
    assert (norms > 0.05).all()
    got = torch.cat([p.grad.double().cpu().flatten() * 4 for p in model.parameters()])
    ref = torch.cat([want[k].flatten() for k, _ in model.named_parameters()])
    assert float((got - ref).norm() / ref.norm()) < 3e-2, f"seed {seed}"


@pytest.mark.parametrize("padding_idx", [None, 0])
def test_phantom_clipping_of_tied_embeddings(padding_idx):
    """Tied input/output embedding: the phantom norm (with its cross term) is exact."""
    seed = fresh_seed()
    torch.manual_seed(seed)
    model = TinyGPT(tied=True)
    if padding_idx is not None:
        model.wte.padding_idx = padding_idx
    x, y = TinyGPT.batch(4)
    x[:, -2:] = 0  # some padding tokens (plain token 0 when padding_idx is None)
    got = compiled_clipped_sum(model, x, y, max_grad_norm=0.05, strategy="auto")
    want, _ = oracle_clipped_sum(model, x, y, 0.05)
    assert_close(got, want, seed)
    table = next(r for r in dpcompile.privacy_state(model).compiled[0].records if r.name == "book_keeping").table
    row = next(r for r in table if r["param"] == "wte.weight")
    assert row["strategy"] == "phantom" and row["kind"] == "shared(embedding+linear)"


def test_transposed_and_3d_convolutions_clip_like_the_oracle():
    """ConvTranspose2d and Conv3d share the windowed-correlation formula of every convolution
    (more forms in test_layer_coverage.py)."""
    seed = fresh_seed()
    torch.manual_seed(seed)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up = torch.nn.ConvTranspose2d(2, 3, 2, stride=2)
            self.vol = torch.nn.Conv3d(1, 2, 2)
            self.head = torch.nn.Linear(3 * 6 * 6 + 2 * 2 * 2 * 2, 3)

        def forward(self, x):
            a = torch.tanh(self.up(x))  # (B, 3, 6, 6)
            b = torch.tanh(self.vol(x[:, :1].reshape(-1, 1, 3, 3, 1).expand(-1, -1, -1, -1, 3)[..., :3, :3, :3]))
            return self.head(torch.cat([a.flatten(1), b.flatten(1)], 1))

        @staticmethod
        def batch(b):
            return torch.randn(b, 2, 3, 3), torch.randint(0, 3, (b,))

    model = Net()
    x, y = Net.batch(4)
    got = compiled_clipped_sum(model, x, y, max_grad_norm=0.05)
    want, _ = oracle_clipped_sum(model, x, y, 0.05)
    assert_close(got, want, seed)


def test_frozen_parameters_are_left_out_of_the_norm():
    """Fine-tuning: only trainable parameters' gradients are clipped and released."""
    seed = fresh_seed()
    torch.manual_seed(seed)
    model = TinyGPT()
    for p in list(model.wte.parameters()) + list(model.blocks[0].parameters()):
        p.requires_grad_(False)
    x, y = TinyGPT.batch(4)
    got = compiled_clipped_sum(model, x, y, max_grad_norm=0.05)
    want, _ = oracle_clipped_sum(model, x, y, 0.05)  # the oracle differentiates trainable ones only
    assert model.wte.weight.grad is None
    assert_close({k: v for k, v in got.items() if k in want}, want, seed)


@pytest.mark.parametrize("name", list(MODELS) + ["graph_break"])
def test_poisson_batch_sizes_down_to_one_sample_clip_like_the_oracle(name):
    """Poisson sampling draws batches of any size, one sample included (Dynamo compiles a
    static B=1 graph for it, where matmuls with a size-1 dim must not hide the samples)."""
    seed = fresh_seed()
    torch.manual_seed(seed)
    model = BreakNet() if name == "graph_break" else MODELS[name]()
    model.to(DEVICE)
    R = 0.05
    compiled = torch.compile(model, backend="dp", options={"noise_multiplier": 0.0, "max_grad_norm": R})
    for size in (4, 1, 3):
        x, y = type(model).batch(size)
        if size > 1:
            torch._dynamo.mark_dynamic(x, 0)
        model.zero_grad(set_to_none=True)
        batch_loss(compiled(x.to(DEVICE)), y.to(DEVICE)).backward()
        got = {k: p.grad.double().cpu() * size for k, p in model.named_parameters()}
        want, _ = oracle_clipped_sum(model, x, y, R)
        assert_close(got, want, seed)


class PaddedFeatures(torch.nn.Module):
    """Pads the feature dim of a transposed (features × samples) tensor, as Inductor's pad_mm
    does to the vocab dim of LM-head gradients on GPUs; padding the sample dim is refused."""

    def __init__(self, pad_samples=False):
        super().__init__()
        self.fc, self.out = torch.nn.Linear(10, 6), torch.nn.Linear(6 if pad_samples else 8, 3)
        self.pad = (0, 2) if pad_samples else (0, 0, 0, 2)

    def forward(self, x):
        h = torch.tanh(self.fc(x)).t()                     # (6, B): samples along dim 1
        h = torch.nn.functional.pad(h, self.pad)           # (8, B), or (6, B + 2) when padding samples
        return self.out(h.t()[: x.shape[0]])

    @staticmethod
    def batch(b):
        return torch.randn(b, 10), torch.randint(0, 3, (b,))


def test_padding_feature_dims_of_transposed_activations_clips_like_the_oracle():
    seed = fresh_seed()
    torch.manual_seed(seed)
    model = PaddedFeatures()
    x, y = PaddedFeatures.batch(5)
    got = compiled_clipped_sum(model, x, y, max_grad_norm=0.05)
    want, norms = oracle_clipped_sum(model, x, y, 0.05)
    assert (norms > 0.05).all()
    assert_close(got, want, seed)


def test_padding_the_sample_dim_is_refused():
    model = PaddedFeatures(pad_samples=True)
    x, y = PaddedFeatures.batch(5)
    with pytest.raises(Exception, match="pads the batch dimension"):
        compiled_clipped_sum(model, x, y)



class _PaddedGradMatmul(torch.autograd.Function):
    """x @ wᵀ whose gradients are computed the way Inductor's pad_mm rewrites unaligned GEMMs on
    GPUs: zero-pad the vocab dim of the output gradient (transposed for the weight gradient, whose
    result is sliced back). Written by hand so that CPU runs see that backward graph."""

    generate_vmap_rule = True  # the oracle vmaps it

    @staticmethod
    def forward(x, weight):
        return x @ weight.t()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        g2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
        padded = torch.nn.functional.pad(g2.t(), (0, 0, 0, 3))  # (vocab + 3, rows)
        grad_x = torch.nn.functional.pad(g2, (0, 3)) @ torch.nn.functional.pad(weight, (0, 0, 0, 3))
        return grad_x.view_as(x), torch.ops.aten.slice.Tensor(torch.mm(padded, x2), 0, 0, -3)  # as pad_mm slices


class PaddedHead(torch.nn.Module):
    def __init__(self, vocab=7):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, 6)
        self.head = torch.nn.Parameter(torch.randn(vocab, 6) * 0.3)

    def forward(self, idx):
        return _PaddedGradMatmul.apply(torch.tanh(self.emb(idx)), self.head).mean(1)

    @staticmethod
    def batch(b):
        return torch.randint(0, 7, (b, 5)), torch.randint(0, 7, (b,))


@pytest.mark.parametrize("strategy", ["ghost", "instantiate"])
def test_gemm_gradient_sliced_back_from_zero_padding_keeps_exact_norms(strategy):
    """pad_mm's slice drops only zeros: the head keeps its ghost option, and instantiation takes the
    norm of the padded per-sample GEMM and slices the clipped sum once; both clip like the oracle.
    The per-sample GEMM reads the input-gradient GEMM's pad of the output gradient, transposed
    (one pad, stored untransposed), not a pad of its transpose."""
    seed = fresh_seed()
    torch.manual_seed(seed)
    model = PaddedHead()
    x, y = PaddedHead.batch(6)
    got = compiled_clipped_sum(model, x, y, max_grad_norm=0.05, strategy=strategy)
    want, norms = oracle_clipped_sum(model, x, y, 0.05)
    assert (norms > 0.05).all()
    assert_close(got, want, seed)
    plan = {row.param: row.strategy for row in report_of(model).table()}
    assert plan["head"] == strategy
    device = model.head.device  # compiled_clipped_sum moved the model to the test device
    text = dpcompile.inspect_model(model, x.to(device), options={"strategy": strategy},
                                   target=y.to(device)).graph("book_keeping").text()
    padded = re.findall(r"aten\.constant_pad_nd\(%(\w+)", text)  # output gradient, weight (GPUs: maybe more)
    assert len(padded) == len(set(padded)) >= 2, text
    assert not any(re.search(rf"%{name} = aten\.permute", text) for name in padded), text
    if strategy == "instantiate":  # the slice runs once, on the clipped sum, not on every sample
        assert "instantiate_post" not in text
        assert re.search(r"slice\S* = aten\.slice\.Tensor\(%weighted_sum", text), text


@pytest.mark.parametrize("keep,pad_value,want", [(7, 0.0, True), (-3, 0.0, True), (8, 0.0, True), (6, 0.0, False),
                                                 (-4, 0.0, False), (7, 1.0, False)])
def test_a_slice_counts_as_norm_preserving_only_when_it_drops_zero_padding(keep, pad_value, want):
    from torch.fx.experimental.proxy_tensor import make_fx
    from dpcompile.compiler.passes.param_grads import drops_only_padding

    def padded_gemm(g, x):
        padded = torch.mm(torch.nn.functional.pad(g.t(), (0, 0, 0, 3), value=pad_value), x)  # (10, 6)
        return torch.ops.aten.slice.Tensor(padded, 0, 0, keep)  # as pad_mm writes it (negative ends too)

    gm = make_fx(padded_gemm)(torch.randn(4, 7), torch.randn(4, 6))
    (slice_node,) = [n for n in gm.graph.nodes if n.target is torch.ops.aten.slice.Tensor]
    assert drops_only_padding(slice_node) is want
