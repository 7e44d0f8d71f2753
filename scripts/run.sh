#!/usr/bin/env bash
# `make run`: synthetic data -> train -> evaluate -> export (only if the repository has no model of the
# category) -> the gateway, then print how long it took and every URL a person needs.
set -euo pipefail
SLSG=$1 DATA=$2 CATEGORY=$3 CONFIG=$4 RUN_DIR=$5 REPOSITORY=$6 HOST=$7 PORT=$8
shift 8
start=$(date +%s)
stage() { printf '\n== %s (%ds since start)\n' "$1" $(( $(date +%s) - start )); }

if [ ! -d "$DATA/$CATEGORY" ]; then
    stage "writing a synthetic data set to $DATA"
    "$SLSG" synth "$DATA" --categories "$CATEGORY" "$@"
fi
if ls "$REPOSITORY/$CATEGORY"/*/model.onnx >/dev/null 2>&1; then
    echo "model $CATEGORY already in $REPOSITORY; skipping training (delete $REPOSITORY/$CATEGORY to retrain)"
else
    stage "training $CATEGORY with $CONFIG"
    "$SLSG" train --config "$CONFIG" --data "$DATA" --category "$CATEGORY" --out "$RUN_DIR"
    stage "evaluating"
    "$SLSG" evaluate --checkpoint "$RUN_DIR/checkpoint.pt" --data "$DATA" --out "$RUN_DIR/eval"
    stage "exporting to $REPOSITORY"
    "$SLSG" export --checkpoint "$RUN_DIR/checkpoint.pt" --repository "$REPOSITORY" --name "$CATEGORY" --cpu-config
fi

stage "starting the gateway"
"$SLSG" serve --repository "$REPOSITORY" --host "$HOST" --port "$PORT" &
gateway=$!
trap 'kill $gateway 2>/dev/null' INT TERM EXIT
base="http://$HOST:$PORT"
until curl -sf "$base/readyz" >/dev/null 2>&1; do
    kill -0 $gateway 2>/dev/null || { echo "the gateway exited before it was ready"; exit 1; }
    sleep 0.5
done
image=$(ls "$DATA/$CATEGORY"/test/logical_anomalies/*.png | head -1)
cat <<MSG

Ready: the gateway serves $CATEGORY, $(( $(date +%s) - start )) s after the set-up finished.

  API              $base/v1/models/$CATEGORY/inspect
  API docs         $base/docs
  models           $base/v1/models
  metrics          $base/metrics
  evaluation       $RUN_DIR/eval/report.md (figures beside it: *.png)

Try:
  curl -s -X POST -H 'Content-Type: image/png' -H 'X-Line-Id: line-1' \\
       --data-binary @$image $base/v1/models/$CATEGORY/inspect

Ctrl-C stops the gateway.
MSG
wait $gateway
