#!/usr/bin/env bash
# All GPU measurements of SFT in one call (≈ 5 minutes on one H100):
#   1. install the carried wheels (.whl/, made here by scripts/gpu_wheels.sh) into /tmp/site;
#   2. train the gpu profile of helpers.sft (≤ 3 min, capped by its max_seconds), evaluate
#      before/after on val/test/ood beside the image-blind baselines (n, p-values), save the checkpoint to CKPT_DIR;
#   3. tokens/s of our loop vs TRL SFTTrainer (same model, batches, collator, loss);
#   4. qwen25vl_3b_config() with random weights, bf16, gradient checkpointing: step time,
#      tokens/s, MFU (vs 989 TFLOP/s dense bf16) and peak memory, full FT and LoRA.
# Writes OUT_DIR/metrics.json, OUT_DIR/log.txt, OUT_DIR/sft_training.png, OUT_DIR/sft_examples.png.
#
#   bash scripts/gpu_wheels.sh                                        # here, once
#   bash scripts/gpu_sft.sh "$OUT" /tmp/sft_ckpt                      # on the GPU machine (carry .whl)
#   SFT_SMOKE=1 PY=.venv/bin/python bash scripts/gpu_sft.sh /tmp/o /tmp/c   # tiny CPU rehearsal
set -uo pipefail
OUT_DIR=${1:?usage: gpu_sft.sh OUT_DIR CKPT_DIR}
CKPT_DIR=${2:?usage: gpu_sft.sh OUT_DIR CKPT_DIR}
cd "$(dirname "$0")/.."
PY=${PY:-python3}
mkdir -p "$OUT_DIR" "$CKPT_DIR"
if [ -z "${SFT_SMOKE:-}" ] && ls .whl/*.whl >/dev/null 2>&1; then
  if ! PYTHONPATH=/tmp/site "$PY" -c "import transformers, trl, peft; assert transformers.__version__ == '5.24.0'" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  fi
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 QWENVL_PROFILE=gpu TOKENIZERS_PARALLELISM=false
SMOKE_FLAG=()
if [ -n "${SFT_SMOKE:-}" ]; then SMOKE_FLAG=(--smoke); export QWENVL_PROFILE=cpu; fi
"$PY" scripts/gpu_sft.py --out "$CKPT_DIR" --report "$OUT_DIR" "${SMOKE_FLAG[@]}"
