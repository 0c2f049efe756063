#!/usr/bin/env bash
# Every GPU test and GPU benchmark in one go, each one's raw output kept in a file named after the
# GPU and the day (e.g. bench/results/qlora_h100-80gb-hbm3_2026-12-01.txt), on a CUDA machine:
#
#   bash bench/gpu.sh [PYTHON] [FOLDER]     (defaults: .venv/bin/python, bench/results)
#
# Runs, in order: the tests marked gpu, bench/nf4.py's CUDA part, bench/qlora.py on a 7B-shaped
# model. Goes on after a failure; exits 1 if anything failed.
#
# On a GPU machine that cannot reach a package registry and lacks the pinned references, bring
# their wheels (from a machine that can, for the GPU machine's Python, here 3.12):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
#       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#       bitsandbytes==0.50.2 transformers==5.23.0 peft==0.21.2
#   python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl
#   PYTHONPATH=/tmp/site bash bench/gpu.sh python3 "$OUT"
set -uo pipefail
cd "$(dirname "$0")/.."
python=${1:-.venv/bin/python}
folder=${2:-bench/results}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
       TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
gpu=$("$python" -c "import sys, torch
if not torch.cuda.is_available():
    sys.exit(f'bench/gpu.sh: torch {torch.__version__} sees no CUDA GPU here')
import re  # 'NVIDIA H100 80GB HBM3' -> h100-80gb-hbm3
name = torch.cuda.get_device_name().lower().removeprefix('nvidia ')
print(re.sub('[^a-z0-9]+', '-', name))") || exit 1
day=$(date +%F)
mkdir -p "$folder"
failed=0
run() {   # run NAME COMMAND...: the command's output to the screen and to FOLDER/NAME_GPU_DAY.txt
    local name=$1; shift
    echo "== $* (into $folder/${name}_${gpu}_$day.txt)"
    { echo "# $*  ($(date -u +%FT%TZ))"; "$@" 2>&1; } | tee "$folder/${name}_${gpu}_$day.txt" \
        || failed=1
}
# only the files that hold such tests: the others import what a bare GPU machine may lack
run gpu_tests "$python" -m pytest -p no:cacheprovider --continue-on-collection-errors -m gpu \
    $(grep -l "mark.gpu" tests/*.py)
run nf4 "$python" bench/nf4.py --gpu --skip-cpu
run qlora "$python" bench/qlora.py --gpu
exit $failed
