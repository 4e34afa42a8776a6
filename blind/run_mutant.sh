#!/bin/bash
# usage: blind/run_mutant.sh NN test-files...  (applies the mutant, runs the files, reverts)
cd /work/blindC
. /work/venv/bin/activate
n=$1; shift
test -z "$(git status --short src)" || { echo "tree not clean"; exit 3; }
git apply blind/mutants/$n.patch || exit 4
start=$(date +%s)
OMP_NUM_THREADS=1 PYTHONPATH=/work/blindC/src nice -n 5 timeout 1500 python -m pytest -q -x -p no:cacheprovider "$@" 2>&1 | tail -4
rc=${PIPESTATUS[0]}
echo "mutant $n rc=$rc wall=$(( $(date +%s) - start ))s"
git checkout -- src
git status --short src
