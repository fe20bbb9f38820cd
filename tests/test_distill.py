"""Distillation end to end on a tiny teacher: the top-k store (encodings against full precision, bytes
per token from the files themselves, a killed dump resumed equal to a straight one, missing and
corrupt chunks named), offline KD equal to online KD (loss and gradients) for the same teacher and
batch, the tokenizer check, alpha and temperature by phase inside the train step, and a KD run of the
trainer resuming exactly."""
import dataclasses
import glob
import json
import os
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm

from lmjax import config as config_lib, errors, sharding, steps as steps_lib, train, trainer
from lmjax.distill import dump as dump_lib, store as store_lib

BATCH, SEQ, K = 8, 32, 16

CONFIG = textwrap.dedent('''
    from lmjax import config as config_lib, phases

    def get_config(arg=None):
      knobs = config_lib.parse_arg(arg, kd=False, mode='offline', store='', encoding='full',
                                   teacher='', steps=4, tokenizer='')
      c = config_lib.base()
      c.model.compute_dtype = 'float32'
      c.model.update(d_model=64, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=128)
      c.train.update(steps=knobs.steps, batch_size={batch}, seq_len={seq}, log_every=1,
                     eval_every=100, checkpoint_every=2, async_checkpoint=False, trackers=())
      c.data.sources = {{'a': dict(corpora='txt:{root}/a/*.txt', max_chars=0),
                         'b': dict(corpora='txt:{root}/b/*.txt', max_chars=0)}}
      c.data.cache_dir = '{root}/cache'
      c.data.tokenizer.vocab_size = 300
      c.data.tokenizer.path = knobs.tokenizer
      c.model.vocab_size = 384
      c.data.eval.holdout_chars = 500
      c.phases = phases.timeline(
          first=phases.phase(steps=2, shape='constant', weights={{'a': 1.0, 'b': 1.0}}),
          second=phases.phase(shape='constant', kd_alpha=1.0, kd_temperature=2.0))
      if knobs.kd:
        c.loss.name = 'kd'
        c.loss.kd.update(k={k}, teacher=knobs.teacher, mode=knobs.mode, store=knobs.store,
                         encoding=knobs.encoding, tail='bucket')
      else:  # the teacher: bigger than the student
        c.model.update(d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=256)
      return c
''')


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp('distill')
  rng = np.random.default_rng(0)
  for name, alphabet in (('a', 'abcdefghijklm'), ('b', 'nopqrstuvwxyz')):
    os.makedirs(root / name)
    for i in range(40):
      words = [''.join(rng.choice(list(alphabet), rng.integers(2, 8))) for _ in range(rng.integers(20, 120))]
      (root / name / f'{i}.txt').write_text(' '.join(words) + '\n')
  path = root / 'distill.py'
  path.write_text(CONFIG.format(batch=BATCH, seq=SEQ, k=K, root=root))
  teacher = str(root / 'teacher')
  train.run(config_lib.load(str(path), 'steps=6'), teacher)
  return str(path), teacher, root


def _config(setup, **knobs):
  path, teacher, _ = setup
  arg = ','.join(f'{k}={v}' for k, v in {'kd': True, 'teacher': f'lmjax:{teacher}', **knobs}.items())
  return config_lib.load(path, arg)


def _store_arrays(path):
  store = store_lib.Store.open(path)
  return {c: store.read_chunk(c) for c in range(store.num_chunks)}


