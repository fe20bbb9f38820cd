"""Compile before you rent (MaxText's train_compile): compile the real train step for a mesh from
ShapeDtypeStructs alone, so sharding and memory errors show on a laptop. No weights are allocated.

  python -m lmjax.aot --config=configs/pretrain.py:size=8b --topology=v5p-64
  python -m lmjax.aot --config=configs/pretrain.py:size=1b --devices=8 --accelerator=h100

--topology=NAME (v4-N, v5e-N / v5litepod-N, v5p-N, v6e-N, 2xv5p-128, ...; lmjax/topology.py) compiles
with the TPU compiler itself (libtpu: pip install -e '.[tpu]'), for that slice's devices:
its memory analysis per device against the chip's HBM gives the verdict (a RESOURCE_EXHAUSTED becomes
"does not fit" with the shortfall). Otherwise N fake CPU devices stand in (XLA's host-platform device
count) and --accelerator names the memory to hold the CPU compiler's figures against.

The step-time estimate is a roofline from the model's own counts, labelled so: the compiler's cost
analysis counts a scanned layer body once (benchmarks/tpu_aot_NOTES.md), so its FLOPs are not used.
  compute  executed FLOPs per device / chip peak: the model's 6N + causal attention
           (lmjax.model.flops_per_token) plus the forward its remat policy recomputes
           (lmjax.model.executed_flops_per_token)
  memory   (arguments + outputs + 2 x temporaries) per device / chip HBM bandwidth
  estimate max(compute, memory); MFU bound = model FLOPs / chip peak / estimate (0.81-0.83 for
           1b-70b with full remat when compute-bound: the rest of the executed FLOPs are the
           recomputed forward). Real steps are slower (on the H200 the `1b` step measured 2.6x its
           estimate: benchmarks/RESULTS.md).
"""
from __future__ import annotations

import os
import sys

if __name__ == '__main__':  # must happen before jax starts
  _n = next((a.split('=', 1)[1] for a in sys.argv if a.startswith('--devices=')), '8')
  os.environ.setdefault('XLA_FLAGS', f'--xla_force_host_platform_device_count={_n}')

import jax
import ml_collections

from lmjax import batch as batch_lib, errors, model, sharding, steps as steps_lib, topology

GIB = 2 ** 30
# Memory per device and peaks of accelerators without a TPU topology (vendor datasheets):
# (HBM bytes, dense bf16 FLOP/s, HBM bytes/s).
GPUS = {
    'h100': (80e9, 989e12, 3.35e12), 'h200': (141e9, 989e12, 4.8e12), 'a100': (80e9, 312e12, 2.0e12),
    'b200': (180e9, 2250e12, 8.0e12),
}


def lower_train_step(config: ml_collections.ConfigDict, devices):
  """The train step lowered for a mesh over `devices`, and the Steps it came from."""
  mesh = sharding.make_mesh(config.mesh, devices)
  # The loss's fields join the batch (offline distillation's top-k) or come as an extra argument
  # (online: the teacher's params, its shapes from its run's config.json): lmjax.losses.Needs.
  steps = steps_lib.build(config, mesh, model.resolve(config.model).vocab_size)
  batch = batch_lib.abstract(config.train.batch_size, config.train.seq_len, sharding.batch_sharding(mesh),
                             extra=steps.needs.batch_fields)
  extra = (steps.needs.step_arg,) if steps.needs.step_arg is not None else ()
  with jax.set_mesh(mesh):
    return steps.train_step.lower(steps.abstract_state, batch, *extra), steps


def compile_train_step(config: ml_collections.ConfigDict, devices):
  """Lowers and compiles the train step for a mesh over `devices`; returns the compiled executable."""
  lowered, _ = lower_train_step(config, devices)
  return lowered.compile()


def accelerator(name: str) -> tuple[float, float, float]:
  """(HBM bytes per device, peak bf16 FLOP/s, HBM bytes/s) of a GPU name or a TPU generation."""
  key = name.lower()
  if key in GPUS:
    return GPUS[key]
  generation = topology.GENERATIONS.get(topology.ALIASES.get(key, key))
  if generation is None:
    raise errors.ConfigError(f'--accelerator={name!r}: expected one of '
                             f'{sorted(GPUS) + sorted(topology.GENERATIONS)}')
  return generation.hbm_available_bytes, generation.peak_bf16_flops, generation.hbm_bytes_per_s


