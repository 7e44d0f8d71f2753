#!/usr/bin/env bash
# On a lent GPU machine, in the repository root, once every part of .gpu-carry/ has arrived (benchmarks/
# gpu_carry.sh made them here; docs/gpu.md has the device calls): install the bundle under /tmp, then run
# python -m slsg_bench.gpu once.
#
#   bash benchmarks/gpu_device.sh OUT_DIR [BUDGET_S]
#
# Nothing goes into the image: wheels and archives land in /tmp/slsg-site, first on PYTHONPATH (so
# onnxruntime-gpu shadows the image's CPU onnxruntime); the repository's packages run from the source tree.
# OUT_DIR gets at most 8 files (what the device tool brings back): the report and the logs' ends.
set -uo pipefail
out=${1:?usage: gpu_device.sh OUT_DIR [BUDGET_S]}
budget=${2:-360}
carry=.gpu-carry bundle=/tmp/slsg-bundle site=/tmp/slsg-site repo=/tmp/slsg-repo work=/tmp/slsg-gpu
stub_env=/tmp/slsg-stub-env
mkdir -p "$out" "$bundle" "$site" "$repo"
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python3 --version
    python3 -c "import numpy, onnxruntime; print('image: numpy', numpy.__version__, 'onnxruntime', onnxruntime.__version__)"
    ldconfig -p | grep -E 'libnvinfer|libpython3' || echo "no TensorRT (libnvinfer) in ldconfig"
} >"$out/environment.txt" 2>&1

expected=$(cat "$carry/manifest" 2>/dev/null)
got="parts=$(find "$carry" -name 'part-*' | wc -l) sha256=$(cat "$carry"/part-* 2>/dev/null | sha256sum | cut -d' ' -f1)"
if [ "$got" != "$expected" ]; then
    echo "gpu_device: the carried parts are incomplete (want '$expected', have '$got'): the machine went back" \
         "between calls or a part was not carried; send every part again (docs/gpu.md)" | tee -a "$out/environment.txt"
    exit 3
fi
cat "$carry"/part-* | tar xf - -C "$bundle"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    "$bundle"/wheels/*.whl >>"$out/environment.txt" 2>&1 || { cat "$out/environment.txt"; exit 1; }
tar xJf "$bundle/pytriton.tar.xz" -C "$site"
tar xJf "$bundle/onnxruntime-gpu.tar.xz" -C "$site"
tar xJf "$bundle/model.tar.xz" -C "$repo"
# Triton's Python backend stub ignores PYTHONPATH and returns empty outputs with numpy 2: it gets a venv of
# its own, numpy 1.26 first, then (a .pth) the carried packages and the image's site-packages
python3 -m venv --without-pip "$stub_env"
stub_site=$("$stub_env/bin/python3" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
tar xJf "$bundle/stub-numpy.tar.xz" -C "$stub_site"
printf '%s\n' "$site" "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" >"$stub_site/slsg-serving.pth"
export PYTHONPATH="$PWD:$PWD/training:$PWD/service:$PWD/benchmarks:$site" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
python3 -c "import onnxruntime as o; print('carried onnxruntime', o.__version__, o.get_available_providers())" \
    >>"$out/environment.txt" 2>&1
python3 -m slsg_bench.gpu --repository "$repo" --name "$(cat "$bundle/model.name")" --out "$work" \
    --budget-s "$budget" --stub-environment "$stub_env" >"$out/run.log" 2>&1
status=$?
tail -n 80 "$out/run.log"
cp "$work"/gpu_report.json "$work"/gpu_report.md "$out"/ 2>/dev/null
tail -n 300 "$work/tritonserver.log" >"$out/tritonserver.tail.log" 2>/dev/null
tail -q -n 100 "$work"/work/service/gateways-*/gateway-0/gateway.log >"$out/gateway.tail.log" 2>/dev/null
exit $status