def test_encodings_keep_ids_and_log_probs_and_cost_what_they_say(tmp_path):
  rng = np.random.default_rng(1)
  vocab, n = 128_256, 6
  logits = rng.normal(size=(n, SEQ, 512)) * 3
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))  # 512 of the vocabulary have mass
  order = np.argsort(-logp, -1)[..., :K]
  fields = {'teacher_ids': rng.permutation(vocab)[:512][order].astype(np.int32),
            'teacher_logprobs': np.take_along_axis(logp, order, -1).astype(np.float32),
            'teacher_tail': (1 - np.exp(np.take_along_axis(logp, order, -1)).sum(-1)).astype(np.float32)}
  fields['teacher_logprobs'][0, 0, -3:] = -np.inf  # k past the support
  for encoding in ('full', 'compact'):
    store = store_lib.Store.create(str(tmp_path / encoding), k=K, encoding=encoding, vocab_size=vocab,
                                   stream={'seq_len': SEQ}, rows=n, chunk_rows=4, teacher='t',
                                   tokenizer_digest='d')
    store.write_chunk(0, {k: v[:4] for k, v in fields.items()})
    store.write_chunk(1, {k: v[4:] for k, v in fields.items()})
    got = store_lib.Store.open(str(tmp_path / encoding)).read(0, n)
    np.testing.assert_array_equal(got['teacher_ids'], fields['teacher_ids'])
    tol = 0 if encoding == 'full' else 0.5 / store_lib.SCALE + 1e-6
    lp, want = got['teacher_logprobs'], fields['teacher_logprobs']
    assert np.array_equal(np.isinf(lp), np.isinf(want))
    np.testing.assert_allclose(lp[np.isfinite(lp)], want[np.isfinite(want)], atol=tol, rtol=0)
    np.testing.assert_allclose(got['teacher_tail'], fields['teacher_tail'], rtol=tol * 1.01 + 1e-7)
    files = [f for d in ('ids', 'logprobs', 'tail') for f in glob.glob(str(tmp_path / encoding / d / '*.*'))]
    data_bytes = sum(os.path.getsize(f) for f in files if not os.path.basename(f).startswith('.'))
    per_token = store_lib.bytes_per_token(K, encoding, vocab)
    # chunks are whole (the last one padded to chunk_rows)
    assert data_bytes == 2 * 4 * SEQ * per_token, (encoding, data_bytes)
  assert store_lib.bytes_per_token(128, 'full', vocab) == 1028
  assert store_lib.bytes_per_token(128, 'compact', vocab) == 128 * 17 // 8 + 256 + 2


def test_killed_dump_reruns_only_missing_chunks_and_equals_a_straight_one(setup, tmp_path):
  straight = str(tmp_path / 'straight')
  dump_lib.dump(_config(setup, store=straight), str(tmp_path / 'run'))
  resumed, written = str(tmp_path / 'resumed'), []

  def crash(c):
    written.append(c)
    if len(written) == 2:
      raise KeyboardInterrupt  # killed after its second chunk
  with pytest.raises(KeyboardInterrupt):
    dump_lib.dump(_config(setup, store=resumed), str(tmp_path / 'run'), on_chunk=crash)
  # A chunk whose arrays were written but not its marker (killed between the two): rewritten.
  with open(os.path.join(resumed, 'ids', '2.0.0'), 'wb') as f:
    f.write(b'\0' * 100)
  written.clear()
  dump_lib.dump(_config(setup, store=resumed), str(tmp_path / 'run'), on_chunk=written.append)
  assert written == [2, 3]
  a, b = _store_arrays(straight), _store_arrays(resumed)
  for c in a:
    for k in a[c]:
      np.testing.assert_array_equal(a[c][k], b[c][k])


def test_missing_or_corrupt_chunk_is_an_error_naming_it(setup, tmp_path):
  path = str(tmp_path / 'store')
  dump_lib.dump(_config(setup, store=path, encoding='compact'), str(tmp_path / 'run'))
  os.remove(os.path.join(path, 'done', '1.json'))
  with pytest.raises(errors.MissingFile, match=r'chunk 1 \(rows 8-15; .*ids/1\.0\.0.*\) is missing'):
    store_lib.Store.open(path).read(0, 16)
  with open(os.path.join(path, 'logprobs', '2.0.0'), 'r+b') as f:
    f.seek(100)
    f.write(b'\x01\x02\x03')
  with pytest.raises(errors.CheckpointError, match=r'chunk 2 \(rows 16-23; .*\) is corrupt: logprobs fails its checksum'):
    store_lib.Store.open(path).read(16, 8)
  os.remove(os.path.join(path, 'tail', '3.0'))
  with pytest.raises(errors.MissingFile, match=r'chunk 3 .*tail/3\.0 is missing'):
    store_lib.Store.open(path).read(24, 8)
  store_lib.Store.open(path).read(0, 8)  # the others read


