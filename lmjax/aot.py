"""Compile before you rent (MaxText's train_compile): compile the train step for a mesh of N devices
from ShapeDtypeStructs alone, so sharding and memory errors show on a laptop. No weights are allocated.

  python -m lmjax.aot --config=configs/pretrain.py:size=1b --devices=8 --config.train.batch_size=8

On a CPU-only machine the N devices are faked (XLA's host-platform device count); the report gives the
compiled step's per-device memory from XLA's memory analysis. The step is the one training runs
(lmjax/steps.py), for a tokenizer as large as the model's vocabulary.
"""
from __future__ import annotations

import os
import sys

if __name__ == '__main__':  # must happen before jax starts
  _n = next((a.split('=', 1)[1] for a in sys.argv if a.startswith('--devices=')), '8')
  os.environ.setdefault('XLA_FLAGS', f'--xla_force_host_platform_device_count={_n}')

import jax
import ml_collections

from lmjax import batch as batch_lib, model, sharding, steps as steps_lib


def compile_train_step(config: ml_collections.ConfigDict, devices):
  """Lowers and compiles the train step for a mesh over `devices`; returns the compiled executable."""
  mesh = sharding.make_mesh(config.mesh, devices)
  steps = steps_lib.build(config, mesh, model.resolve(config.model).vocab_size)
  batch = batch_lib.abstract(config.train.batch_size, config.train.seq_len,
                             sharding.batch_sharding(mesh))
  with jax.set_mesh(mesh):
    return steps.train_step.lower(steps.abstract_state, batch).compile()


def main(config: ml_collections.ConfigDict) -> None:
  from absl import flags
  n = flags.FLAGS.devices
  devices = jax.devices()
  if len(devices) < n:
    raise ValueError(f'--devices={n} but only {len(devices)} devices are visible; set '
                     f'XLA_FLAGS=--xla_force_host_platform_device_count={n} before jax starts')
  compiled = compile_train_step(config, devices[:n])
  memory = compiled.memory_analysis()
  print(f'compiled for {n} devices')
  if memory is not None:
    gib = 2 ** 30
    print(f'per device: arguments {memory.argument_size_in_bytes / gib:.2f} GiB, '
          f'temporaries {memory.temp_size_in_bytes / gib:.2f} GiB, '
          f'outputs {memory.output_size_in_bytes / gib:.2f} GiB')


if __name__ == '__main__':
  from absl import flags
  from lmjax import cli
  cli.define_flags(None)
  flags.DEFINE_integer('devices', 8, 'number of devices to compile for')
  cli.run(main)
