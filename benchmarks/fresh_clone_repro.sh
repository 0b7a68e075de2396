#!/usr/bin/env bash
# Times the README's first command on a fresh clone, then a second (no-op) `dvc repro`.
# Usage: bash benchmarks/fresh_clone_repro.sh [clone-dir]   (default: a new temporary directory)
# Prints wall times and the evaluate metrics. Takes ~19 minutes on a 2-core CPU (1,133 s at 2bc7fc6).
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"
dest="${1:-$(mktemp -d)/lmpipe}"
git clone -q "$src" "$dest"
cd "$dest"
start=$(date +%s.%N)
make repro > repro.log 2>&1 || { tail -30 repro.log; exit 1; }
end=$(date +%s.%N)
noop_start=$(date +%s.%N)
PATH="$dest/.venv/bin:$PATH" dvc repro > noop.log 2>&1
noop_end=$(date +%s.%N)
grep -q "Running stage" noop.log && { echo "second dvc repro was not a no-op:"; cat noop.log; exit 1; }
python3 -c "print('make repro (fresh clone, set-up included): %.0f s' % ($end - $start))"
python3 -c "print('second dvc repro (no-op):                  %.1f s' % ($noop_end - $noop_start))"
grep -E "^(prepare|split|train|evaluate):" repro.log
python3 -c "import json; m=json.load(open('reports/evaluate/metrics.json')); print('test macro-F1 model %.4f baseline %.4f' % (m['model']['macro_f1'], m['baseline']['macro_f1']))"
