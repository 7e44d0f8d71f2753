#!/usr/bin/env bash
# The CUDA check, in one go on a GPU host: the tests that need CUDA, the data pipeline on the GPU, and
# a full training run (SLSG, the reference checks, calibration) timed end to end, then evaluated.
#
#   benchmarks/cuda_check.sh OUT_DIR [CATEGORY]
#
# Needs `slsg` on PATH with a CUDA build of torch and the train extra. Each stage writes its log
# under OUT_DIR and the script goes on when one fails, so one run reports everything; the exit
# status is that of the first failure. Sizes are the README's 256 px run (STEPS, PRETRAIN_STEPS,
# IMAGE_SIZE, WORKERS override them).
set -uo pipefail
out=${1:?usage: cuda_check.sh OUT_DIR [CATEGORY]}
category=${2:-cable}
steps=${STEPS:-900} pretrain=${PRETRAIN_STEPS:-200} size=${IMAGE_SIZE:-256} workers=${WORKERS:-8}
data=${DATA:-/tmp/slsg-cuda-data} eval_data=${EVAL_DATA:-/tmp/slsg-cuda-eval} run_dir=${RUN_DIR:-/tmp/slsg-cuda-run}
mkdir -p "$out"
status=0
stage() {  # stage NAME COMMAND...: run it, log to OUT_DIR/NAME.log, record wall time and exit status
    local name=$1; shift
    local start=$SECONDS
    "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc, $((SECONDS - start)) s" | tee -a "$out/stages.txt"
    [ $rc -ne 0 ] && [ $status -eq 0 ] && status=$rc
    return 0
}

{ nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"; } \
    >"$out/environment.txt" 2>&1
stage pytest python3 -m pytest -q -p no:cacheprovider tests/train/test_model.py tests/train/test_training.py -k "cuda or bf16"
stage synth slsg synth "$data" --categories "$category" --image-size "$size" --overwrite
stage synth_eval slsg synth "$eval_data" --categories "$category" --image-size "$size" --train 2 --validation 2 \
    --test-good 60 --test-logical 60 --test-structural 60 --seed 7 --overwrite
stage bench_pipeline slsg bench pipeline --data "$data" --category "$category" --image-size "$size" --device cuda \
    --batch-size 8 --steps 30 --workers "$workers" --json
global=(); [ "$category" = cable ] && global=(--global-branch)
rm -rf "$run_dir"
stage train slsg train --data "$data" --category "$category" --out "$run_dir" --image-size "$size" --steps "$steps" \
    --pretrain-steps "$pretrain" --workers "$workers" --device cuda "${global[@]}"
stage evaluate slsg evaluate --checkpoint "$run_dir/checkpoint.pt" --data "$eval_data" --out "$run_dir/eval" \
    --device cuda
cp "$run_dir/train_log.jsonl" "$run_dir/eval/metrics.json" "$out/" 2>/dev/null
exit $status
