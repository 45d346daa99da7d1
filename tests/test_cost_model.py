"""The cost model's choices on GPT-2-small layer shapes (bf16), where the measured H200 profiles
of bench/step_time.py put the crossover between ghost norms and instantiation."""
import pytest

from dpcompile.compiler import cost_model
from dpcompile.options import DPOptions

BF16, FP32, BUDGET = 2, 4, 1024 * 2**20
DEFAULT_BUDGET = DPOptions().memory_budget_mb * 2**20


@pytest.mark.parametrize("rows,batch,want", [(256, 32, "ghost"), (1024, 8, "instantiate")])
def test_mlp_layer_switches_from_ghost_to_instantiation_as_sequences_grow(rows, batch, want):
    """768×3072: about n·m/(n+m) = 614 rows per sample separate the two (README, How it works)."""
    costs = cost_model.linear(rows, 768, 3072, BF16)
    assert cost_model.choose(costs, batch, "auto", BUDGET) == want


def test_instantiation_is_charged_for_memory_traffic_not_for_the_gemm_it_replaces():
    inst = cost_model.linear(1024, 768, 3072, BF16)["instantiate"]
    n_m = 768 * 3072
    assert inst.at(8) == (3 * 8 * n_m, 8 * n_m * BF16)
    assert inst.traffic_at(8) == 3 * 8 * n_m * BF16
    assert inst.time(8) == 3 * 8 * n_m + cost_model.MACHINE_BALANCE * 3 * 8 * n_m * BF16


def test_the_memory_budget_overrides_the_faster_strategy():
    """LM head at T=1024, B=8: instantiation is faster but holds 589 MiB of per-sample gradients."""
    costs = cost_model.linear(1024, 50257, 768, BF16)
    assert costs["instantiate"].time(8) < costs["ghost"].time(8)
    assert cost_model.choose(costs, 8, "auto", BUDGET) == "instantiate"
    assert cost_model.choose(costs, 8, "auto", costs["instantiate"].at(8)[1] - 1) == "ghost"
    assert cost_model.choose(costs, 8, "auto", 0) == "ghost"  # nothing fits: least memory


def test_an_lm_head_at_short_sequences_keeps_ghost_norms():
    """50257×768 at T=256, B=32: per-sample gradients would be 2.3 GiB (over the budget) and slower."""
    costs = cost_model.linear(256, 50257, 768, BF16)
    assert costs["ghost"].time(32) < costs["instantiate"].time(32)
    assert cost_model.choose(costs, 32, "auto", 4 * BUDGET) == "ghost"


def test_the_default_budget_instantiates_an_fp32_lm_head_at_long_sequences():
    """768→50257 at T=1024, B=8 in fp32: 1178 MiB of per-sample gradients. A 1024 MiB default forced
    ghost norms there (H200, 2026-12-02: 64.5 against 59.1 ms/step instantiated, same peak memory)."""
    costs = cost_model.linear(1024, 768, 50257, FP32)
    assert BUDGET < costs["instantiate"].at(8)[1] <= DEFAULT_BUDGET
    assert cost_model.choose(costs, 8, "auto", DEFAULT_BUDGET) == "instantiate"


@pytest.mark.parametrize("rows,batch,element_bytes,want", [
    (1024, 8, BF16, "instantiate"),  # 589 MiB: instantiated under either default
    (256, 32, BF16, "ghost"), (256, 32, FP32, "ghost"),  # ≥ 2.3 GiB: still over the default budget
])
def test_the_default_budget_keeps_the_other_lm_head_choices(rows, batch, element_bytes, want):
    costs = cost_model.linear(rows, 768, 50257, element_bytes)
    assert (costs["instantiate"].at(batch)[1] <= DEFAULT_BUDGET) == (want == "instantiate")
    assert cost_model.choose(costs, batch, "auto", DEFAULT_BUDGET) == want
