#!/usr/bin/env bash
# Run an lmjax command on every worker of a Cloud TPU VM slice (multi-host: one process per host).
#
#   launch/tpu_vm.sh NAME ZONE -- python -m lmjax.train --config=configs/pretrain.py:size=1b --workdir=gs://B/run
#
# Steps: pack this checkout (git archive HEAD), copy it to all workers, install it with the [tpu]
# extra, then start the command on all workers at once with LMJAX_DISTRIBUTED=auto, so that
# lmjax.distributed.initialize() lets JAX find the slice's other hosts. The workdir must be shared
# storage (gs://...) so that checkpoints written by all hosts land in one place.
# Create the slice first, e.g.:
#   gcloud compute tpus tpu-vm create NAME --zone=ZONE --accelerator-type=v5p-32 --version=v2-alpha-tpuv5
set -euo pipefail
if [ $# -lt 4 ] || [ "$3" != "--" ]; then
  echo "usage: $0 NAME ZONE -- COMMAND..." >&2; exit 2
fi
name=$1 zone=$2; shift 3
cd "$(dirname "$0")/.."
git archive --format=tar.gz -o /tmp/lmjax.tar.gz HEAD
gcloud compute tpus tpu-vm scp /tmp/lmjax.tar.gz "$name":~/lmjax.tar.gz --zone="$zone" --worker=all
gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="\
  rm -rf ~/lmjax && mkdir ~/lmjax && tar -xzf ~/lmjax.tar.gz -C ~/lmjax && cd ~/lmjax && \
  python3 -m pip install -q -e '.[tpu]' && LMJAX_DISTRIBUTED=auto $(printf '%q ' "$@")"
