"""Layer coverage (issue 22): convolutions of every form, nn.Bilinear, Embedding with
scale_grad_by_freq, EmbeddingBag in every mode and both input forms clip exactly like a
float64 per-sample oracle, under both strategies and a sweep of the clipping options.

Each model holds several layers, so one compile covers many forms, and the option sweeps run
the rewritten graphs as Python (HOOKS.skip_inductor: the DP passes and the decomposed graph
exactly as Inductor gets them, without its C++ compile, minutes on CI's 2 cores); the
Poisson test runs the new layers through Inductor. The clipping bound is the median
per-sample norm: some samples are clipped, some not.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dpcompile
from dpcompile.tools.inspection import capture_graphs, report_of

TOL = 1e-5
B = 6
GAMMA = 0.05


class Convolutions(nn.Module):
    """Padding forms (int, tuple, 'valid', 'same' with an even kernel, reflect, replicate),
    stride, dilation, groups, output padding, 1/2/3-D, transposed. The replicate-padded layer
    reads an input: behind another layer Inductor itself fails on replication_pad2d's backward
    (a stride mismatch of its fallback kernel; plain torch.compile too, torch 2.13)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 4, padding="same", dilation=2)                         # asymmetric same
        self.c1r = nn.Conv1d(4, 4, 3, padding=2, padding_mode="reflect", groups=2)
        self.t1 = nn.ConvTranspose1d(4, 2, 3, stride=2, output_padding=1, dilation=2, groups=2)
        self.c2 = nn.Conv2d(2, 4, 3, padding=(1, 2), padding_mode="replicate", stride=(1, 2), groups=2)
        self.t2 = nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1, output_padding=1)
        self.c3 = nn.Conv3d(2, 4, 2, padding="valid", stride=(2, 1, 1), groups=2)
        self.t3 = nn.ConvTranspose3d(4, 2, 2, stride=(1, 2, 1), dilation=(2, 1, 1), bias=False)
        self.head = nn.Linear(2 + 2 + 2, 3)

    def forward(self, seq, img, vol):
        a = self.t1(torch.tanh(self.c1r(torch.tanh(self.c1(seq)))))
        b = self.t2(torch.tanh(self.c2(img)))
        c = self.t3(torch.tanh(self.c3(vol)))
        pooled = [torch.tanh(z).flatten(2).mean(2) for z in (a, b, c)]
        return self.head(torch.cat(pooled, 1))

    @staticmethod
    def batch(n):
        return torch.randn(n, 2, 9), torch.randn(n, 2, 5, 7), torch.randn(n, 2, 4, 5, 4)


