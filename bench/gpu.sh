#!/usr/bin/env bash
# The GPU benchmark in one command, about 8 minutes on an H100/H200:
# - the cifar10 UNet (35.7M) in bf16 at batch 128 against the PyTorch peer (diffusers UNet2DModel, eager and
#   torch.compile, autocast bf16) on CUDA in the same run, alternating, with MFU and the ratio ours/peer;
# - DiT-XL/2 (675M) in bf16 at batch 256 on 32x32x4 latents (configs/imagenet256_dit.py's step, ImageNet
#   256px in SD latents), XLA and cuDNN attention, with MFU;
# - one SD 1.5-shaped UNet forward (859M, random weights) at 64x64x4 latents, batch 1 and 2, bf16, beside
#   diffusers' UNet2DConditionModel.
#
#   bash bench/gpu.sh fetch   # on a machine with pip access: the wheels a GPU image may lack, into .whl/
#   bash bench/gpu.sh         # on the GPU machine: installs .whl/*.whl (if any) into /tmp/site, runs all
#
# Needs jax with CUDA, flax, optax, orbax, torch with CUDA and diffusers in $PYTHON (default python3). JSON
# and logs go to $OUT if set, else bench/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [[ "${1:-}" == fetch ]]; then
  grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  # Pure-Python wheels; the CUDA image has jax, flax, optax, torch, huggingface-hub and safetensors.
  exec "$PY" -m pip download --no-deps --only-binary=:all: -d .whl \
    ml_collections==1.1.0 diffusers==0.42.1 importlib_metadata==8.7.0
fi

if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
# Ours and the peer hold the GPU at once (they alternate): no preallocation of 75% by XLA.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
RESULTS=${OUT:-bench/results}
mkdir -p "$RESULTS"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$RESULTS/gpu-info.txt"
"$PY" -c "import jax, torch, diffusers, flax; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, \
'torch', torch.__version__, 'diffusers', diffusers.__version__)" 2>&1 | tee -a "$RESULTS/gpu-info.txt" || exit 1

status=0
run() {  # run NAME SECONDS ARGS...: one bench, its log beside the JSON; a failure does not stop the others.
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*"
  timeout "$limit" "$PY" "$@" --out "$RESULTS/gpu-$name.json" 2>&1 | tee "$RESULTS/gpu-$name.log"
  local rc=${PIPESTATUS[0]}
  [[ $rc == 0 ]] || { echo "== $name failed with status $rc"; status=1; }
}

PEER=(--peer --peer_python "$PY" --peer_modes peer_eager,peer_compiled --peer_dtypes bfloat16)
run unet-b128 170 bench/train.py --config configs/cifar10.py --batch_sizes 128 --variants bf16 \
  --steps 30 --rounds 3 "${PEER[@]}"
run dit-xl2-b256 210 bench/train.py --config configs/imagenet256_dit.py --latent_shape 32,32,4 \
  --batch_sizes 256 --variants bf16,bf16_cudnn --steps 12 --rounds 2
run sd-unet 130 bench/sd_unet.py --dtypes bfloat16 --batch_sizes 1,2 --steps 10 --peer --peer_python "$PY"
exit $status
