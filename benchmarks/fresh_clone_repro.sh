#!/usr/bin/env bash
# Times the README's first command on a fresh clone, stage by stage, then a second (no-op) `dvc repro`.
# Usage: bash benchmarks/fresh_clone_repro.sh [clone-dir]   (default: a new temporary directory)
# Prints the set-up time, each stage's wall time (from its "Running stage" line to the next one's: the
# process start-up included), the total, the no-op repro and the headline scores.
# Takes ~15 minutes on a 2-core CPU.
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"
dest="${1:-$(mktemp -d)/lmpipe}"
git clone -q "$src" "$dest"
cd "$dest"
stamp='import sys, time
for line in sys.stdin:
    print(f"{time.time():.2f} {line}", end="", flush=True)'
start=$(date +%s.%N)
{ PYTHONUNBUFFERED=1 make repro 2>&1; echo "exit $?"; } | python3 -u -c "$stamp" > repro.log
end=$(date +%s.%N)
grep -q " exit 0$" repro.log || { tail -30 repro.log; exit 1; }
noop_start=$(date +%s.%N)
PATH="$dest/.venv/bin:$PATH" dvc repro > noop.log 2>&1
noop_end=$(date +%s.%N)
grep -q "Running stage" noop.log && { echo "second dvc repro was not a no-op:"; cat noop.log; exit 1; }
python3 - "$start" "$end" <<'EOF'
import re, sys
start, end = float(sys.argv[1]), float(sys.argv[2])
marks = []
for line in open("repro.log"):
    stamp, _, text = line.partition(" ")
    found = re.search(r"Running stage '(\w+)'", text)
    if found:
        marks.append((found.group(1), float(stamp)))
print(f"set-up (make setup):                       {marks[0][1] - start:6.0f} s")
for (name, at), (_, after) in zip(marks, [*marks[1:], ("end", end)]):
    print(f"  {name:<10} {after - at:6.0f} s")
print(f"make repro (fresh clone, set-up included): {end - start:6.0f} s")
EOF
python3 -c "print('second dvc repro (no-op):                  %.1f s' % ($noop_end - $noop_start))"
python3 -c "import json; m=json.load(open('reports/evaluate/metrics.json')); print('test macro-F1 model %.4f baseline %.4f' % (m['model']['macro_f1'], m['baseline']['macro_f1']))"
python3 -c "
import json
r = json.load(open('reports/compress/report.json'))['variants']
print('compress test macro-F1: ' + ', '.join('%s %.4f (val loss %s)' % (k, v['macro_f1'], 'n/a' if 'val_f1_loss' not in v else '%+.2f pt' % (100 * v['val_f1_loss'])) for k, v in r.items()))
e = json.load(open('reports/export/report.json'))
print('export: served macro-F1 %.4f, batch-1 p50 ms: %s' % (e['served']['macro_f1'], ', '.join('%s %.1f' % (k, v['latency_b1_p50_ms']) for k, v in e['latency'].items())))
"
