#!/usr/bin/env bash
# The GPU checks and the speed table of README's "Speed" section, in one go (one GPU, torch >= 2.11
# with Triton already installed): CUDA kernel and oracle tests, then the bench row groups, each in
# one process with caches off. Logs and JSON go to ${OUT:-bench_out}/. Usage:
#   bash bench/gpu_suite.sh [tests|lm|fp32|short|vit|hf ...]  (default: all but hf, in that order)
# hf: bench/hf_suite.py, the Hugging Face workloads (eager, compile, dp, Opacus ghost), each in its own
# process under HF_TIMEOUT s (default 200); HF_WORKLOADS=gpt2-1024,bert-base,... picks some (default: all
# eight, ~15-25 min), so that a session with a per-command limit can run them in groups.
set -u
cd "$(dirname "$0")/.."
out=${OUT:-bench_out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_FORCE_DISABLE_CACHES=1
bench() { name=$1; shift; timeout 280 python3 bench/step_time.py --out "$out/$name.json" "$@" > "$out/$name.log" 2>&1
          echo "== $name (rc $?)"; grep -A8 "^mode " "$out/$name.log"; }
for part in ${@:-tests lm fp32 short vit}; do
  case $part in
    tests) DPCOMPILE_TEST_DEVICE=cuda timeout 300 python3 -m pytest -q tests/test_kernels.py tests/test_clipping_oracle.py \
             -k "kernel or cnn-instantiate or gpt_untied-instantiate or gpt_tied-auto or several_leading_dims or bf16 or (poisson and gpt_untied) or sliced_back" \
             > "$out/tests.log" 2>&1; echo "== tests (rc $?)"; tail -4 "$out/tests.log" ;;
    lm) bench lm --steps 10 --warmup 3 --batch 8 --seq 1024 --dtype bf16 --compile-times --modes compile,dp-auto,dp-lean ;;
    fp32) bench fp32 --steps 10 --warmup 3 --batch 8 --seq 1024 --dtype fp32 --compile-times --modes compile,dp-auto,dp-lean ;;
    short) bench short --steps 10 --warmup 3 --batch 32 --seq 256 --dtype bf16 --compile-times --modes compile,dp-auto ;;
    vit) bench vit --steps 10 --warmup 3 --model vit --width 384 --batch 64 --dtype bf16 --compile-times --modes compile,dp-auto ;;
    hf) timeout 1800 python3 bench/hf_suite.py --out "$out/hf" --timeout "${HF_TIMEOUT:-200}" --steps 8 --warmup 3 \
          --compile-times ${HF_WORKLOADS:+--workloads "$HF_WORKLOADS"} > "$out/hf.log" 2>&1
        echo "== hf (rc $?)"; sed -n '/^workload /,$p' "$out/hf.log" ;;
  esac
done
