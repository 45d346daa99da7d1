"""Stock recurrent layers (nn.RNN, nn.GRU, nn.LSTM) as explicit per-step cell ops.

Dynamo traces them (with ``allow_rnn``, which the dp compile turns on) into one call of
``torch.lstm`` / ``torch.gru`` / ``torch.rnn_tanh`` / ``torch.rnn_relu``. Their aten kernels
are decomposed by torch's own Python implementations, registered on the Autograd key (a
decomposition table cannot replace them), into ops the DP passes have no rule for (CPU LSTM:
``mkldnn_rnn_layer``) or that concatenate along the batch. ``rewrite_calls`` points those graph
nodes at the functions below instead, written with the same signatures in ordinary ops: one
input projection over all steps (a linear site of T·B rows), then per step a GEMM with the
hidden state and the gates. AOT traces them like user code, so CPU and GPU get the same graph.

Packed sequences: inside a dp call (`packed_sequences`), ``torch.nn.utils.rnn.pack_padded_sequence``
keeps the padded batch and the lengths (a `PaddedPack`), the stock layers run it as the same
cell steps with a mask (a sample past its length keeps its state and outputs zeros: what the
packed kernels compute), and ``pad_packed_sequence`` returns the padded output. Real packing
reorders the rows of all samples into one flat tensor, which no per-sample rule can follow.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator, NamedTuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.rnn as rnn_utils

from ..errors import DPCompileError, describe_node


def _rnn_cell(act: Callable) -> Callable:
    def cell(gx, h, state, w_hh, b_hh):
        return act(gx + F.linear(h, w_hh, b_hh)), None
    return cell


def _gru_cell(gx, h, state, w_hh, b_hh):
    r_x, z_x, n_x = gx.chunk(3, -1)
    r_h, z_h, n_h = F.linear(h, w_hh, b_hh).chunk(3, -1)
    r, z = torch.sigmoid(r_x + r_h), torch.sigmoid(z_x + z_h)
    n = torch.tanh(n_x + r * n_h)
    return (1 - z) * n + z * h, None


def _lstm_cell(w_hr):
    def cell(gx, h, c, w_hh, b_hh):
        i, f, g, o = (gx + F.linear(h, w_hh, b_hh)).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return (h if w_hr is None else F.linear(h, w_hr)), c
    return cell


def _direction(x, h, c, weights, has_biases, reverse, batch_first, make_cell, mask=None):
    """One layer in one direction: x (T, B, I) or (B, T, I) -> (outputs in time order, h_T, c_T).

    `mask` (T, B, 1), time-major x only: False past a sample's length (packed sequences)."""
    w_ih, w_hh = weights[0], weights[1]
    b_ih, b_hh = (weights[2], weights[3]) if has_biases else (None, None)
    extra = weights[4 if has_biases else 2:]
    cell = make_cell(extra[0] if extra else None) if make_cell is _lstm_cell else make_cell
    gx = F.linear(x, w_ih, b_ih)  # all steps at once
    time_dim = 1 if batch_first else 0
    steps = range(gx.shape[time_dim])
    outs = []
    for t in (reversed(steps) if reverse else steps):
        h_t, c_t = cell(gx.select(time_dim, t), h, c, w_hh, b_hh)
        if mask is not None:  # past its length a sample keeps its state and outputs zeros
            h_t, c_t = torch.where(mask[t], h_t, h), (None if c is None else torch.where(mask[t], c_t, c))
            outs.append(torch.where(mask[t], h_t, 0.0))
        else:
            outs.append(h_t)
        h, c = h_t, c_t
    if reverse:
        outs.reverse()
    return _stack(outs, time_dim), h, c


