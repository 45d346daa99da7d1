"""Recurrent layers (issue 22): stock nn.RNN / nn.GRU / nn.LSTM and a user-written cell RNN with a
zero initial state clip exactly like a float64 per-sample oracle (a loop over samples of a deep
copy). The rewritten graphs run as Python (HOOKS.skip_inductor), which keeps the file fast."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dpcompile
from dpcompile.tools.inspection import capture_graphs

B, T, D_IN, HIDDEN, CLASSES = 6, 4, 3, 5, 3


class Stock(nn.Module):
    """A recurrent layer, then a linear head on the last step's output."""

    def __init__(self, cls, num_layers, bidirectional, batch_first, **kw):
        super().__init__()
        self.batch_first = batch_first
        self.rnn = cls(D_IN, HIDDEN, num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first, **kw)
        self.head = nn.Linear(HIDDEN * (2 if bidirectional else 1), CLASSES)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.head(y[:, -1] if self.batch_first else y[-1])


class CellRNN(nn.Module):
    """A hand-written Elman RNN whose initial state is a zero tensor (sample-independent)."""

    def __init__(self):
        super().__init__()
        self.inp, self.rec, self.head = nn.Linear(D_IN, HIDDEN), nn.Linear(HIDDEN, HIDDEN), nn.Linear(HIDDEN, CLASSES)

    def forward(self, x):
        h = x.new_zeros(x.shape[0], HIDDEN)
        for t in range(x.shape[1]):
            h = torch.tanh(self.inp(x[:, t]) + self.rec(h))
        return self.head(h)


def oracle(model, x, y, sample_dim, extra=()):
    """(Σ_b C_b g_b in float64 with R the median per-sample norm, the norms, R); `extra` inputs
    (e.g. lengths) are cut per sample on dim 0."""
    model64 = copy.deepcopy(model).double()
    params = [(k, p) for k, p in model64.named_parameters()]
    grads = []
    for b in range(y.shape[0]):
        xb = x.double().narrow(sample_dim, b, 1)
        out = model64(xb, *[e[b:b + 1] for e in extra])
        grads.append(torch.autograd.grad(F.cross_entropy(out, y[b:b + 1]), [p for _, p in params]))
    norms = torch.stack([torch.cat([g.flatten() for g in gs]).norm() for gs in grads])
    R = float(norms.median())
    factors = (R / (norms + 1e-6)).clamp(max=1.0)
    return {k: sum(f * gs[i] for f, gs in zip(factors, grads)) for i, (k, _) in enumerate(params)}, norms, R


def assert_clips_exactly(model, x, y, strategy, sample_dim=0, extra=()):
    want, norms, R = oracle(model, x, y, sample_dim, extra)
    assert (norms > R).any() and (norms < R).any()  # the median bound: some samples clipped, some not
    options = {"noise_multiplier": 0.0, "max_grad_norm": R, "strategy": strategy, "sample_dim": sample_dim}
    compiled = torch.compile(model, backend="dp", options=options)
    with capture_graphs(snapshots=False, skip_inductor=True):
        F.cross_entropy(compiled(x, *extra), y).backward()
    for name, ref in want.items():
        got = model.get_parameter(name).grad
        assert got is not None, name
        got = got.double() * y.shape[0]
        err = float((got - ref).abs().max() / ref.abs().max().clamp(min=1e-12))
        assert err < 1e-4, (name, err)


CONFIGS = [  # (num_layers, bidirectional, batch_first): each option both ways
    (1, False, True), (2, True, False), (2, False, True), (1, True, False),
]
STRATEGIES = ["ghost", "instantiate"]
# Half of the grid: each layer kind runs every config, and every strategy, at least twice.
CASES = [(kind, *config, STRATEGIES[(i + j) % 2]) for j, kind in enumerate(["rnn_tanh", "rnn_relu", "gru", "lstm"])
         for i, config in enumerate(CONFIGS)]
LAYERS = {"rnn_tanh": (nn.RNN, {"nonlinearity": "tanh"}), "rnn_relu": (nn.RNN, {"nonlinearity": "relu"}),
          "gru": (nn.GRU, {}), "lstm": (nn.LSTM, {})}


SHAPES = "1-2 layers, bidirectional, batch-first and time-major"
COVERS = {"rnn_tanh": f"nn.RNN tanh ({SHAPES})", "rnn_relu": f"nn.RNN relu ({SHAPES})",
          "gru": f"nn.GRU ({SHAPES})", "lstm": f"nn.LSTM ({SHAPES})"}  # for docs/layer_table.py


@pytest.mark.parametrize("kind,layers,bidirectional,batch_first,strategy",
                         [pytest.param(*case, marks=pytest.mark.covers(COVERS[case[0]])) for case in CASES])
def test_stock_recurrent_layers_clip_exactly(kind, layers, bidirectional, batch_first, strategy):
    torch.manual_seed(0)
    cls, kw = LAYERS[kind]
    model = Stock(cls, layers, bidirectional, batch_first, **kw)
    x = torch.randn(B, T, D_IN) if batch_first else torch.randn(T, B, D_IN)
    y = torch.randint(0, CLASSES, (B,))
    assert_clips_exactly(model, x, y, strategy, sample_dim=0 if batch_first else 1)


