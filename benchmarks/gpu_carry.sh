#!/usr/bin/env bash
# Here, on a machine that reaches PyPI: pack what a lent GPU machine lacks for benchmarks/gpu_device.sh into
# .gpu-carry/ (git-ignored), in parts that each fit one device call (64 MiB with the working tree).
#
#   bash benchmarks/gpu_carry.sh MODEL_REPOSITORY NAME
#
# The bundle: the wheels of benchmarks/gpu_carry.txt (the gateway's web stack, tritonclient, the fp16
# converter), nvidia-pytriton's tritonserver cut to the Python 3.12 backend stub, numpy 1.26 for that stub's
# own environment, onnxruntime-gpu for CUDA 13 without its C-API library (its TensorRT provider stays: it runs
# where the machine has TensorRT 10), and the newest version of the model with its config.pbtxt. It is split into .gpu-carry/part-NN of PART_MIB
# (61) MiB; .gpu-carry/manifest holds the part count and the bundle's sha256. docs/gpu.md has the calls.
set -euo pipefail
repo=${1:?usage: gpu_carry.sh MODEL_REPOSITORY NAME}
name=${2:?usage: gpu_carry.sh MODEL_REPOSITORY NAME}
part_mib=${PART_MIB:-61}
carry=.gpu-carry
version=$(find "$repo/$name" -mindepth 1 -maxdepth 1 -type d -regex '.*/[0-9]+' -printf '%f\n' | sort -n | tail -1)
[ -n "$version" ] && [ -f "$repo/$name/$version/model.onnx" ] || { echo "no $repo/$name/<version>/model.onnx"; exit 2; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
bundle=$tmp/bundle
mkdir -p "$bundle/wheels"

download() {  # the device's Python is 3.12 (KINDS.md); its glibc takes manylinux_2_35 wheels
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any "$@"
}

echo "gpu_carry: wheels"
download -d "$bundle/wheels" $(grep -v '^#' benchmarks/gpu_carry.txt)

echo "gpu_carry: tritonserver (nvidia-pytriton), Python 3.12 stub only"
download -d "$tmp" nvidia-pytriton==0.7.0
unzip -q "$tmp"/nvidia_pytriton-*.whl -d "$tmp/pytriton"
find "$tmp/pytriton/pytriton/tritonserver/python_backend_stubs" -mindepth 1 -maxdepth 1 ! -name 3.12 -exec rm -rf {} +
rm -f "$tmp"/pytriton/nvidia_pytriton.libs/libpython3-*.so*  # a libpython 3.13 nothing here links to (13 MiB)
tar cf - -C "$tmp/pytriton" . | xz -9 -T0 >"$bundle/pytriton.tar.xz"
rm -rf "$tmp/pytriton" "$tmp"/nvidia_pytriton-*.whl

echo "gpu_carry: numpy 1.26 for the Python backend stub (it returns empty outputs with the machine's numpy 2)"
download -d "$tmp" numpy==1.26.4
unzip -q "$tmp"/numpy-*.whl -d "$tmp/numpy"
rm -rf "$tmp"/numpy/numpy/tests "$tmp"/numpy/numpy/*/tests
tar cf - -C "$tmp/numpy" . | xz -9 -T0 >"$bundle/stub-numpy.tar.xz"

echo "gpu_carry: model $name v$version"
tar cf - -C "$repo" "$name/config.pbtxt" "$name/$version" | xz -6 -T0 >"$bundle/model.tar.xz"
echo "$name" >"$bundle/model.name"

echo "gpu_carry: onnxruntime-gpu (CUDA 13)"
download -d "$tmp" onnxruntime-gpu==1.31.1
unzip -q "$tmp"/onnxruntime_gpu-*.whl -d "$tmp/ort"
rm -f "$tmp"/ort/onnxruntime/capi/libonnxruntime.so.*  # the C API: Python does not load it (28 MiB)
tar cf - -C "$tmp/ort" . | xz -6 -T0 >"$bundle/onnxruntime-gpu.tar.xz"  # -9 saves 1 MB for twice the time

rm -rf "$carry"
mkdir -p "$carry"
tar cf "$tmp/bundle.tar" -C "$bundle" .
split -b "${part_mib}m" -d -a 2 "$tmp/bundle.tar" "$carry/part-"
parts=$(find "$carry" -name 'part-*' | wc -l)
echo "parts=$parts sha256=$(sha256sum "$tmp/bundle.tar" | cut -d' ' -f1)" >"$carry/manifest"
ls -l "$bundle" "$carry"
cat "$carry/manifest"
