#!/usr/bin/env bash
# The CUDA checks and the CUDA figures in perf/README.md. Run on a machine with an NVIDIA GPU,
# onnxruntime-gpu (`pip install -e ".[gpu]"`) and a CUDA build of torch:
#
#     perf/cuda_run.sh [OUT_DIR]          # default: perf/results/cuda
#
#   1. the tests marked `cuda` (tests/test_cuda.py, tests/test_runtime.py);
#   2. the packaged MiniLM with 1000 new tokens, exported merged/split/swap in fp32 and in fp16,
#      each export validated on the CUDA provider (export fails if validation fails);
#   3. `embdeploy bench` on CUDA (IO binding): fp32 with session cost and 4 tenants, then fp16;
#   4. perf/bench_train.py --device cuda: `train` on the GPU, and extension-only vs full fine-tuning steps.
# Exit status: non-zero if any part failed (each part still runs). SKIP=tests,exports,bench32,bench16,gate,train
# leaves those parts out (e.g. to finish a run that was cut short, with EMBDEPLOY_CUDA_WORK kept).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-perf/results/cuda}
WORK=${EMBDEPLOY_CUDA_WORK:-$(mktemp -d)}
mkdir -p "$OUT" "$WORK"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 EMBDEPLOY_CACHE="$WORK/cache"
EMBDEPLOY=${EMBDEPLOY:-embdeploy}
P=${PROVIDER:-cuda}  # PROVIDER=cpu: a dry run of this script on a machine without a GPU
R=${ROUNDS:-30}  # timed rounds per shape (ROUNDS=5 for a quick dry run)
status=0
PYTHON=${PYTHON:-python3}
step() { echo; echo "=== $* ($(date +%T))"; }
want() { [[ ",${SKIP:-}," != *",$1,"* ]]; }
check() { if [ "$1" != 0 ]; then echo "FAILED: $2 (exit $1)"; status=1; fi; }

step facts
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/facts.txt"
$PYTHON -c "import sys, torch, transformers, onnxruntime as ort; print(f'python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, onnxruntime {ort.__version__} {ort.get_available_providers()}')" | tee -a "$OUT/facts.txt"
nproc | sed 's/^/CPU cores: /' | tee -a "$OUT/facts.txt"

if want tests; then
  step "tests marked cuda"
  $PYTHON -m pytest -q -p no:cacheprovider -m cuda -rs tests > "$OUT/pytest-cuda.log" 2>&1
  check $? "pytest -m cuda"
  tail -15 "$OUT/pytest-cuda.log"
fi

if want exports; then
step "MiniLM + 1000 tokens: extend, export x6 validated on CUDA"
$PYTHON - > "$WORK/terms.txt" <<'PY'
import random
rng = random.Random(0)
seen = set()
while len(seen) < 1000:  # made-up words: none is in MiniLM's vocabulary
    seen.add("zq" + "".join(rng.choice("abcdefghiklmnoprstuvwy") for _ in range(rng.randint(5, 9))))
print("\n".join(sorted(seen)))
PY
$EMBDEPLOY extend minilm --tokens "$WORK/terms.txt" --out "$WORK/ext"
check $? "extend"
for dtype in fp32 fp16; do
  for mode in merged split swap; do
    $EMBDEPLOY export "$WORK/ext" --mode $mode --dtype $dtype --provider $P --out "$WORK/$dtype-$mode" \
      2>&1 | tail -3 | tee -a "$OUT/exports.log"
    check "${PIPESTATUS[0]}" "export $mode $dtype"
    $EMBDEPLOY validate "$WORK/$dtype-$mode" --provider $P --json > "$OUT/validate-$dtype-$mode.json"
    check $? "validate $mode $dtype"
  done
done
fi

if want bench32; then
step "bench fp32 on CUDA (IO binding), session cost, 4 tenants"
$EMBDEPLOY bench "$WORK"/fp32-{merged,split,swap} --providers $P --rounds $R --sessions 4 \
  --report-md "$OUT/minilm-k1000-cuda.md" --plot "$OUT/minilm-k1000-cuda.png" \
  --save-baseline "$OUT/minilm-k1000-cuda-baseline.json" --json > "$OUT/minilm-k1000-cuda.json"
check $? "bench fp32"
fi
if want bench16; then
step "bench fp16 on CUDA"
$EMBDEPLOY bench "$WORK"/fp16-{merged,split,swap} --providers $P --rounds $R --no-memory \
  --report-md "$OUT/minilm-k1000-cuda-fp16.md" --plot "$OUT/minilm-k1000-cuda-fp16.png" \
  --save-baseline "$OUT/minilm-k1000-cuda-fp16-baseline.json" --json > "$OUT/minilm-k1000-cuda-fp16.json"
check $? "bench fp16"
fi
if want gate; then
step "gate: the fp32 run against the baseline it wrote (must pass)"
$EMBDEPLOY bench "$WORK"/fp32-{merged,split,swap} --providers $P --no-memory --rounds 15 \
  --baseline "$OUT/minilm-k1000-cuda-baseline.json" --max-regression 0.10 > "$OUT/gate.log" 2>&1
check $? "gate"
tail -5 "$OUT/gate.log"
fi

if want train; then
step "training on the GPU"
$PYTHON perf/bench_train.py --device $P --json "$OUT/train-cuda.json" > "$OUT/train-cuda.md"
check $? "bench_train"
cat "$OUT/train-cuda.md"
fi

step "summary"
grep -h "^| " "$OUT/minilm-k1000-cuda.md" 2>/dev/null | head -40
grep -h "^| " "$OUT/minilm-k1000-cuda-fp16.md" 2>/dev/null | head -24
echo "status $status"
exit $status
