#!/usr/bin/env bash
# Every GPU check in one call, sized for < 8 minutes on one H200 (docs/benchmarks.md):
#   1. lmexp.bench for model=large|medium|small and the 2017 port's preset, each at fp32 and
#      bf16 (the port variant always runs the port's own fp32 loop), medium with weight drop,
#      then large at bf16 with torch.compile and with CUDA graphs, and the Transformer
#      (experiment=transformer, lmexp's step only: the baselines are LSTM loops);
#   2. the CUDA-only tests (bf16 and fp16 curves, CUDA graphs against eager, weight drop on
#      cuDNN without flatten_parameters warnings);
#   3. one real epoch of model=large at bf16 through lmexp.train (end-to-end words/s, test ppl).
# Results: $OUT/gpu_bench.json (every bench's JSON, by name) and $OUT/gpu_bench.log. Each step
# has its own time limit and the whole a deadline; a failed step prints FAILED and the rest go
# on. Needs PTB in DATA_ROOT and, on a bare machine, the wheels scripts/gpu_prepare.sh puts in
# .whl/ (hydra-core, omegaconf, antlr4). MLflow is not needed (logger=none).
#   DATA_ROOT=.ptb OUT=bench-gpu bash scripts/gpu_bench.sh
# SMOKE=1 runs the same steps on any machine at toy sizes, skipping the CUDA-only ones, and the
# bf16 ones on a CPU without a bf16 LSTM (the test suite does this, so the script is known to
# work before a GPU session spends time on it).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-gpu}
DATA_ROOT=${DATA_ROOT:-.ptb}
PYTHON=${PYTHON:-python3}
SMOKE=${SMOKE:-0}
DEADLINE=${DEADLINE:-450}  # seconds; steps that would start later are skipped
WORK=$(mktemp -d "${TMPDIR:-/tmp}/lmexp-gpu.XXXXXX")
mkdir -p "$OUT"
START=$SECONDS

main() {
if ! "$PYTHON" -c "import hydra, omegaconf" 2>/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" .whl/*.whl || exit 1
  export PYTHONPATH=$WORK/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

if [ "$SMOKE" = 1 ]; then
  DATA=(data=tiny trainer.threads=1)
  SIZE=(model.hidden_size=32 trainer.num_steps=5 trainer.batch_size=4)
  BENCH=(bench.warmup_batches=1 bench.batches=2 bench.eval_batches=2 bench.repeats=1)
  TRAIN=(trainer.limit_train_batches=3 trainer.limit_eval_batches=3)
else
  DATA=(data.root="$DATA_ROOT")
  SIZE=()
  BENCH=(bench.warmup_batches=10 bench.batches=100 bench.eval_batches=40)
  TRAIN=()
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'gpu', torch.cuda.is_available())"

step() {  # limit_s name command...: run unless past the deadline; report how it ended
  local limit=$1 name=$2 left=$((DEADLINE - (SECONDS - START)))
  shift 2
  if [ "$left" -lt 20 ]; then echo "SKIPPED $name (deadline)"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name ($((SECONDS - START)) s)"
  timeout "$limit" "$@" || echo "FAILED $name (exit $?)"
}
bench() {  # name overrides...
  local name=$1
  shift
  step 120 "$name" "$PYTHON" -m lmexp.bench "$@" "${DATA[@]}" "${SIZE[@]}" "${BENCH[@]}" \
    logger=none bench.output="$WORK/$name.json" hydra.run.dir="$WORK/hydra/$name"
}

PRECISIONS=(fp32 bf16)
TRAIN_PRECISION=bf16
if [ "$SMOKE" = 1 ] && ! "$PYTHON" -c "from lmexp.engine.runtime import cpu_bf16_lstm_supported as s; raise SystemExit(not s())"; then
  echo "SKIPPED the bf16 steps: this CPU's oneDNN has no bf16 LSTM (lmexp refuses bf16 here)"
  PRECISIONS=(fp32)
  TRAIN_PRECISION=fp32
fi
# the _alloc variants are left out: lmexp's allocator setting is a CPU one (keep_freed_memory)
for preset in model=large experiment=pytorch_port model=medium model=small; do
  for precision in "${PRECISIONS[@]}"; do
    bench "${preset#*=}_$precision" "$preset" trainer.precision=$precision \
      "bench.variants=[lmexp,stock,port,cell_loop]"
  done
done
bench medium_weight_drop model=medium dropout=weight_drop "bench.variants=[lmexp,port]"
bench transformer experiment=transformer "bench.variants=[lmexp]"  # model.arch=transformer
if [ "$SMOKE" = 1 ]; then
  echo "SKIPPED the CUDA-only steps (SMOKE=1)"
else
  step 90 cuda_tests "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_loop.py \
    tests/test_rnn.py -k cuda
  bench large_bf16_compile model=large trainer.precision=bf16 trainer.compile=true \
    "bench.variants=[lmexp,port]"
  bench large_bf16_cuda_graphs model=large trainer.precision=bf16 trainer.cuda_graphs=true \
    "bench.variants=[lmexp,port]"
fi
step 180 train_large_bf16 "$PYTHON" -m lmexp.train model=large trainer.precision=$TRAIN_PRECISION \
  trainer.max_epochs=1 "${DATA[@]}" "${SIZE[@]}" "${TRAIN[@]}" logger=none \
  hydra.run.dir="$WORK/hydra/train_large_bf16"

"$PYTHON" - "$WORK" "$OUT/gpu_bench.json" <<'EOF'
import json, pathlib, sys
work, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
runs = {p.stem: json.loads(p.read_text()) for p in sorted(work.glob("*.json"))}
out.write_text(json.dumps(runs, indent=2) + "\n")
print(f"{len(runs)} bench results in {out}:", ", ".join(runs))
EOF
echo "flatten_parameters warnings seen: $(grep -c 'not part of single contiguous' "$OUT/gpu_bench.log")"
echo "done in $((SECONDS - START)) s"
}

main 2>&1 | tee "$OUT/gpu_bench.log"
