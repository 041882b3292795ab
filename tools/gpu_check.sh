#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: build tilemoe with its CUDA extension, run every test (the
# GPU ones included), check the extension's kernels with compute-sanitizer, and run the lessons
# at real sizes (recording their timings under benchmarks/results/). Into $OUT (or ./gpu-check-out)
# go logs.tgz (every step's log), summary.txt and a copy of the recorded results.
# Without a git checkout (a copied tree), set TILEMOE_COMMIT to the commit the tree is.
#   bash tools/gpu_check.sh            # uses python3 as it is: torch, triton, pytest, pybind11,
#                                      # scikit-build-core must be installed (no downloads)
#   bash tools/gpu_check.sh install triton-tests bench-variants   # only the named steps, in this file's order
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-check-out}
logs=$(mktemp -d)
mkdir -p "$out/results"
export PYTHONUNBUFFERED=1
declare -a summary

only=" $* "
step() {  # step NAME COMMAND...: run, log to $logs/NAME.log, remember pass/fail and seconds
    local name=$1; shift
    [ "$only" = "  " ] || [[ "$only" == *" $name "* ]] || return 0
    local start=$SECONDS
    echo "=== $name: $*"
    "$@" >"$logs/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$logs/$name.log"
    summary+=("$(printf '%-22s %-4s %4ss' "$name" "$([ $rc = 0 ] && echo ok || echo FAIL)" $((SECONDS - start)))")
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$logs/gpu.txt"
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' | tee -a "$logs/gpu.txt"

step install python3 -m pip install --no-build-isolation --no-deps -v -e .
step pytest-gpu python3 -m pytest -m gpu -v -p no:cacheprovider
step pytest-all python3 -m pytest -q -p no:cacheprovider
step memcheck compute-sanitizer --tool memcheck --error-exitcode 1 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_cuda_ext.py
step racecheck compute-sanitizer --tool racecheck --error-exitcode 1 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_cuda_ext.py -k "not T375000"
step moe-layer-small python3 examples/01_moe_basics/moe_layer.py --record
step moe-layer-olmoe python3 examples/01_moe_basics/moe_layer.py --preset olmoe-1b-7b --tokens 4096 --record
step moe-layer-qwen3 python3 examples/01_moe_basics/moe_layer.py --preset qwen3-30b-a3b --tokens 16384 --record
step moe-layer-dsv3 python3 examples/01_moe_basics/moe_layer.py --preset deepseek-v3 --tokens 4096 --record
step expert-routing python3 examples/01_moe_basics/expert_routing.py --tokens 65536 --experts 64 --top-k 8
step graders bash -c 'for t in exercises/*/test.py; do python3 "$t" --solution || exit 1; done'
step rounding-gemm python3 examples/04_token_rounding/routing_comparison.py --record
step cuda-gemm-tests python3 -m pytest -m gpu -v -p no:cacheprovider tests/test_cuda_grouped_gemm.py tests/test_gpu_backends.py
step examples-02-build bash -c 'cmake -S examples/02_grouped_gemm -B build/02 -G Ninja && cmake --build build/02 -j'
step examples-02 bash -c 'for p in naive tiled; do for s in 0 1.5; do build/02/grouped_gemm_$p --skew $s || exit 1; done; build/02/grouped_gemm_$p --experts 8 --tokens 32768 --n 28672 --k 4096 || exit 1; done'
step examples-02-memcheck bash -c 'for p in naive tiled; do compute-sanitizer --tool memcheck --error-exitcode 1 build/02/grouped_gemm_$p --experts 9 --tokens 999 --n 136 --k 200 --skew 1.5 --reps 1 || exit 1; done'
step examples-02-racecheck bash -c 'for p in naive tiled; do compute-sanitizer --tool racecheck --error-exitcode 1 build/02/grouped_gemm_$p --experts 9 --tokens 999 --n 136 --k 200 --skew 1.5 --reps 1 || exit 1; done'
step examples-03-build bash -c 'cmake -S examples/03_io_overlap -B build/03 -G Ninja && cmake --build build/03 -j'
step examples-03 bash -c 'build/03/io_overlap && build/03/io_overlap --skew 1.5 --tokens 20000 --n 1544 --k 1032'
step examples-03-memcheck compute-sanitizer --tool memcheck --error-exitcode 1 build/03/io_overlap --experts 9 --tokens 999 --n 136 --k 200 --skew 1.5 --reps 1
step examples-03-racecheck compute-sanitizer --tool racecheck --error-exitcode 1 build/03/io_overlap --experts 9 --tokens 999 --n 136 --k 200 --skew 1.5 --reps 1
step bench-io-overlap python3 benchmarks/bench_io_overlap.py --record
step bench-gemm python3 benchmarks/bench_grouped_gemm.py --record --plot "$out/grouped_gemm.png"
step triton-tests python3 -m pytest -m gpu -v -p no:cacheprovider tests/test_triton.py tests/test_gpu_backends.py
step backward-tests python3 -m pytest -m gpu -v -p no:cacheprovider tests/test_triton_backward.py tests/test_layer.py
step full-moe bash -c 'for c in olmoe-1b-7b qwen3-30b-a3b; do python3 examples/06_full_moe/benchmark.py --config $c --tokens 16384 --backends grouped_mm triton --record || exit 1; done'
step triton-tune python3 benchmarks/tune_triton.py
step bench-variants python3 benchmarks/bench_moe_variants.py --preset all --record --plot "$out/moe_variants.png"
step journey python3 benchmarks/moe_journey.py --preset olmoe-1b-7b --record --plot "$out/moe_journey.png"
step throughput python3 benchmarks/throughput.py --record

tar czf "$out/logs.tgz" -C "$logs" .
find benchmarks/results tilemoe/triton/tuned -newer "$logs/gpu.txt" -name '*.json' -exec cp {} "$out/results/" \; 2>/dev/null
echo "=== summary"
printf '%s\n' "${summary[@]}" | tee "$out/summary.txt"