def test_offline_and_online_kd_give_the_same_loss_and_gradients(setup, tmp_path):
  workdir = str(tmp_path / 'run')
  online_cfg = _config(setup, mode='online')
  mesh = sharding.make_mesh(online_cfg.mesh)
  pipeline = trainer.build_pipeline(online_cfg, workdir, whole_batches=True)
  online = steps_lib.build(online_cfg, mesh, pipeline.tokenizer.vocab_size, pipeline.sources)
  params = online.init(0)['params']
  t_params = online.needs.load()  # the teacher's params (kd.attach)
  step = 3
  batch = pipeline.batch(step)

  def loss_fn(p, b, tp):
    loss, weight, *_ = steps_lib.loss_sums(online.graphdef, p, b, online.loss, 2,
                                           online.needs.in_step if tp is not None else None, tp)
    return loss / weight
  grad = jax.jit(jax.value_and_grad(loss_fn))
  with jax.set_mesh(mesh):
    want, want_g = grad(params, batch, t_params)
    for encoding, rtol in (('full', 1e-5), ('compact', 1e-3)):
      store_path = str(tmp_path / encoding)
      store = dump_lib.dump(_config(setup, store=store_path, encoding=encoding), workdir)
      offline = {**batch, **store.read(step * BATCH, BATCH)}
      got, got_g = grad(params, offline, None)
      np.testing.assert_allclose(float(got), float(want), rtol=rtol)
      flat_w, flat_g = jax.tree.leaves(want_g), jax.tree.leaves(got_g)
      for w, g in zip(flat_w, flat_g):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol,
                                   atol=rtol * float(np.abs(np.asarray(w)).max()))


def test_tokenizer_or_vocabulary_differing_from_the_teacher_is_refused_naming_both(setup, tmp_path):
  _, teacher, root = setup
  other = tmp_path / 'other.model'
  text = [open(p).read() for p in sorted(glob.glob(str(root / 'a' / '*.txt')))]
  spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_prefix=str(tmp_path / 'other'),
                                 vocab_size=200, model_type='bpe', bos_id=1, eos_id=2, unk_id=0,
                                 pad_id=-1, minloglevel=2)
  config = _config(setup, store=str(tmp_path / 's'), tokenizer=str(other))
  with pytest.raises(errors.ConfigError, match=r'the teacher has .*cache/tokenizer-.*\(300 tokens\), the student '
                     r'.*other\.model \(200 tokens\)'):
    trainer.build_pipeline(config, str(tmp_path / 'run'))


def test_alpha_and_temperature_follow_the_phase_inside_the_train_step(setup, tmp_path):
  config = _config(setup, mode='online')
  mesh = sharding.make_mesh(config.mesh)
  pipeline = trainer.build_pipeline(config, str(tmp_path / 'run'), whole_batches=True)
  built = steps_lib.build(config, mesh, pipeline.tokenizer.vocab_size, pipeline.sources)
  t_params = built.needs.load()
  batch = pipeline.batch(2)
  with jax.set_mesh(mesh):
    for step, alpha, temperature in ((1, 0.5, 1.0), (2, 1.0, 2.0)):  # phase first, then second
      state = built.init(0)
      params = jax.device_get(state['params'])
      state['step'] = jnp.asarray(step, jnp.int32)
      _, metrics = built.train_step(state, sharding.global_batch(batch, mesh), t_params)
      args = dataclasses.replace(built.loss, options=dataclasses.replace(
          built.loss.options, alpha=alpha, temperature=temperature))
      loss, weight, *_ = steps_lib.loss_sums(built.graphdef, params, batch, args, 2, built.needs.in_step,
                                             t_params)
      np.testing.assert_allclose(float(metrics['loss']), float(loss / weight), rtol=1e-5)


@pytest.mark.slow
def test_offline_kd_run_killed_and_resumed_equals_straight(setup, tmp_path):
  mode = 'offline'
  store = str(tmp_path / 'store')
  config = _config(setup, mode=mode, store=store)
  dump_lib.dump(config, str(tmp_path / 'straight'))
  train.run(config, str(tmp_path / 'straight'))

  def crash(info):
    if info.step == 3:
      raise KeyboardInterrupt
  with pytest.raises(KeyboardInterrupt):
    train.run(_config(setup, mode=mode, store=store), str(tmp_path / 'resumed'),
                extra_hooks=[trainer.Hook(1, crash)])
  train.run(_config(setup, mode=mode, store=store), str(tmp_path / 'resumed'))

  def losses_of(workdir):
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      return {r['step']: r['loss'] for r in map(json.loads, f) if 'loss' in r}
  straight, resumed = losses_of(str(tmp_path / 'straight')), losses_of(str(tmp_path / 'resumed'))
  assert sorted(resumed) == [1, 2, 3, 4]
  np.testing.assert_allclose([resumed[s] for s in (3, 4)], [straight[s] for s in (3, 4)], rtol=1e-6)