def estimate(config, n_devices: int, parts_bytes: dict, peak_flops: float, hbm_bytes_per_s: float) -> dict:
  """The roofline estimate of the module docstring, per step."""
  args = model.resolve(config.model)
  tokens = config.train.batch_size * config.train.seq_len
  useful = model.flops_per_token(args, config.train.seq_len) * tokens / n_devices
  executed = model.executed_flops_per_token(args, config.train.seq_len) * tokens / n_devices
  moved = parts_bytes['arguments'] + parts_bytes['outputs'] + 2 * parts_bytes['temporaries']
  compute, memory = executed / peak_flops, moved / hbm_bytes_per_s
  step = max(compute, memory)
  return dict(compute_s=compute, memory_s=memory, step_s=step, mfu=useful / peak_flops / step,
              tokens_per_s=tokens / step)


def report(config: ml_collections.ConfigDict, *, topology_name: str = '', devices: int = 8,
           accelerator_name: str = '') -> list[str]:
  """Compiles and returns the report's lines (verdict, memory, estimate)."""
  if topology_name:
    target = topology.devices(topology_name)
    generation = topology.slice_spec(topology_name).generation
    peak, bandwidth = generation.peak_bf16_flops, generation.hbm_bytes_per_s
    lowered, _ = lower_train_step(config, target)
    compiled, memory = topology.try_compile(lowered)
    lines = [f'compiled for {topology_name}: {len(target)} devices ({generation.device_kind}), '
             f'mesh {dict(sharding.make_mesh(config.mesh, target).shape)}',
             f'memory per device: {memory}']
  else:
    visible = jax.devices()
    if len(visible) < devices:
      raise errors.ConfigError(f'--devices={devices} but only {len(visible)} devices are visible; set '
                               f'XLA_FLAGS=--xla_force_host_platform_device_count={devices} before jax starts')
    compiled = compile_train_step(config, visible[:devices])
    stats = compiled.memory_analysis()
    parts = {'arguments': stats.argument_size_in_bytes, 'outputs': stats.output_size_in_bytes,
             'aliased': stats.alias_size_in_bytes, 'temporaries': stats.temp_size_in_bytes,
             'code': stats.generated_code_size_in_bytes}
    lines = [f'compiled for {devices} devices (fake CPU devices: the CPU compiler\'s memory figures)',
             'per device: ' + ', '.join(f'{k} {v / GIB:.2f} GiB' for k, v in parts.items())]
    if not accelerator_name:
      return lines
    hbm, peak, bandwidth = accelerator(accelerator_name)
    memory = topology.MemoryReport(parts['arguments'] + parts['outputs'] - parts['aliased'] +
                                   parts['temporaries'] + parts['code'], int(hbm), parts)
    lines.append(f'on {accelerator_name}: {memory}')
  if compiled is not None:
    e = estimate(config, len(target) if topology_name else devices, memory.parts_bytes, peak, bandwidth)
    lines.append(f"estimate (roofline from the model's FLOPs and the compiled step's bytes, not a "
                 f"measurement): {e['step_s'] * 1e3:.0f} ms/step (compute {e['compute_s'] * 1e3:.0f}, "
                 f"memory {e['memory_s'] * 1e3:.0f}), {e['tokens_per_s']:,.0f} tokens/s, MFU <= {e['mfu']:.2f}")
  return lines


def main(config: ml_collections.ConfigDict) -> None:
  from absl import flags
  f = flags.FLAGS
  print('\n'.join(report(config, topology_name=f.topology, devices=f.devices,
                         accelerator_name=f.accelerator)))


if __name__ == '__main__':
  from absl import flags
  from lmjax import cli
  cli.define_flags(None)
  flags.DEFINE_integer('devices', 8, 'number of fake CPU devices to compile for (without --topology)')
  flags.DEFINE_string('topology', '', 'a TPU slice to compile for with the TPU compiler, e.g. v5p-64')
  flags.DEFINE_string('accelerator', '', 'without --topology: hold the memory against this device '
                      f'({", ".join(sorted(GPUS))}, v4, v5e, v5p, v6e)')
  cli.run(main)
