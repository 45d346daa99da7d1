"""Stock recurrent layers (nn.RNN, nn.GRU, nn.LSTM) as explicit per-step cell ops.

Dynamo traces them (with ``allow_rnn``, which the dp compile turns on) into one call of
``torch.lstm`` / ``torch.gru`` / ``torch.rnn_tanh`` / ``torch.rnn_relu``. Their aten kernels
are decomposed by torch's own Python implementations, registered on the Autograd key (a
decomposition table cannot replace them), into ops the DP passes have no rule for (CPU LSTM:
``mkldnn_rnn_layer``) or that concatenate along the batch. ``rewrite_calls`` points those graph
nodes at the functions below instead, written with the same signatures in ordinary ops: one
input projection over all steps (a linear site of T·B rows), then per step a GEMM with the
hidden state and the gates. AOT traces them like user code, so CPU and GPU get the same graph.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

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


def _direction(x, h, c, weights, has_biases, reverse, batch_first, make_cell):
    """One layer in one direction: x (T, B, I) or (B, T, I) -> (outputs in time order, h_T, c_T)."""
    w_ih, w_hh = weights[0], weights[1]
    b_ih, b_hh = (weights[2], weights[3]) if has_biases else (None, None)
    extra = weights[4 if has_biases else 2:]
    cell = make_cell(extra[0] if extra else None) if make_cell is _lstm_cell else make_cell
    gx = F.linear(x, w_ih, b_ih)  # all steps at once
    time_dim = 1 if batch_first else 0
    steps = range(gx.shape[time_dim])
    outs = []
    for t in (reversed(steps) if reverse else steps):
        h, c = cell(gx.select(time_dim, t), h, c, w_hh, b_hh)
        outs.append(h)
    if reverse:
        outs.reverse()
    return _stack(outs, time_dim), h, c


def _run(x, h0, c0, params, has_biases, num_layers, dropout, train, bidirectional, batch_first, make_cell):
    dirs = 2 if bidirectional else 1
    per = len(params) // (num_layers * dirs)
    h_n, c_n = [], []
    for layer in range(num_layers):
        outs = []
        for d in range(dirs):
            k = layer * dirs + d
            out, h, c = _direction(x, h0[k], None if c0 is None else c0[k], params[k * per:(k + 1) * per],
                                   has_biases, d == 1, batch_first, make_cell)
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
        f"dpcompile: {describe_node(node)} runs a recurrent layer on a PackedSequence, which dpcompile does not "
        "split per sample yet, so it is refused. Fix: pass a padded batch (and mask the loss) instead of "
        "pack_padded_sequence.")
