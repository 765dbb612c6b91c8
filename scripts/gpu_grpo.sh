#!/usr/bin/env bash
# All the GPU work of the GRPO issue in one call (about 5 minutes on one H100), right after
# scripts/gpu_sft.sh in the same device command:
#
#   bash scripts/gpu_grpo.sh SFT_DIR OUT_DIR [extra helpers.grpo flags, e.g. --smoke]
#
# SFT_DIR: the SFT checkpoint to start from (trained there with the gpu SFT profile if missing).
# OUT_DIR: gets at most 4 files: metrics.json, log.txt, grpo_curves.png, grpo_vs_sft.png (rewritten
# after each seed, so a run stopped by the 300 s timeout still leaves what it finished).
# It runs `python -m helpers.grpo --profile gpu`: the SFT start evaluated on val/test/ood, three
# GRPO seeds (each capped at the profile's max_seconds of training, then evaluated), and our loop's
# vs TRL GRPOTrainer's step time and rollout tokens/s on the same model and settings.
#
# Wheels: the ones scripts/gpu_wheels.sh put in .whl/ (carry `.whl`); skipped when gpu_sft.sh has
# already installed them into /tmp/site in this call. On the CPU, test it end to end with
#   PYTHON=.venv/bin/python bash scripts/gpu_grpo.sh /tmp/sft_ckpt /tmp/grpo_out --smoke
set -euo pipefail
SFT_DIR=${1:?usage: bash scripts/gpu_grpo.sh SFT_DIR OUT_DIR [flags]}
OUT_DIR=${2:?usage: bash scripts/gpu_grpo.sh SFT_DIR OUT_DIR [flags]}
shift 2
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ -z "${PYTHON:-}" ] && [ -d .whl ]; then
  if [ ! -d /tmp/site/trl ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  fi
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  [ -d .whl/cache ] && export QWENVL_CACHE=${QWENVL_CACHE:-$PWD/.whl/cache}
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT_DIR"
"$PY" -c "import torch, transformers, trl; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'cuda', torch.cuda.is_available())"
start=$(date +%s)
timeout "${GRPO_TIMEOUT:-300}" "$PY" -m helpers.grpo --profile gpu --sft "$SFT_DIR" --out "$OUT_DIR" "$@"
echo "gpu_grpo.sh: $(( $(date +%s) - start )) s wall; wrote: $(ls "$OUT_DIR" | tr '\n' ' ')"
