"""The Triton kernel for Σ_b w_b x_b + std·z (dpcompile.privacy.kernels) against a float64 reference.

The CUDA tests need a GPU (run them there with DPCOMPILE_TEST_DEVICE=cuda or plainly on a GPU
machine); on CPU the fused formula and the fallback are tested."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from dpcompile.privacy import kernels, per_sample
from models import TinyGPT, batch_loss

CUDA = torch.cuda.is_available() and kernels.triton is not None
needs_cuda = pytest.mark.skipif(not CUDA, reason="the Triton kernel runs on CUDA GPUs only")


def reference(weights, values, noise=None, offset=0, std=None):
    summed = (weights.double().view([-1] + [1] * (values.dim() - 1)) * values.double()).sum(0)
    if noise is not None:
        summed = summed + float(std) * noise.double()[offset:offset + summed.numel()].view(summed.shape)
    return summed


def relative_error(got, want):
    return float((got.double() - want).abs().max() / want.abs().max())


def test_weighted_sum_with_noise_is_privatize_of_the_sum():
    """The fused node (`noise` pass) computes what privatize(weighted_sum(...)) computed before."""
    g = torch.Generator().manual_seed(int(torch.seed() % 2**31))
    weights, values = torch.rand(5, generator=g), torch.randn(5, 7, 3, generator=g)
    noise, std = torch.randn(40, generator=g), torch.tensor(0.3)
    fused = per_sample.weighted_sum(weights, values, torch.float32, noise, 4, std)
    separate = per_sample.privatize(per_sample.weighted_sum(weights, values, torch.float32), noise, 4, std)
    assert torch.allclose(fused, separate, rtol=1e-6, atol=1e-6)
    assert relative_error(fused, reference(weights, values, noise, 4, std)) < 1e-6


INTERPRETED = """
import torch
from dpcompile import kernels
from test_kernels import reference, relative_error
g = torch.Generator().manual_seed(int(torch.seed() % 2**31))
weights, noise, std = torch.rand(5, generator=g), torch.randn(3000, generator=g), torch.tensor(0.7)
for dtype, out_dtype in [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float16)]:
    values = torch.randn(5, 61, 37, generator=g).to(dtype).transpose(1, 2)  # strided: copied per sample
    for z in (noise[11:11 + 37 * 61], None):
        out, grid, args = kernels.launch_arguments(weights, values, out_dtype, z, std)
        kernels._weighted_sum_kernel[grid](*args, HAS_NOISE=z is not None, BLOCK=kernels.BLOCK)
        want = reference(weights, values, noise, 11, std) if z is not None else reference(weights, values)
        assert out.dtype == out_dtype and out.shape == (37, 61), (out.dtype, out.shape)
        err = relative_error(out, want)
        assert err < (1e-6 if out_dtype == torch.float32 else 1e-3), (dtype, out_dtype, z is None, err)
print("ok")
"""


def _interpreter_runs_int_loops() -> bool:
    """Triton 3.6's interpreter fails on a loop bounded by an int argument (seen on the GPU image);
    3.9's runs it."""
    version = tuple(int(v) for v in kernels.triton.__version__.split(".")[:2]) if kernels.triton else (0, 0)
    return version >= (3, 9)


@pytest.mark.skipif(not _interpreter_runs_int_loops(), reason="needs Triton >= 3.9 (pip install -e '.[test]' has it)")
def test_kernel_in_tritons_interpreter_matches_float64():
    """The kernel's own indexing, masking and casts, run on the CPU by Triton's interpreter
    (TRITON_INTERPRET must be set before Triton is imported: a fresh process)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True,
                          timeout=300, cwd=os.path.dirname(__file__), check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_cpu_tensors_keep_the_torch_formula_inside_use_triton():
    with kernels.use_triton(True):
        assert not kernels.enabled(torch.zeros(2))
    assert not kernels.enabled(torch.zeros(2))


@needs_cuda
@pytest.mark.parametrize("batch", [1, 5, 64])
@pytest.mark.parametrize("dtype,out_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                             (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16)])
def test_kernel_matches_float64(batch, dtype, out_dtype):
    g = torch.Generator(device="cuda").manual_seed(int(torch.seed() % 2**31))
    shape = (batch, 37, 61)  # 2257 entries per sample: not a multiple of the block
    weights = torch.rand(batch, device="cuda", generator=g)
    values = torch.randn(shape, device="cuda", generator=g).to(dtype)
    noise, std = torch.randn(3000, device="cuda", generator=g), torch.tensor(0.7, device="cuda")
    tol = 1e-6 if out_dtype == torch.float32 else 1e-2
    plain = kernels.weighted_sum(weights, values, out_dtype, None, None)
    assert plain.dtype == out_dtype and plain.shape == shape[1:]
    assert relative_error(plain, reference(weights, values)) < tol
    noisy = kernels.weighted_sum(weights, values, out_dtype, noise[11:11 + 37 * 61], std)
    assert relative_error(noisy, reference(weights, values, noise, 11, std)) < tol


@needs_cuda
def test_kernel_reads_strided_per_sample_values():
    g = torch.Generator(device="cuda").manual_seed(int(torch.seed() % 2**31))
    base = torch.randn(6, 50, 40, device="cuda", generator=g)
    weights = torch.rand(6, device="cuda", generator=g)
    for values in (base.transpose(1, 2), base[::2], base[:, 3:20]):  # transposed, every other sample, cropped
        got = kernels.weighted_sum(weights[:values.shape[0]], values, torch.float32, None, None)
        assert relative_error(got, reference(weights[:values.shape[0]], values)) < 1e-6


@needs_cuda
@pytest.mark.parametrize("dynamic", [False, True])
def test_compiled_step_uses_the_kernel_and_matches_the_reduction(dynamic):
    """Same seed, noise on: the private gradients with the kernel equal those of Inductor's
    reduction (triton_kernels=False), static and symbolic (Poisson) batch sizes."""
    from torch._inductor.utils import run_and_get_code

    def grads(triton_kernels):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = TinyGPT().cuda()
        x, y = TinyGPT.batch(6)
        x, y = x.cuda(), y.cuda()
        if dynamic:
            torch._dynamo.mark_dynamic(x, 0)
        compiled = torch.compile(model, backend="dp", options={
            "noise_multiplier": 1.0, "max_grad_norm": 0.1, "insecure_seed": 5, "strategy": "instantiate",
            "triton_kernels": triton_kernels})
        _, code = run_and_get_code(lambda: batch_loss(compiled(x), y).backward())
        return [p.grad.clone() for p in model.parameters()], "\n".join(code)

    with_kernel, code = grads(True)
    assert "_weighted_sum_kernel" in code
    without, code = grads(False)
    assert "_weighted_sum_kernel" not in code
    for a, b in zip(with_kernel, without):
        assert relative_error(a, b.double()) < 1e-5
