#!/usr/bin/env bash
# On a lent GPU machine, in the repository root: install what .gpu-carry/ brought (benchmarks/gpu_carry.sh
# made it here), then run python -m slsg_bench.gpu once. docs/gpu.md has the device calls.
#
#   bash benchmarks/gpu_device.sh OUT_DIR [BUDGET_S]
#
# Nothing is installed into the image: wheels and archives go to /tmp/slsg-site, first on PYTHONPATH (so
# onnxruntime-gpu shadows the image's CPU onnxruntime); the repository's packages run from the source tree.
# At most 8 files land in OUT_DIR (what the device tool brings back): the report, the logs.
set -uo pipefail
out=${1:?usage: gpu_device.sh OUT_DIR [BUDGET_S]}
budget=${2:-360}
carry=.gpu-carry site=/tmp/slsg-site repo=/tmp/slsg-repo work=/tmp/slsg-gpu
mkdir -p "$out" "$site" "$repo"
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python3 --version; python3 -c "import numpy, onnxruntime; print('image: numpy', numpy.__version__, 'onnxruntime', onnxruntime.__version__)"
    ldconfig -p | grep -E 'libnvinfer|libpython3' || echo "no TensorRT (libnvinfer) in ldconfig"
} >"$out/environment.txt" 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    "$carry"/base/wheels/*.whl >>"$out/environment.txt" 2>&1 || { echo "wheel install failed"; cat "$out/environment.txt"; exit 1; }
tar xJf "$carry/base/pytriton.tar.xz" -C "$site"
if compgen -G "$carry/ort/part-*" >/dev/null; then
    cat "$carry"/ort/part-* | tar xJf - -C "$site" || echo "onnxruntime-gpu parts incomplete: no CUDA provider" | tee -a "$out/environment.txt"
else
    echo "no onnxruntime-gpu parts carried: the image's CPU onnxruntime runs (CPU fallback)" | tee -a "$out/environment.txt"
fi
tar xJf "$carry/base/model.tar.xz" -C "$repo"
export PYTHONPATH="$PWD:$PWD/training:$PWD/service:$PWD/benchmarks:$site" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
python3 -m slsg_bench.gpu --repository "$repo" --name "$(cat "$carry/base/model.name")" --out "$work" \
    --budget-s "$budget" >"$out/run.log" 2>&1
status=$?
tail -n 60 "$out/run.log"
cp "$work"/gpu_report.json "$work"/gpu_report.md "$out"/ 2>/dev/null
tail -n 300 "$work/tritonserver.log" >"$out/tritonserver.tail.log" 2>/dev/null
tail -q -n 100 "$work"/work/service/gateways-*/gateway-0/gateway.log >"$out/gateway.tail.log" 2>/dev/null
exit $status
