#!/usr/bin/env bash
# Here, on a machine that reaches PyPI: fill .gpu-carry/ (git-ignored) with what a lent GPU machine lacks
# for benchmarks/gpu_device.sh. docs/gpu.md says how the parts travel (64 MiB per device call).
#
#   bash benchmarks/gpu_carry.sh MODEL_REPOSITORY NAME
#
# .gpu-carry/base/  (one call, ~60 MiB with the working tree): the wheels of benchmarks/gpu_carry.txt,
#                   nvidia-pytriton's tritonserver cut to the Python 3.12 stub (tar.xz), the model (tar.xz)
# .gpu-carry/ort/   onnxruntime-gpu for CUDA 13 (tar.xz, without the C-API library and the TensorRT provider,
#                   which needs TensorRT 10 libraries the image lacks), split in parts of PART_MIB (56) MiB
set -euo pipefail
repo=${1:?usage: gpu_carry.sh MODEL_REPOSITORY NAME}
name=${2:?usage: gpu_carry.sh MODEL_REPOSITORY NAME}
part_mib=${PART_MIB:-56}
carry=.gpu-carry
version=$(find "$repo/$name" -mindepth 1 -maxdepth 1 -type d -regex '.*/[0-9]+' -printf '%f\n' | sort -n | tail -1)
[ -n "$version" ] && [ -f "$repo/$name/$version/model.onnx" ] || { echo "no $repo/$name/<version>/model.onnx"; exit 2; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
rm -rf "$carry"
mkdir -p "$carry/base/wheels" "$carry/ort"

download() {  # the device's Python is 3.12 (KINDS.md); its glibc takes manylinux_2_35 wheels
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any "$@"
}

download -d "$carry/base/wheels" $(grep -v '^#' benchmarks/gpu_carry.txt)

download -d "$tmp" nvidia-pytriton==0.7.0
unzip -q "$tmp"/nvidia_pytriton-*.whl -d "$tmp/pytriton"
find "$tmp/pytriton/pytriton/tritonserver/python_backend_stubs" -mindepth 1 -maxdepth 1 ! -name 3.12 -exec rm -rf {} +
tar cf - -C "$tmp/pytriton" . | xz -9 -T0 > "$carry/base/pytriton.tar.xz"

tar cf - -C "$repo" "$name/config.pbtxt" "$name/$version" | xz -6 -T0 > "$carry/base/model.tar.xz"
echo "$name" > "$carry/base/model.name"

download -d "$tmp" onnxruntime-gpu==1.31.1
unzip -q "$tmp"/onnxruntime_gpu-*.whl -d "$tmp/ort"
rm -f "$tmp"/ort/onnxruntime/capi/libonnxruntime.so.* "$tmp"/ort/onnxruntime/capi/libonnxruntime_providers_tensorrt.so
tar cf - -C "$tmp/ort" . | xz -6 -T0 | split -b "${part_mib}m" - "$carry/ort/part-"

du -sh "$carry/base" "$carry"/ort/part-*