def _run(x, h0, c0, params, has_biases, num_layers, dropout, train, bidirectional, batch_first, make_cell,
         mask=None):
    dirs = 2 if bidirectional else 1
    per = len(params) // (num_layers * dirs)
    h_n, c_n = [], []
    for layer in range(num_layers):
        outs = []
        for d in range(dirs):
            k = layer * dirs + d
            out, h, c = _direction(x, h0[k], None if c0 is None else c0[k], params[k * per:(k + 1) * per],
                                   has_biases, d == 1, batch_first, make_cell, mask)
            outs.append(out)
            h_n.append(h)
            c_n.append(c)
        x = torch.cat(outs, -1) if dirs == 2 else outs[0]
        if dropout and train and layer < num_layers - 1:
            x = F.dropout(x, dropout, True)
    return x, _stack(h_n, 0), (_stack(c_n, 0) if c0 is not None else None)


def _stack(tensors, dim):
    """torch.stack as cat of unsqueezed tensors: the decomposed stack concatenates along the samples'
    dim and then views, which batch_dim rightly cannot follow."""
    return torch.cat([t.unsqueeze(dim) for t in tensors], dim)


def lstm(x, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first):
    out, h, c = _run(x, hx[0], hx[1], params, has_biases, num_layers, dropout, train, bidirectional,
                     batch_first, _lstm_cell)
    return out, h, c


def gru(x, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first):
    out, h, _ = _run(x, hx, None, params, has_biases, num_layers, dropout, train, bidirectional, batch_first,
                     _gru_cell)
    return out, h


def _plain(act: Callable) -> Callable:
    make_cell = _rnn_cell(act)

    def rnn(x, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first):
        out, h, _ = _run(x, hx, None, params, has_biases, num_layers, dropout, train, bidirectional,
                         batch_first, make_cell)
        return out, h
    return rnn


REPLACEMENTS = {"lstm": lstm, "gru": gru, "rnn_tanh": _plain(torch.tanh), "rnn_relu": _plain(torch.relu)}
_TORCH_OPS = {getattr(torch._C._VariableFunctions, name): name for name in REPLACEMENTS}


def rewrite_calls(gm: fx.GraphModule) -> None:
    """Point Dynamo's recurrent-layer calls at the cell-level functions above."""
    changed = False
    for node in gm.graph.nodes:
        name = _TORCH_OPS.get(node.target) if node.op == "call_function" else None
        if name is None:
            continue
        if node.kwargs or len(node.args) != 9 or not isinstance(node.args[2], (list, tuple)):
            raise _packed(node)  # the .data overload: (data, batch_sizes, hx, params, ...)
        node.target = REPLACEMENTS[name]
        changed = True
    if changed:
        gm.recompile()


def _packed(node: fx.Node) -> DPCompileError:
    return DPCompileError(
        f"dpcompile: {describe_node(node)} runs a recurrent layer on packed rows (a PackedSequence made outside "
        "dpcompile's reach), which mix all samples in one tensor, so it is refused. Fix: call "
        "torch.nn.utils.rnn.pack_padded_sequence inside the compiled model, or pass the padded batch.")


class PaddedPack(NamedTuple):
    """A packed sequence inside a dp call: the padded batch, time-major (T, B, *), and each sample's length."""

    padded: torch.Tensor
    lengths: torch.Tensor


def pack_padded_sequence(input: torch.Tensor, lengths, batch_first: bool = False,
                         enforce_sorted: bool = True) -> PaddedPack:
    """torch.nn.utils.rnn.pack_padded_sequence inside a dp call (order and sorting need not change)."""
    lengths = torch.as_tensor(lengths).to(input.device)
    return PaddedPack(input.transpose(0, 1) if batch_first else input, lengths)


def pad_packed_sequence(sequence, batch_first: bool = False, padding_value: float = 0.0,
                        total_length: int | None = None):
    """(padded output, lengths). The output keeps the input's T steps (torch: the longest length's)."""
    if not isinstance(sequence, PaddedPack):
        return _ORIGINAL["pad_packed_sequence"](sequence, batch_first, padding_value, total_length)
    out = sequence.padded
    if padding_value != 0.0:
        out = torch.where(_mask(out, sequence.lengths), out, padding_value)
    if total_length is not None and total_length > out.shape[0]:
        out = F.pad(out, [0, 0] * (out.dim() - 1) + [0, total_length - out.shape[0]], value=padding_value)
    return (out.transpose(0, 1) if batch_first else out), sequence.lengths


