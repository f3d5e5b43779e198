#!/usr/bin/env bash
# Issue 17's GPU checks, in one command on a lent GPU machine (see benchmarks/gpu_kit.py, which prepares
# .gpu-kit/ here). Through the device tool:  command "bash benchmarks/gpu_session.sh", carry [".gpu-kit"],
# timeout_s 600. Each step has its own time limit and writes its log under $OUT as it goes, so a step that
# fails or runs out of time costs only itself; $OUT/summary.txt lists each step's exit status and seconds.
# Worst case, every step at its limit: about 560 s with the wheels' install, inside the tool's 600 s.
# With QUANTEVAL_REHEARSAL=1 (gpu_kit.py prepare --rehearse) it runs here on the CPU, at toy sizes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-session-out}
KIT=${KIT:-.gpu-kit}
REHEARSAL=${QUANTEVAL_REHEARSAL:-0}
mkdir -p "$OUT"
: > "$OUT/summary.txt"

step() {  # step NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME.log, note rc and seconds
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc ${limit}s-limit took=$((SECONDS - t0))s" | tee -a "$OUT/summary.txt"
  tail -n 3 "$OUT/$name.log"
  return $rc
}

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  "${WHEELS:-$KIT/wheels}"/*.whl || { echo "wheels did not install" | tee -a "$OUT/summary.txt"; exit 1; }
# quanteval runs from this tree (no install): its packages quanteval_kernels (kernels/) and quanteval_tasks
# (tasks/, the name pyproject.toml maps it to) are made importable by path
mkdir -p /tmp/quanteval-path && ln -sfn "$PWD/tasks" /tmp/quanteval-path/quanteval_tasks
export PYTHONPATH="/tmp/site:$PWD:$PWD/kernels:/tmp/quanteval-path" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export QUANTEVAL_DATA="$PWD/$KIT/data" QUANTEVAL_CACHE=/tmp/quanteval-cache
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
  'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" \
  | tee -a "$OUT/summary.txt"
MODEL=/tmp/smollm2-random
# (its output goes to summary.txt: at most 8 files come back from $OUT, and the steps below write 7)
timeout 120 python3 benchmarks/gpu_kit.py model --kit "$KIT" --out "$MODEL" 2>&1 | tail -n 2 | tee -a "$OUT/summary.txt"
[ -f "$MODEL/config.json" ] || { echo "model: not made" | tee -a "$OUT/summary.txt"; exit 1; }

QUANTEVAL=(python3 -c "import sys; sys.argv[0] = 'quanteval'; from quanteval.cli import main; main()")
SWEEP=(model=hf model.name=smollm2_random model.name_or_path="$MODEL" task=wikitext2,gsm8k method=none,rtn,gptq,awq
       bits=4 results_dir=/tmp/gpu-sweep)
if [ "$REHEARSAL" = 1 ]; then
  step pytest-cuda 300 python3 -m pytest -q -p no:cacheprovider -k cuda tests/test_kernels.py tests/test_rtn.py
  step kernels 300 python3 benchmarks/gpu_kernels.py --dry-run --parts kernels --out "$OUT/gpu-kernels.json"
  step sweep 900 "${QUANTEVAL[@]}" "${SWEEP[@]}" device=cpu preset=smoke preset.limits.gsm8k=2 \
    preset.max_new_tokens.gsm8k=16
  step b2 300 python3 benchmarks/b2_generation.py --model-dir "$MODEL" --n 4 --max-gen-toks 16 --batch-size 4 \
    --out "$OUT"
else
  # the CUDA tests (the compiled Triton kernel against the reference, RTN on cuda against the CPU)
  step pytest-cuda 120 python3 -m pytest -q -p no:cacheprovider -rs -k cuda tests/test_kernels.py tests/test_rtn.py
  # a device=cuda sweep: bf16 (dtype=auto on cuda), RTN/GPTQ/AWQ quantised on the GPU, generation, report
  step sweep 170 "${QUANTEVAL[@]}" "${SWEEP[@]}" device=cuda
  # P4: the kernel's bandwidth and speedup over fp16 at 4/3/2 bits; methods on cuda against the CPU
  step kernels 130 python3 benchmarks/gpu_kernels.py --no-config-sweep --out "$OUT/gpu-kernels.json"
  # B2 on the GPU: the engine against HFLM at batch 32 (random weights: answers run to the cap)
  step b2 100 python3 benchmarks/b2_generation.py --model-dir "$MODEL" --threads 16 --out "$OUT"
fi
# the sweep's run records and report, as one file (files back from $OUT: at most 8)
tar -czf "$OUT/gpu-sweep.tar.gz" -C /tmp gpu-sweep 2>/dev/null
ls -la "$OUT"
