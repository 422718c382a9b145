#!/usr/bin/env bash
# GPU throughput in one call: lmexp.bench for model=small|medium|large and the 2017 port's
# preset, each at fp32 and bf16 (the port variant always runs the port's fp32 loop), plus
# large at bf16 with torch.compile. Writes one JSON per run into $OUT. Sized for < 8 minutes
# on one H200. Needs PTB (DATA_ROOT) and, on a bare machine, hydra-core/omegaconf wheels in
# .whl/ (see docs/benchmarks.md); MLflow is not needed by the bench.
#   DATA_ROOT=/path/to/ptb OUT=bench-gpu bash scripts/gpu_bench.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-gpu}
DATA_ROOT=${DATA_ROOT:-$HOME/.cache/lmexp/ptb}
mkdir -p "$OUT"
if ! python3 -c "import hydra, omegaconf" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())" | tee -a "$OUT/gpu.txt"

bench() {  # name, overrides...
  local name=$1; shift
  echo "== $name"
  timeout 150 python3 -m lmexp.bench "$@" data.root="$DATA_ROOT" logger=none \
    bench.warmup_batches=10 bench.batches=60 bench.eval_batches=40 \
    bench.output="$OUT/$name.json" hydra.run.dir="$OUT/hydra/$name" 2>&1 | grep -v "^\[" || echo "FAILED $name"
}
for preset in model=small model=medium model=large experiment=pytorch_port; do
  for precision in fp32 bf16; do
    bench "${preset#*=}_$precision" "$preset" trainer.precision=$precision
  done
done
bench large_bf16_compile model=large trainer.precision=bf16 trainer.compile=true bench.variants=[lmexp,port]
bench large_bf16_cudagraphs model=large trainer.precision=bf16 trainer.cuda_graphs=true bench.variants=[lmexp,port]
ls -l "$OUT"