def _mask(padded: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    steps = torch.arange(padded.shape[0], device=padded.device)
    return (steps.unsqueeze(1) < lengths.unsqueeze(0)).unsqueeze(-1)  # (T, B, 1)


_CELLS = {"LSTM": _lstm_cell, "GRU": _gru_cell, "RNN_TANH": _rnn_cell(torch.tanh), "RNN_RELU": _rnn_cell(torch.relu)}


def _packed_forward(layer: nn.RNNBase, pack: PaddedPack, hx):
    x, lstm = pack.padded, layer.mode == "LSTM"
    if hx is None:
        states = layer.num_layers * (2 if layer.bidirectional else 1)
        out_size = layer.proj_size if lstm and layer.proj_size > 0 else layer.hidden_size
        h0 = x.new_zeros(states, x.shape[1], out_size)
        c0 = x.new_zeros(states, x.shape[1], layer.hidden_size) if lstm else None
    else:
        h0, c0 = hx if lstm else (hx, None)
    out, h, c = _run(x, h0, c0, layer._flat_weights, layer.bias, layer.num_layers, layer.dropout, layer.training,
                     layer.bidirectional, False, _CELLS[layer.mode], _mask(x, pack.lengths))
    return PaddedPack(out, pack.lengths), ((h, c) if lstm else h)


def _layer_forward(original: Callable) -> Callable:
    def forward(self, input, hx=None):
        if isinstance(input, PaddedPack):
            return _packed_forward(self, input, hx)
        if isinstance(input, rnn_utils.PackedSequence):
            raise DPCompileError(
                f"dpcompile: {type(self).__name__} got a PackedSequence packed where dpcompile could not keep the "
                "batch padded (pack_padded_sequence imported by name, or packed outside the compiled model); its rows "
                "mix all samples, so it is refused. Fix: call it as torch.nn.utils.rnn.pack_padded_sequence(...) "
                "inside the compiled model, or pass the padded batch.")
        return original(self, input, hx)
    return forward


_ORIGINAL = {"pack_padded_sequence": rnn_utils.pack_padded_sequence,
             "pad_packed_sequence": rnn_utils.pad_packed_sequence}
_FORWARDS = {cls: cls.forward for cls in (nn.RNN, nn.GRU, nn.LSTM)}
_PATCHED = {cls: _layer_forward(original) for cls, original in _FORWARDS.items()}  # one object: stable guards
_ACTIVE = [0]  # dp calls in progress, all threads: the patches stay until the last one ends
_LOCK = threading.Lock()


@contextlib.contextmanager
def packed_sequences() -> Iterator[None]:
    """During a dp call: torch.nn.utils.rnn's packing keeps the padded batch, and the stock layers run it.

    Process-wide while it lasts (nested dp calls keep it on); outside dp calls torch's own
    functions are back, so other compiled or eager models are unaffected."""
    with _LOCK:
        _ACTIVE[0] += 1
        if _ACTIVE[0] == 1:
            rnn_utils.pack_padded_sequence, rnn_utils.pad_packed_sequence = pack_padded_sequence, pad_packed_sequence
            for cls, original in _FORWARDS.items():
                cls.forward = _PATCHED[cls]
    try:
        yield
    finally:
        with _LOCK:
            _ACTIVE[0] -= 1
            if _ACTIVE[0] == 0:
                rnn_utils.pack_padded_sequence = _ORIGINAL["pack_padded_sequence"]
                rnn_utils.pad_packed_sequence = _ORIGINAL["pad_packed_sequence"]
                for cls, original in _FORWARDS.items():
                    cls.forward = original