@pytest.mark.covers("user-written cell RNN with a zero initial state")
@pytest.mark.parametrize("strategy", ["ghost", "instantiate"])
def test_cell_rnn_with_zero_initial_state(strategy):
    torch.manual_seed(1)
    assert_clips_exactly(CellRNN(), torch.randn(B, T, D_IN), torch.randint(0, CLASSES, (B,)), strategy)


def test_allow_rnn_is_only_on_inside_dp_calls():
    assert not torch._dynamo.config.allow_rnn


class Packed(nn.Module):
    """pack_padded_sequence (unsorted lengths) -> a stock layer -> pad_packed_sequence; the head reads
    the padded outputs' sum and the last layer's final state (each sample's state at its own end)."""

    def __init__(self, cls, num_layers, bidirectional, batch_first, **kw):
        super().__init__()
        self.batch_first, dirs = batch_first, 2 if bidirectional else 1
        self.rnn = cls(D_IN, HIDDEN, num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first, **kw)
        self.head = nn.Linear(HIDDEN * dirs * 2, CLASSES)

    def forward(self, x, lengths):
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=self.batch_first, enforce_sorted=False)
        out, h = self.rnn(packed)
        h = h[0] if isinstance(h, tuple) else h
        y, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=self.batch_first)
        last = h.view(self.rnn.num_layers, -1, *h.shape[1:])[-1]  # (dirs, B, H)
        return self.head(torch.cat([y.sum(1 if self.batch_first else 0), last.transpose(0, 1).flatten(1)], -1))


LENGTHS = torch.tensor([4, 3, 2, 4, 1, 2])  # unsorted, some samples full length
PACKED_CASES = [case for n, case in enumerate(CASES) if n % 4 in {n // 4 % 4, (n // 4 + 2) % 4}]  # 2 configs a kind


@pytest.mark.covers("packed sequences: pack_padded_sequence, RNN/GRU/LSTM, pad_packed_sequence (1-2 layers, "
                     "bidirectional, batch-first and time-major, unsorted lengths)")
@pytest.mark.parametrize("kind,layers,bidirectional,batch_first,strategy",
                         [(*case[:4], STRATEGIES[n % 2]) for n, case in enumerate(PACKED_CASES)])
def test_packed_sequences_clip_exactly(kind, layers, bidirectional, batch_first, strategy):
    """The oracle packs each sample alone with torch's own functions; the dp model keeps the batch
    padded and masks the steps past each length."""
    torch.manual_seed(2)
    cls, kw = LAYERS[kind]
    model = Packed(cls, layers, bidirectional, batch_first, **kw)
    x = torch.randn(B, T, D_IN) if batch_first else torch.randn(T, B, D_IN)
    assert_clips_exactly(model, x, torch.randint(0, CLASSES, (B,)), strategy, sample_dim=0 if batch_first else 1,
                         extra=(LENGTHS,))


def test_packing_is_torch_own_outside_dp_calls():
    assert nn.utils.rnn.pack_padded_sequence is torch.nn.utils.rnn.__dict__["pack_padded_sequence"]
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(B, T, D_IN), LENGTHS, batch_first=True,
                                               enforce_sorted=False)
    assert isinstance(packed, nn.utils.rnn.PackedSequence) and nn.GRU.forward.__module__ == "torch.nn.modules.rnn"


class PackedByName(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn, self.head = nn.GRU(D_IN, HIDDEN, batch_first=True), nn.Linear(HIDDEN, CLASSES)

    def forward(self, x, lengths):
        _, h = self.rnn(pack_by_name(x, lengths, batch_first=True, enforce_sorted=False))
        return self.head(h[-1])


pack_by_name = nn.utils.rnn.pack_padded_sequence  # bound at import: torch's own function, packed for real


@pytest.mark.covers("packed sequences made with a pack_padded_sequence imported by name", status="refused")
def test_packed_sequences_packed_for_real_are_refused():
    """Packing that dpcompile cannot keep padded (the function bound before the dp call) is refused
    with the fix, and nothing reaches p.grad."""
    model = PackedByName()
    compiled = torch.compile(model, backend="dp", options={"noise_multiplier": 0.0})
    with pytest.raises(dpcompile.DPCompileError, match="pack_padded_sequence"), \
            capture_graphs(snapshots=False, skip_inductor=True):
        F.cross_entropy(compiled(torch.randn(B, T, D_IN), LENGTHS), torch.zeros(B, dtype=torch.long)).backward()
    assert all(p.grad is None for p in model.parameters())


class MixesLengths(nn.Module):
    """Time-major input and a (B,) vector of lengths, mixed across the batch by its mean."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(D_IN, CLASSES)

    def forward(self, x, lengths):
        return self.head(x.sum(0)) * lengths.float().mean()


def test_a_per_sample_vector_next_to_time_major_inputs_is_per_sample():
    """With sample_dim=1, a (B,) input holds one value per sample (the lengths of a packed batch):
    a mean over it feeding every sample's output is refused, not taken as shared data."""
    model = MixesLengths()
    compiled = torch.compile(model, backend="dp", options={"noise_multiplier": 0.0, "sample_dim": 1})
    with pytest.raises(dpcompile.DPCompileError, match="aggregated over the batch"), \
            capture_graphs(snapshots=False, skip_inductor=True):
        F.cross_entropy(compiled(torch.randn(T, B, D_IN), LENGTHS), torch.zeros(B, dtype=torch.long)).backward()
    assert all(p.grad is None for p in model.parameters())
