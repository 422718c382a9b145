#!/usr/bin/env bash
# How a local parallel sweep shares the cores (docs/benchmarks.md, "Parallel sweeps on one
# machine"): the same two PTB small jobs (BATCHES training batches each, a short validation)
#   1. one after the other (the basic launcher),
#   2. two at once with trainer.threads unset (lmexp gives each cores // 2 threads),
#   3. two at once with trainer.threads=<all physical cores> each (what unset used to mean).
# Prints each job's words/s and each sweep's wall time and total words/s. Run it on a quiet
# machine: anything else on the cores skews all three.
#   bash scripts/sweep_threads_bench.sh [PTB folder] [batches]
set -euo pipefail
PTB=${1:-../shared/data/ptb}
BATCHES=${2:-300}
CORES=$(python -c "import psutil; print(psutil.cpu_count(logical=False) or 1)")
WORK=$(mktemp -d)
N=0
trap 'rm -rf "$WORK"' EXIT
JOB=(model=small "data.root=$(realpath "$PTB")" trainer.max_epochs=1
     "trainer.limit_train_batches=$BATCHES" trainer.limit_eval_batches=20 trainer.progress=false
     logger.kind=none "dropout.dp_keep_prob=0.35,0.5")

sweep() {  # name, then launcher overrides
  local name=$1; shift
  local start end dir
  dir=$WORK/sweep$((++N))
  start=$(date +%s.%N)
  python -m lmexp.train -m "${JOB[@]}" "$@" "hydra.sweep.dir=$dir" > "$dir.log" 2>&1
  end=$(date +%s.%N)
  python - "$dir.log" "$name" "$start" "$end" "$BATCHES" <<'EOF'
import re, sys
log, name, start, end, batches = sys.argv[1], sys.argv[2], *map(float, sys.argv[3:])
wps = [float(w) for w in re.findall(r"Epoch 1: .*?, (\d+) words/s", open(log).read())]
threads = sorted(set(re.findall(r"device cpu, (\d+) threads", open(log).read())))
words = len(wps) * batches * 20 * 20  # model=small: batch 20 x 20 steps
print(f"{name:<34} threads/job {','.join(threads):<4} per-job words/s "
      f"{', '.join(f'{w:,.0f}' for w in wps):<16} wall {end - start:6.1f} s  "
      f"sweep {words / (end - start):,.0f} words/s (wall, incl. start-up and validation)")
EOF
}

echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $CORES physical cores"
sweep "serial (basic launcher)"
sweep "joblib n_jobs=2, threads unset" hydra/launcher=joblib hydra.launcher.n_jobs=2
sweep "joblib n_jobs=2, threads=$CORES" hydra/launcher=joblib hydra.launcher.n_jobs=2 \
  "trainer.threads=$CORES"
