#!/usr/bin/env bash
# Runs a self_flow job on every worker of an existing Cloud TPU VM slice.
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a CONFIG=configs/c2i.py WORKDIR=gs://BUCKET/run \
#     bash launch/tpu_pod.sh [--config.key=value ...]
# Copies this checkout to every worker, installs requirements plus jax[tpu] in a venv there, and
# starts the same command on all hosts; main.py calls jax.distributed.initialize() on TPU pods.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR (gs://...)}"
CONFIG="${CONFIG:-configs/c2i.py}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ARGS="$*"

tar -C "$REPO_ROOT" --exclude=.venv --exclude=workdirs --exclude=data --exclude=.git \
  -czf /tmp/self_flow.tgz .
gcloud compute tpus tpu-vm scp /tmp/self_flow.tgz "$TPU_NAME":/tmp/self_flow.tgz \
  --zone "$ZONE" --worker=all
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e
  mkdir -p ~/self_flow && tar -C ~/self_flow -xzf /tmp/self_flow.tgz && cd ~/self_flow
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/pip install -q -r requirements.txt 'jax[tpu]==0.10.2'
  .venv/bin/python -m self_flow.main --config=$CONFIG --workdir=$WORKDIR --distributed $ARGS
"
