#!/usr/bin/env bash
# Stage, on a machine with the package registry, what scripts/gpu_bench.sh needs on a bare GPU
# machine that has torch and CUDA but no registry: the pure-Python wheels of hydra-core,
# omegaconf and antlr4 (the versions installed here) in .whl/, and a PTB copy in .ptb/. Both
# folders are git-ignored; carry them to the GPU machine with the working tree.
#   bash scripts/gpu_prepare.sh [PTB_FOLDER]      (default ../shared/data/ptb)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PTB=${1:-../shared/data/ptb}
versions=$("$PYTHON" - <<'EOF'
from importlib.metadata import version
print(" ".join(f"{n}=={version(n)}" for n in ("hydra-core", "omegaconf", "antlr4-python3-runtime")))
EOF
)
rm -rf .whl && mkdir .whl
# antlr4-python3-runtime 4.9.3 is published as an sdist only: `pip wheel` builds it (pure Python).
# shellcheck disable=SC2086
"$PYTHON" -m pip wheel -q --no-deps -w .whl $versions
rm -rf .ptb && mkdir .ptb
for split in train valid test; do
  cp "$PTB/ptb.$split.txt" .ptb/
done
PYTHONPATH=. "$PYTHON" -c "from pathlib import Path; from lmexp.data import check_ptb_folder; check_ptb_folder(Path('.ptb'))"
ls -l .whl .ptb
