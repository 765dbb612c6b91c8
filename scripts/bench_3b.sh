#!/usr/bin/env bash
# The representative Qwen2.5-VL-3B fine-tuning benchmark (scripts/bench_3b.py) in one call, ≈ 5 minutes
# on one H200: ~16 k-token packed rows of one-image conversations; full fine-tune (fp32 master
# weights and moments, bf16 autocast, fused AdamW), LoRA (frozen tower without autograd) and TRL's
# SFTTrainer on the same rows; tokens/s, MFU, HFU, time split, peak memory. Writes OUT_DIR/bench_3b.json
# and OUT_DIR/RUN.md.
#
#   bash scripts/gpu_wheels.sh                                   # here, once
#   bash scripts/bench_3b.sh "$OUT"                              # on an H200 (carry .whl)
#   bash scripts/bench_3b.sh "$OUT" --tokens 8192                # on an H100: full FT's 60 GB of states
#   BENCH_TINY=1 PY=.venv/bin/python bash scripts/bench_3b.sh /tmp/o   # CPU rehearsal, tiny config
set -uo pipefail
OUT_DIR=${1:?usage: bench_3b.sh OUT_DIR}
cd "$(dirname "$0")/.."
PY=${PY:-python3}
mkdir -p "$OUT_DIR"
if [ -z "${BENCH_TINY:-}" ] && ls .whl/*.whl >/dev/null 2>&1; then
  if ! PYTHONPATH=/tmp/site "$PY" -c "import transformers, trl, peft; assert transformers.__version__ == '5.24.0'" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  fi
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
TINY_FLAG=()
if [ -n "${BENCH_TINY:-}" ]; then TINY_FLAG=(--tiny); fi
"$PY" scripts/bench_3b.py --out "$OUT_DIR" "${TINY_FLAG[@]}" "${@:2}" 2>&1 | tee "$OUT_DIR/log.txt"
