"""Hand-written GPU kernels that the rewritten backward graphs call (Triton, CUDA only).

One kernel so far: the clipped, noised sum of per-sample values,

    out = Σ_b w_b · x_b + std · z        (float32 accumulation, stored in out's dtype),

the last step of every instantiated gradient (and of the packed small gradients). Written
as a reduction over the short batch dim, Inductor either emitted a slow persistent
reduction (~1 TB/s on an H200) or, unrolled, one kernel per layer shape whose code
generation cost seconds of compile time; this kernel is one source for every layer, batch
size (symbolic included) and dtype, reads each per-sample value once and adds the noise
in the same pass. The backward re-trace (`compiler.backend._decompose`) puts it into the graph
through `torch.library.wrap_triton`, so Inductor launches it from its generated code.

`enabled()` is true only inside `use_triton(True)` (the re-trace) and with Triton
installed; everywhere else (CPU, exported graphs, the eager graph-break path) the callers
use the plain torch formula in `per_sample.weighted_sum`.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch formula is used
    triton = None

_state = threading.local()
BLOCK = 1024


@contextlib.contextmanager
def use_triton(on: bool) -> Iterator[None]:
    """Let `per_sample.weighted_sum` call the Triton kernel on CUDA tensors while tracing."""
    saved = getattr(_state, "on", False)
    _state.on = on and triton is not None
    try:
        yield
    finally:
        _state.on = saved


def enabled(x: torch.Tensor) -> bool:
    return getattr(_state, "on", False) and x.device.type == "cuda"


def weighted_sum(weights: torch.Tensor, values: torch.Tensor, dtype: torch.dtype,
                 noise: torch.Tensor | None, std: torch.Tensor | None) -> torch.Tensor:
    """Σ_b weights[b]·values[b] (+ std·noise), shaped like values[0], in `dtype`.

    values: (B, ...) per-sample values; noise: float32, one entry per output entry; std: a
    0-d float32 tensor."""
    from torch.library import wrap_triton

    out, grid, args = launch_arguments(weights, values, dtype, noise, std)
    wrap_triton(_weighted_sum_kernel)[grid](*args, HAS_NOISE=noise is not None, BLOCK=BLOCK)
    return out


def launch_arguments(weights, values, dtype, noise, std) -> tuple[torch.Tensor, tuple, tuple]:
    """(output, grid, positional arguments) of one `_weighted_sum_kernel` launch."""
    batch = values.shape[0]
    rows = values.reshape(batch, -1)  # a view for the per-sample GEMM outputs and the packs
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    out = torch.empty(values.shape[1:], dtype=dtype, device=values.device)
    if noise is None:  # placeholders the kernel never reads
        noise = std = weights
    numel = rows.shape[1]
    return out, (triton.cdiv(numel, BLOCK),), (rows, weights, noise, std, out, batch, rows.stride(0), numel)


if triton is not None:
    @triton.jit
    def _weighted_sum_kernel(values, weights, noise, std, out, batch, row_stride, numel,
                             HAS_NOISE: tl.constexpr, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < numel
        rows = values + offsets  # pointer arithmetic is 64-bit: no overflow past 2³¹ entries
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for b in range(batch):  # in sample order: the same sum every run
            w = tl.load(weights + b).to(tl.float32)
            acc += w * tl.load(rows, mask=mask, other=0.0).to(tl.float32)
            rows += row_stride
        if HAS_NOISE:
            acc += tl.load(std).to(tl.float32) * tl.load(noise + offsets, mask=mask, other=0.0)
        tl.store(out + offsets, acc.to(out.dtype.element_ty), mask=mask)
