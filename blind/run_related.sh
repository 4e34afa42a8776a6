#!/bin/bash
# run each mutant against its related test files; log to blind/related.log
cd /work/blindA
. /work/venv/bin/activate
declare -A FILES=(
 [01]="tests/test_lm_proxies.py" [02]="tests/test_lm_proxies.py" [03]="tests/test_lm_proxies.py"
 [04]="tests/test_lm_proxies.py" [05]="tests/test_lm_monitors.py tests/test_lm_proxies.py"
 [06]="tests/test_lm_block_likelihood.py tests/test_lm_monitors.py" [07]="tests/test_lm_sampler.py"
 [08]="tests/test_lm_sampler.py" [09]="tests/test_lm_sampler.py" [10]="tests/test_lm_block_likelihood.py"
 [11]="tests/test_lm_sft.py tests/test_lm_block_likelihood.py" [12]="tests/test_lm_justgrpo.py")
for nn in ${@:-01 02 03 04 05 06 07 08 09 10 11 12}; do
  git checkout -q -- src; git apply blind/mutants/$nn.patch || { echo "$nn APPLYFAIL"; continue; }
  t0=$(date +%s)
  out=$(OMP_NUM_THREADS=1 PYTHONPATH=/work/blindA/src nice -n 5 python -m pytest -q -x -p no:cacheprovider ${FILES[$nn]} 2>&1 | tail -4)
  t1=$(date +%s)
  echo "== $nn ($((t1-t0))s) ${FILES[$nn]}"; echo "$out" | grep -E "FAILED|passed|failed|error" 
  git checkout -q -- src
done
git status --short src
