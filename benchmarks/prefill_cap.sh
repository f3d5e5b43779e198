#!/usr/bin/env bash
# One variant's generation batch under prefill caps and malloc settings: peak RSS of the whole process.
# The baseline is computed once (its caches copied into each run's results directory); then RTN w4 (its
# WikiText-2 run, its quantisation and its six generative tasks in one batch) runs once per setting in a
# fresh process under /usr/bin/time -v, with quanteval.generate.PREFILL_TOKENS["cpu"] set to CAP and
# QUANTEVAL_MMAP_THRESHOLD to THRESHOLD bytes (0: glibc's default). About 3 min per setting after a 3-min
# baseline, on an idle 2-core machine.
#   bash benchmarks/prefill_cap.sh results/bench/prefill-cap
set -euo pipefail
OUT=${1:-results/bench/prefill-cap}
mkdir -p "$OUT"
rm -rf "$OUT/base"
python -m quanteval.cli method=none results_dir="$OUT/base" > "$OUT/base.log" 2>&1
for cfg in A:1024:0 B:4096:0 C:1024:16777216 A2:1024:0; do
  IFS=: read -r name cap thr <<< "$cfg"
  rm -rf "${OUT:?}/$name"; cp -r "$OUT/base" "$OUT/$name"
  QUANTEVAL_MMAP_THRESHOLD=$thr /usr/bin/time -v python -c "
import sys
import quanteval.generate as G
G.PREFILL_TOKENS['cpu'] = $cap
sys.argv = ['quanteval', 'method=rtn', 'bits=4', 'results_dir=$OUT/$name']
from quanteval.cli import main
try:
    main()
except SystemExit:
    pass
" > "$OUT/$name.log" 2>&1
  echo "$name cap=$cap threshold=$thr: $(grep -a 'Maximum resident' "$OUT/$name.log")"
done
