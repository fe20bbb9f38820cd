"""lmjax.aot: the real train step compiled for TPU slices by the TPU compiler on this CPU host (needs
libtpu), verdicts against HBM; and the fake-CPU-device mode against a named accelerator."""
import importlib.util
import os

import jax
import pytest

from lmjax import aot, config as config_lib, errors, model, topology

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                                  reason="needs libtpu: pip install -e '.[tpu]'")


def tiny(**train):
  config = config_lib.load(os.path.join(ROOT, 'configs', 'pretrain.py'), 'runlocal=True')
  config.train.update(train)
  return config


@needs_libtpu
@pytest.mark.parametrize('name', ['v5e-8', 'v5p-8'])
def test_tiny_train_step_compiles_for_tpu_slices(name):
  lines = aot.report(tiny(), topology_name=name)
  assert lines[0].startswith(f'compiled for {name}: ')
  assert lines[1].startswith('memory per device: fits: ')
  assert lines[2].startswith("estimate (roofline from the model's FLOPs")


@needs_libtpu
def test_a_step_that_cannot_fit_is_a_verdict_with_the_shortfall():
  """The tiny model with 2M tokens a step and no remat on one v5e chip (15.75 GiB)."""
  config = tiny(batch_size=256, seq_len=8192)
  config.mesh.update(fsdp=1, data=1)
  lines = aot.report(config, topology_name='v5e-1')
  assert lines[1].startswith('memory per device: does not fit: needs ') and 'short by' in lines[1]
  assert len(lines) == 2  # no estimate for a program that did not compile


def test_fake_devices_against_a_named_accelerator():
  config = tiny()
  lines = aot.report(config, devices=8, accelerator_name='h100')
  assert lines[0].startswith('compiled for 8 devices') and lines[2].startswith('on h100: fits: ')
  with pytest.raises(errors.ConfigError, match=r"--accelerator='tpu9'"):
    aot.accelerator('tpu9')


def test_compiling_for_a_slice_without_libtpu_names_the_tpu_extra(monkeypatch):
  """jax's error without libtpu becomes errors.MissingExtra with the one install line."""
  def no_libtpu(**_):
    raise RuntimeError('TPU support not installed')
  monkeypatch.setattr(topology.topologies, 'get_topology_desc', no_libtpu)
  topology._devices.cache_clear()  # pylint: disable=protected-access
  try:
    with pytest.raises(errors.MissingExtra, match=r"compiling for TPU slice 'v5e-8' needs libtpu, which is "
                                                  r"not installed: pip install -e '\.\[tpu\]'$"):
      topology.devices('v5e-8')
  finally:
    topology._devices.cache_clear()  # pylint: disable=protected-access
  assert "pip install -e '.[tpu]')" in aot.__doc__ and '[test]' not in aot.__doc__


def test_estimate_is_the_roofline_of_the_model_counts():
  config = tiny()
  parts = dict(arguments=10e9, outputs=10e9, temporaries=5e9)
  e = aot.estimate(config, 4, parts, peak_flops=100e12, hbm_bytes_per_s=1e12)
  flops = model.flops_per_token(model.resolve(config.model), 128) * 8 * 128 / 4
  assert e['compute_s'] == pytest.approx(flops / 100e12) and e['memory_s'] == pytest.approx(30e9 / 1e12)
  assert e['step_s'] == max(e['compute_s'], e['memory_s'])
  config.model.remat = 'full'  # the recomputed forward costs time and is no model FLOP
  e = aot.estimate(config, 4, dict(parts, arguments=0, outputs=0, temporaries=0), 100e12, 1e12)
  executed = model.executed_flops_per_token(model.resolve(config.model), 128) * 8 * 128 / 4
  assert e['compute_s'] == pytest.approx(executed / 100e12) and e['mfu'] == pytest.approx(flops / executed)


@pytest.mark.parametrize('remat', ['full', 'dots_no_batch'])
def test_recomputed_flops_match_the_compilers_count(remat):
  """model.executed_flops_per_token's recomputation against XLA's cost analysis of the compiled step.
  The compiler counts a scanned layer body once, so two layers count as one; its XLA attention
  computes the whole score matrix (the model's count is causal, half of it), so the oracle doubles
  the attention term; `dots` recomputes no matmul (only elementwise work), so compiled(policy) -
  compiled(dots) is the recomputed matmul work alone."""
  seq = 128

  def counts(policy):
    config = config_lib.load(os.path.join(ROOT, 'configs', 'tiny.py'))
    config.model.update(n_layers=2, d_model=512, n_heads=4, n_kv_heads=2, d_ff=2048, remat=policy,
                        attention='xla')
    config.train.update(batch_size=2, seq_len=seq)
    config.mesh.update(data=1, fsdp=1, tensor=1)
    cost = aot.compile_train_step(config, jax.devices()[:1]).cost_analysis()
    args = model.resolve(config.model)
    return ((cost[0] if isinstance(cost, list) else cost)['flops'] / (2 * seq),
            model.executed_flops_per_token(args, seq) - model.flops_per_token(args, seq), args)

  compiled, ours, args = counts(remat)
  baseline, none, _ = counts('dots')
  attention_forward = 2 * args.n_heads * args.head_dim * seq  # one layer, causal
  expected = ours / args.n_layers + attention_forward  # + the masked half XLA computes too
  assert none == 0
  assert compiled - baseline == pytest.approx(expected, rel=0.03)


def test_offline_distillation_compiles_with_the_stores_fields_in_the_batch(tmp_path):
  """config.loss.name='kd' offline: the batch carries the teacher's top-k (k ids and log-probs a
  position), so the compiled step takes them (they were missing: a KeyError)."""
  config = tiny()
  config.loss.name = 'kd'
  config.loss.kd.update(teacher='lmjax:' + str(tmp_path / 'teacher'), store=str(tmp_path / 'topk'), k=8)
  lowered, _ = aot.lower_train_step(config, jax.devices()[:8])
  assert [s.shape for s in jax.tree.leaves(lowered.in_avals[0][1]['teacher_ids'])] == [(8, 128, 8)]
  lowered.compile()
