#!/bin/bash
# Multi-host training on a Cloud TPU pod slice: the same main.py on every worker.
#   scripts/tpu_pod.sh TPU_NAME ZONE REPO_URL /mnt/runs/cifar10 [configs/cifar10.py [main.py flags...]]
# e.g. ... configs/cifar10_dit.py --config.mesh.fsdp=8 shards the state over 8 chips (README: "Large
# models and many devices").
# jax.distributed detects the pod by itself. The workdir must be one directory shared by all workers
# (e.g. a bucket mounted with gcsfuse at the same path on each), as every process restores from it.
set -euo pipefail
TPU_NAME=$1
ZONE=$2
REPO_URL=$3
WORKDIR=$4
CONFIG=${5:-configs/cifar10.py}
FLAGS=""
[ $# -le 5 ] || FLAGS=$(printf ' %q' "${@:6}")
gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" --worker=all --command="
  set -e
  [ -d ~/diffusion ] || git clone ${REPO_URL} ~/diffusion
  cd ~/diffusion
  python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt 'jax[tpu]'
  .venv/bin/python main.py --config=${CONFIG} --workdir=${WORKDIR}${FLAGS}
"