class Mixed(nn.Module):
    """nn.Bilinear on (B, T, d) rows, Embedding with scale_grad_by_freq (and padding_idx),
    and advanced indexing along a feature dim (its backward is an index_put)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 5, scale_grad_by_freq=True, padding_idx=0)
        self.bil = nn.Bilinear(5, 5, 4)
        self.register_buffer("perm", torch.tensor([3, 1, 0, 2, 3]))
        self.head = nn.Linear(4, 3)

    def forward(self, tokens):
        e = self.emb(tokens)                                  # (B, T, 5)
        h = self.bil(torch.tanh(e), torch.tanh(e[:, :, self.perm]))
        return self.head(torch.tanh(h).mean(1))

    @staticmethod
    def batch(n):
        tokens = torch.randint(0, 11, (n, 7))
        tokens[:, :3] = tokens[:, 3:4]  # repeated tokens: per-sample counts matter
        tokens[0, -2:] = 0
        return (tokens,)


class Bags(nn.Module):
    """EmbeddingBag on 2-D (batch, length) inputs: sum with per-sample weights computed by a
    layer, mean and max with padding_idx, and samples owning several bags."""

    def __init__(self):
        super().__init__()
        self.weigh = nn.Linear(1, 1)
        self.sum = nn.EmbeddingBag(13, 4, mode="sum", padding_idx=2)
        self.mean = nn.EmbeddingBag(13, 4, mode="mean", padding_idx=0)
        self.max = nn.EmbeddingBag(13, 4, mode="max")
        self.fields = nn.EmbeddingBag(13, 3, mode="mean")
        self.head = nn.Linear(4 * 3 + 3 * 2, 3)

    def forward(self, tokens, field_tokens):
        w = torch.sigmoid(self.weigh(tokens.unsqueeze(-1).to(self.weigh.weight.dtype) / 13)).squeeze(-1)
        bags = [self.sum(tokens, per_sample_weights=w), self.mean(tokens), self.max(tokens)]
        fields = self.fields(field_tokens.flatten(0, 1)).view(tokens.shape[0], -1)  # two bags per sample
        return self.head(torch.tanh(torch.cat(bags + [fields], 1)))

    @staticmethod
    def batch(n):
        tokens = torch.randint(0, 13, (n, 5))
        tokens[0] = 0  # an all-padding bag for mean
        tokens[1, :3] = 2
        tokens[2, 1:] = tokens[2, 0]
        return tokens, torch.randint(0, 13, (n, 2, 3))


class OffsetBags(nn.Module):
    """EmbeddingBag in offsets form: one bag per sample, of any length (empty too); the model
    reads a per-sample tensor first, which is where dpcompile takes the batch size from."""

    def __init__(self, mode="sum"):
        super().__init__()
        self.dense = nn.Linear(2, 3)
        self.bag = nn.EmbeddingBag(13, 4, mode=mode, padding_idx=1)
        self.head = nn.Linear(4, 3)

    def forward(self, dense, indices, offsets, weights=None):
        h = self.dense(dense)
        return h + self.head(torch.tanh(self.bag(indices, offsets, per_sample_weights=weights)))

    @staticmethod
    def ragged(n, weights=False):
        lengths = torch.randint(0, 5, (n,))
        lengths[:2] = torch.tensor([3, 0])
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
        indices = torch.randint(0, 13, (int(lengths.sum()),))
        indices[:2] = 1  # padding
        inputs = [torch.randn(n, 2), indices, offsets] + ([torch.rand(indices.shape[0])] if weights else [])
        return inputs, lengths


# ----------------------------------------------------------------------------- oracle

def _as_double(x):
    return x.double() if x.is_floating_point() else x


def oracle(model, samples, y, R, clipping):
    """(Σ_b C_b g_b in float64, the norms ‖g_b‖, R), g_b the gradient of sample b's own loss, by
    a loop over samples (ragged inputs included); samples(b) gives sample b's inputs as a batch
    of one. R=None: the median norm."""
    model64 = copy.deepcopy(model).double()
    params = [(k, p) for k, p in model64.named_parameters() if p.requires_grad]
    grads = []
    for b in range(y.shape[0]):
        out = model64(*[_as_double(x) for x in samples(b)])
        loss = F.cross_entropy(out, y[b:b + 1])
        grads.append(torch.autograd.grad(loss, [p for _, p in params]))
    norms = torch.stack([torch.cat([g.flatten() for g in gs]).norm() for gs in grads])
    R = float(norms.median()) if R is None else R
    if clipping == "automatic":
        factors = R / (norms + GAMMA)
    else:
        factors = (R / (norms + 1e-6)).clamp(max=1.0)
    clipped = {k: sum(f * gs[i] for f, gs in zip(factors, grads)) for i, (k, _) in enumerate(params)}
    return clipped, norms, R


def private_grads(model, inputs, y, R, strategy, clipping, reduction):
    options = {"noise_multiplier": 0.0, "max_grad_norm": R, "strategy": strategy, "clipping": clipping,
               "automatic_gamma": GAMMA, "loss_reduction": reduction}
    compiled = torch.compile(model, backend="dp", options=options)
    model.zero_grad(set_to_none=True)
    with capture_graphs(snapshots=False, skip_inductor=True):
        F.cross_entropy(compiled(*inputs), y, reduction=reduction).backward()
    return {k: p.grad.double() * y.shape[0] for k, p in model.named_parameters() if p.grad is not None}


def assert_clips_like_the_oracle(model, inputs, samples, y, strategy, clipping, reduction):
    want, norms, R = oracle(model, samples, y, None, clipping)
    assert (norms > R).any() and (norms < R).any()  # the median bound: some samples clipped, some not
    got = private_grads(model, inputs, y, R, strategy, clipping, reduction)
    for name, ref in want.items():
        err = float((got[name] - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
        assert err < TOL, f"{name}: relative error {err:.2e}"
    state = dpcompile.privacy_state(model)
    torch.testing.assert_close(state.last_sample_norms.double(), norms, rtol=1e-4, atol=1e-7)
    return {row.param: (row.kind, row.strategy) for row in report_of(model).table()}


def batched(inputs):
    return lambda b: [x[b:b + 1] for x in inputs]


STRATEGIES = ["ghost", "instantiate"]
# (strategy, clipping, loss reduction): every value of every option on every model.
CONFIGS = [("ghost", "flat", "mean"), ("instantiate", "automatic", "sum")]
# Sites with a ghost norm take it when asked; convolutions, biases and samples owning several
# bags have none and are instantiated.
GHOST_KINDS = ("linear", "bilinear", "embedding", "embedding_bag")
NO_GHOST = ("fields.weight",)


def assert_plan(plan: dict, strategy: str) -> None:
    for name, (kind, chosen) in plan.items():
        ghost = strategy == "ghost" and kind in GHOST_KINDS and name not in NO_GHOST
        assert chosen == ("ghost" if ghost else "instantiate"), (name, kind, chosen)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


COVERS = {  # for the README's supported-layers table (docs/layer_table.py)
    Convolutions: ("nn.Conv1d (same, reflect, dilated, grouped)", "nn.Conv2d (replicate, strided)",
                   "nn.Conv3d (valid)", "nn.ConvTranspose1d", "nn.ConvTranspose2d", "nn.ConvTranspose3d"),
    Mixed: ("nn.Bilinear", "nn.Embedding (scale_grad_by_freq, padding_idx)", "advanced indexing of a feature dim"),
    Bags: ("nn.EmbeddingBag (sum with per_sample_weights, mean, max, padding_idx, 2-D input)",),
}


@pytest.mark.parametrize("strategy,clipping,reduction", CONFIGS)
@pytest.mark.parametrize("cls", [pytest.param(c, marks=pytest.mark.covers(*COVERS[c]), id=c.__name__)
                                 for c in (Convolutions, Mixed, Bags)])
def test_layers_clip_like_the_oracle(cls, strategy, clipping, reduction):
    torch.manual_seed(0)
    model = cls()
    inputs, y = list(cls.batch(B)), torch.randint(0, 3, (B,))
    assert_plan(assert_clips_like_the_oracle(model, inputs, batched(inputs), y, strategy, clipping, reduction),
                strategy)


@pytest.mark.parametrize("mode,weights,config", [("sum", True, CONFIGS[0]), ("max", False, CONFIGS[1]),
                                                ("mean", False, ("ghost", "automatic", "sum"))])
@pytest.mark.covers("nn.EmbeddingBag (offsets form)")
def test_embedding_bag_offsets_form_clips_like_the_oracle(mode, weights, config):
    torch.manual_seed(1)
    model = OffsetBags(mode)
    inputs, lengths = OffsetBags.ragged(B, weights)
    ends = inputs[2] + lengths

    def sample(b):
        own = slice(int(inputs[2][b]), int(ends[b]))
        return [inputs[0][b:b + 1], inputs[1][own], torch.zeros(1, dtype=torch.long)] + \
            ([inputs[3][own]] if weights else [])

    plan = assert_clips_like_the_oracle(model, inputs, sample, torch.randint(0, 3, (B,)), *config)
    assert_plan(plan, config[0])


@pytest.mark.parametrize("graph_break", [False, True])
def test_padding_rows_get_no_noise_and_stay_put(graph_break):
    """Every sample's gradient is zero on a padding_idx row: released as exact zeros, without
    noise (those rows are fixed by the model, not the data: sensitivity 0); also when a graph
    break makes the runtime clip and noise after the whole backward."""
    torch.manual_seed(2)

    class Padded(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.bag = nn.Embedding(9, 4, padding_idx=3), nn.EmbeddingBag(9, 4, padding_idx=5)
            self.head = nn.Linear(8, 3)

        def forward(self, tokens):
            features = torch.cat([self.emb(tokens).mean(1), self.bag(tokens)], 1)
            if graph_break:
                torch._dynamo.graph_break()
            return self.head(features)

    for strategy in STRATEGIES:
        model = Padded()
        before = {k: p.detach().clone() for k, p in model.named_parameters()}
        compiled = torch.compile(model, backend="dp", options={"noise_multiplier": 1.0, "strategy": strategy})
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(2):
            tokens = torch.randint(0, 9, (B, 5))
            optimizer.zero_grad()
            with capture_graphs(snapshots=False, skip_inductor=True):
                F.cross_entropy(compiled(tokens), torch.randint(0, 3, (B,))).backward()
            optimizer.step()
        for name, row in (("emb.weight", 3), ("bag.weight", 5)):
            moved = (model.get_parameter(name).detach() - before[name]).abs().sum(1)
            assert moved[row] == 0 and (moved[torch.arange(9) != row] > 0).all(), (strategy, name, moved)
        torch._dynamo.reset()


def test_poisson_batch_sizes_keep_the_new_layers_exact():
    """Symbolic batch sizes (and a one-sample batch) through the conv formula, the padding
    index rules, the bag helpers and the bilinear site."""
    torch.manual_seed(3)

    class Small(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(1, 2, 3, padding=1, padding_mode="reflect")
            self.up = nn.ConvTranspose1d(2, 2, 2, stride=2)
            self.bag = nn.EmbeddingBag(7, 3, mode="mean", padding_idx=0)
            self.bil = nn.Bilinear(2, 3, 3)

        def forward(self, seq, tokens):
            h = self.up(torch.tanh(self.conv(seq))).mean(2)
            return self.bil(torch.tanh(h), torch.tanh(self.bag(tokens)))

    model = Small()
    compiled = torch.compile(model, backend="dp", options={"noise_multiplier": 0.0, "max_grad_norm": 0.1})
    for size in (4, 1, 3):
        inputs, y = [torch.randn(size, 1, 6), torch.randint(0, 7, (size, 4))], torch.randint(0, 3, (size,))
        if size > 1:
            for x in inputs:
                torch._dynamo.mark_dynamic(x, 0)
        model.zero_grad(set_to_none=True)
        F.cross_entropy(compiled(*inputs), y).backward()
        want, _, _ = oracle(model, batched(inputs), y, 0.1, "flat")
        for name, ref in want.items():
            err = float((model.get_parameter(name).grad.double() * size - ref).abs().max() / ref.abs().max())
            assert err < TOL, f"{name} at batch size {size}: relative error {err:.2e}"


# ----------------------------------------------------------------------------- refusals

def _refusal(model, *inputs) -> str:
    compiled = torch.compile(model, backend="dp", options={"noise_multiplier": 0.0})
    with pytest.raises(dpcompile.DPCompileError) as info:
        compiled(*inputs).pow(2).mean().backward()
    return str(info.value)


def test_offsets_read_before_any_per_sample_tensor_are_refused_with_the_fix():
    """bag(indices, offsets) as the first read: the batch size would be the number of indices."""
    bag = nn.EmbeddingBag(9, 3)
    text = _refusal(bag, torch.randint(0, 9, (10,)), torch.tensor([0, 4, 7]))
    assert "EmbeddingBag" in text and "first tensor input the model reads" in text and "padding_idx" in text


def test_offsets_used_outside_the_embedding_bag_are_refused():
    """offsets[b] is the total length of the samples before b: as a feature it would leak them."""

    class Leaky(OffsetBags):
        def forward(self, dense, indices, offsets, weights=None):
            return super().forward(dense, indices, offsets) + offsets.unsqueeze(1).float()

    inputs, _ = OffsetBags.ragged(B)
    text = _refusal(Leaky(), *inputs)
    assert "offsets form" in text and "offsets.unsqueeze(1)" in text  # the op's source line


@pytest.mark.covers("nn.EmbeddingBag (scale_grad_by_freq)", status="refused")
def test_embedding_bag_scale_grad_by_freq_is_refused():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bag = nn.EmbeddingBag(9, 3, scale_grad_by_freq=True)

        def forward(self, tokens):
            return self.bag(tokens)

    text = _refusal(Net(), torch.randint(0, 9, (B, 4)))
    assert "scale_grad_by_freq" in text and "EmbeddingBag" in text


def test_embedding_bag_offsets_with_last_offset_are_refused():
    """include_last_offset: the offsets no longer hold one bag per sample."""

    class Net(OffsetBags):
        def __init__(self):
            super().__init__()
            self.bag = nn.EmbeddingBag(13, 4, include_last_offset=True)

        def forward(self, dense, indices, offsets, weights=None):
            bags = torch.cat([self.bag(indices, offsets), torch.zeros(1, 4)])
            return self.dense(dense) + self.head(bags)

    inputs, _ = OffsetBags.ragged(B)
    text = _refusal(Net(), *inputs)
    assert "include_last_offset" in text
