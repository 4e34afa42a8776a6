#!/bin/bash
# full default suite on each given mutant; log to blind/full.log
cd /work/blindA
. /work/venv/bin/activate
for nn in "$@"; do
  git checkout -q -- src; git apply blind/mutants/$nn.patch || { echo "$nn APPLYFAIL"; continue; }
  t0=$(date +%s)
  out=$(OMP_NUM_THREADS=1 PYTHONPATH=/work/blindA/src nice -n 5 python -m pytest -q -x -p no:cacheprovider 2>&1 | tail -4)
  t1=$(date +%s)
  echo "== $nn full suite ($((t1-t0))s)"; echo "$out" | grep -E "FAILED|passed|failed|error"
  git checkout -q -- src
done
git status --short src
