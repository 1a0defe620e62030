#!/usr/bin/env bash
# The GPU check in one command, correctness first so that results come back even if time runs out:
#   bash benchmarks/gpu-check.sh [OUT_DIR]        (default: $OUT, else ./gpu-results)
# Needs a CUDA torch and transformers already installed (the device machine reaches no registry);
# radixkv itself is installed from this tree without dependencies when it is not importable.
# Every step writes its output under OUT_DIR; a failing step is reported and the next one runs.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu-results}}"
mkdir -p "$out"
python -c 'import radixkv.integrations.hf' 2>/dev/null ||
    python -m pip install -q --no-deps --no-build-isolation -e . >"$out/install.txt" 2>&1
status=0
step() {  # step NAME COMMAND...: run it, keep its output, note a failure and go on
    local name="$1"
    shift
    echo "== $name: $*"
    if ! "$@" >"$out/$name.txt" 2>&1; then
        echo "   FAILED (see $out/$name.txt)"
        status=1
    fi
    tail -n 3 "$out/$name.txt"
}
step versions python -c 'import torch, transformers; print(torch.__version__, transformers.__version__,
    torch.version.cuda, torch.cuda.get_device_name(0), torch.backends.cuda.flash_sdp_enabled(),
    torch.backends.cuda.mem_efficient_sdp_enabled())'
# Correctness: the pool in every dtype (exact, int8, int4: CUDA bits = CPU bits), shared calls
# (float32 / float16 / bfloat16, eager / sdpa) against plain generate.
step tests-device python -m pytest -q tests/test_device_pool.py tests/test_hf_sharing.py --device cuda
# Figures: pool rates beside a device copy, TTFT of a hit, the sharing figures.
for dtype in float16 bfloat16 float32; do
    step "rates-$dtype" python -m radixkv.benchmarks.sharing rates --device cuda --dtype "$dtype" --out "$out/rates-$dtype.json"
done
step ttft python -m radixkv.benchmarks.figures ttft --device cuda --model llama-100m
step cold-batch python -m radixkv.benchmarks.sharing cold-batch --device cuda --out "$out/cold-batch.json"
step beams python -m radixkv.benchmarks.sharing beams --device cuda --model llama-100m --out "$out/beams.json"
step decode python -m radixkv.benchmarks.sharing decode --device cuda --model llama-100m --out "$out/decode.json"
exit "$status"
