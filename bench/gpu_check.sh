#!/usr/bin/env bash
# The training-step benchmark's GPU rows, as one prepared script for a machine with a CUDA GPU that
# cannot reach a package registry or a model hub.
#
#   bash bench/gpu_check.sh prepare   # here, with a registry: wheels into .whl/, the SmolLM2 tokenizer
#                                     # into .device-cache/ (both git-ignored; about 18 MB together)
#   bash bench/gpu_check.sh dry       # here, on the CPU: the same commands on random-tiny, 2 steps
#   bash bench/gpu_check.sh run       # on the GPU machine, with .whl/ and .device-cache/ copied beside
#
# `.whl/` and `.device-cache/` belong in .git/info/exclude; the run copies them along (a device tool's
# `carry`). About 17 short processes: give the call 9-10 minutes; rows finished before a cut-off keep
# their JSON.
#
# `run` installs the carried wheels into /tmp/site (the packages adaptlab needs that a plain CUDA
# PyTorch image lacks, and the transformers and peft versions it is tested with), points adaptlab's
# cache at a copy of .device-cache (the random-weight models are built there from the tokenizer), and
# runs bench/train_step.py on random-weight models of smollm2-135m's and a ~1B Llama's shape (the
# embedded model's weights and ../shared/data need not travel: the step's text falls back to the
# standard library's source), LoRA r=16 all-linear and full fine-tuning, bf16 autocast and fp32, each
# loop in its own process, with peak memory as torch's peak allocated bytes. Rows run most important
# first, each into its own JSON under $OUT (or bench/results/gpu/), with the whole log in $OUT/log, so
# a run cut short keeps what it finished. bitsandbytes (43 MB) stays out of the wheels; QLoRA's GPU
# rows need it carried in a call of its own: `GPU_CHECK_QLORA=1` adds them when it imports.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-run}"
WHEELS=(pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing_extensions==4.16.0 gguf==0.19.0 liger-kernel==0.8.5 transformers==5.24.0 peft==0.21.2)

prepare() {
  local platforms=()
  for n in 2_28 2_27 2_24 2_17; do platforms+=(--platform "manylinux_${n}_x86_64"); done
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
  local tok  # built from the embedded SmolLM2 GGUF on first use
  tok="$(python3 -c 'from adaptlab.models import _smollm2_tokenizer_dir; print(_smollm2_tokenizer_dir())')"
  mkdir -p .device-cache/v1/tokenizers
  rm -rf .device-cache/v1/tokenizers/smollm2
  cp -r "$tok" .device-cache/v1/tokenizers/smollm2
  du -sh .whl .device-cache
}

bench() {  # name, then train_step.py's arguments
  local name="$1"
  shift
  echo "== $name: python bench/train_step.py $*"
  python3 bench/train_step.py "$@" "${extra[@]}" --out "$dest/$name.json" || echo "== $name failed (exit $?)"
}

case "$mode" in
  prepare)
    prepare
    exit 0
    ;;
  dry)
    dest="$(mktemp -d)"
    steps=2
    models=(random-tiny random-tiny)
    long=(--batch 2 --seq-len 64)
    extra=(--no-live)  # the plumbing, not the figures
    ;;
  run)
    if [ -d .whl ]; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
      export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    dest="${OUT:-bench/results/gpu}"
    steps=8
    models=(random-smollm2-135m random-1b)
    long=(--batch 8 --seq-len 1024)
    extra=()
    ;;
  *)
    echo "usage: bash bench/gpu_check.sh prepare|dry|run" >&2
    exit 2
    ;;
esac

export PYTHONPATH="$PWD/src:$PWD/bench${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [ "$mode" = run ] && [ -d .device-cache ]; then
  export ADAPTLAB_CACHE=/tmp/adaptlab-cache
  mkdir -p "$ADAPTLAB_CACHE"
  cp -r .device-cache/. "$ADAPTLAB_CACHE/"
fi
mkdir -p "$dest"
exec > >(tee "$dest/log") 2>&1

date -u
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
python3 -c 'import sys, torch, transformers, peft; print("python", sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.version.cuda, "transformers", transformers.__version__, "peft", peft.__version__)'
python3 -c 'import liger_kernel; print("liger-kernel present")' 2>/dev/null || echo "liger-kernel absent"

small="${models[0]}" large="${models[1]}"
bench small_4x256_bf16 --model "$small" --only lora,full --precisions bf16 --steps "$steps"
bench large_8x1024_bf16 --model "$large" --only lora,full --precisions bf16 --steps "$steps" "${long[@]}"
bench small_8x1024_bf16 --model "$small" --only lora,full --precisions bf16 --steps "$steps" "${long[@]}"
bench small_4x256_fp32 --model "$small" --only lora --precisions fp32 --steps "$steps"
if [ "${GPU_CHECK_QLORA:-0}" = 1 ] && python3 -c 'import bitsandbytes' 2>/dev/null; then
  bench large_8x1024_qlora --model "$large" --only qlora --precisions bf16 --steps "$steps" "${long[@]}"
fi
bench large_profile_lora --model "$large" --only lora --precisions bf16 --steps 3 "${long[@]}" --profile
date -u
echo "results in $dest"
