#!/usr/bin/env bash
# The GPU run of the GRPO lesson in one call (a few minutes on one H100), after scripts/gpu_sft.sh:
#
#   bash scripts/gpu_grpo.sh OUT_DIR [extra scripts/grpo_experiment.py flags, e.g. --steps 2 --eval 6]
#
# It runs `scripts/grpo_experiment.py --profile gpu`: the gpu SFT profile stopped at the grpo
# profile's start_step (trained and cached first if missing), then for each of the three seeds GRPO
# and its compute-matched SFT control from that start, all three scored on the same test and OOD
# questions beside the image-blind baselines, best-of-G before/after, and TRL GRPOTrainer beside our
# loop for a few steps. OUT_DIR gets experiment.json and experiment.png.
#
# Wheels: the ones scripts/gpu_wheels.sh put in .whl/ (carry `.whl`); skipped when gpu_sft.sh has
# already installed them into /tmp/site in this call. Rehearse on the CPU with
#   PYTHON=.venv/bin/python QWENVL_PROFILE_OVERRIDE=cpu bash scripts/gpu_grpo.sh /tmp/grpo_out --steps 1 --eval 6 --seeds 0
set -euo pipefail
OUT_DIR=${1:?usage: bash scripts/gpu_grpo.sh OUT_DIR [flags]}
shift 1
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
timeout "${GRPO_TIMEOUT:-420}" "$PY" scripts/grpo_experiment.py --profile "${QWENVL_PROFILE_OVERRIDE:-gpu}" --out "$OUT_DIR" \
  --jobs 1 --trl-steps 4 "$@"
echo "gpu_grpo.sh: $(( $(date +%s) - start )) s wall; wrote: $(ls "$OUT_DIR" | tr '\n' ' ')"
