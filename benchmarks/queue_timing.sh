#!/usr/bin/env bash
# Times a 4-experiment DVC queue (2 learning rates x 2 seeds) run by 2 workers on the default data and the
# real MiniLM with tiny settings (200 rows, 64 tokens, 1 epoch), then compares the four with `lmpipe compare`.
# Usage: bash benchmarks/queue_timing.sh [work-dir]   (default: a new temporary directory)
# Uses this checkout's .venv (run `make setup` first). Leaves the repo, its MLflow store and the report in work-dir.
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"
dest="${1:-$(mktemp -d)/lmpipe}"
export PATH="$src/.venv/bin:$PATH" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
unset MLFLOW_TRACKING_URI
git clone -q "$src" "$dest"
cd "$dest"
# the working tree's uncommitted edits are not in the clone: benchmark what is committed
python -c 'from lmpipe.params import write_params
write_params("params.yaml", {"prepare.max_rows": 200, "base.max_length": 64, "train.epochs": 1})'
git -c user.name=bench -c user.email=bench@example.com commit -qam "tiny settings for the queue benchmark"
lmpipe queue-check
dvc exp run --queue -S 'train.learning_rate=5e-5,2e-4' -S 'base.seed=1,2' > queue.log 2>&1
start=$(date +%s.%N)
OMP_NUM_THREADS=$(( $(nproc) / 2 > 0 ? $(nproc) / 2 : 1 )) dvc queue start --jobs 2 >> queue.log 2>&1  # a core share per worker
# (not `dvc queue status | grep -q`: with pipefail, grep closing the pipe early ends the loop)
while status="$(dvc queue status)" && grep -qE "Queued|Running" <<< "$status"; do sleep 5; done
end=$(date +%s.%N)
dvc queue status
python3 -c "print('4-experiment queue, 2 workers: %.0f s' % ($end - $start))"
dvc exp show --no-pager --md --only-changed --drop 'Created|State|Executor|data/|models/|reports/|src/|stages/' 2>/dev/null || true
mapfile -t names < <(dvc exp ls --name-only | sort)
lmpipe compare "${names[@]}" --out reports/compare
echo "report: $dest/reports/compare/report.md"
