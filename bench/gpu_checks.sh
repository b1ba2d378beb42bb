#!/usr/bin/env bash
# The GPU checks of issues 11 and 12, as one script for a lent NVIDIA H100/H200
# (the device tool runs it from the repository root with $OUT collected back):
#   1. the CUDA tests (tests/test_cuda.py, the CUDA cases of tests/test_speed.py) + the compress tests;
#   2. 2:4 vs dense speed on LLaMA-2-7B-shaped blocks (bench/speed_gpu.py -> bench/SPEED.md);
#   3. streamed SparseGPT / D2Prune prunes of LLaMA-2-7B- and LLaMA-2-70B-shaped checkpoints with the
#      paper's 128 x 2048 calibration on the GPU (bench/scale.py -> bench/SCALE.md).
# The machine has no network: ../shared is a copy carried as .shared, a newer transformers as a wheel in .whl.
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}"
[ -e ../shared ] || ln -s "$PWD/.shared" ../shared
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; free -g | head -2
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"; } 2>&1 | tee "$OUT/env.txt"
T_TESTS=${T_TESTS:-110} T_SPEED=${T_SPEED:-150} T_SCALE=${T_SCALE:-300}
echo "== 1. tests"; SECONDS=0
timeout -k 5 "$T_TESTS" python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_speed.py \
  tests/test_compress.py -k "not smollm2" > "$OUT/tests.log" 2>&1; echo "rc=$? ${SECONDS}s"; tail -4 "$OUT/tests.log"
echo "== 2. 2:4 speed"; SECONDS=0
timeout -k 5 "$T_SPEED" python3 bench/speed_gpu.py --layers 2 --markdown "$OUT/speed_gpu.md" --json "$OUT/speed_gpu.json" \
  > "$OUT/speed.log" 2>&1; echo "rc=$? ${SECONDS}s"; tail -30 "$OUT/speed.log"
echo "== 3. scale"; SECONDS=0
timeout -k 5 "$T_SCALE" python3 bench/scale.py all --matrix "${MATRIX:-llama2-7b:4=sparsegpt+d2prune-k,llama2-70b:1=sparsegpt}" \
  --nsamples 128 --seqlen 2048 --extra="--stream on --device cuda" --markdown "$OUT/scale_gpu.md" --scratch /tmp/d2prune-scale \
  > "$OUT/scale.log" 2>&1; echo "rc=$? ${SECONDS}s"; grep -E "^\| |peak|error" "$OUT/scale.log" | tail -20
