"""Starting a run from an existing model (lmjax/init_from.py): the resume order, the inherited
tokenizer, a grown vocabulary, fresh parameters on request, mismatches named, Hugging Face parents."""
import os

import jax
import numpy as np
import pytest

from lmjax import config as config_lib, errors, train, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HF = os.path.join(ROOT, 'tests', 'assets', 'hf')


def tiny(tmp, steps=2, **model):
  config = config_lib.load(os.path.join(ROOT, 'configs', 'tiny.py'), f'steps={steps}')
  config.train.update(batch_size=8, seq_len=32, checkpoint_every=2, eval_every=1000)
  config.data.cache_dir = str(tmp / 'data')
  config.model.update(model)
  return config


@pytest.fixture(scope='module')
def parent(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('parent')
  config = tiny(tmp)
  train.run(config, str(tmp / 'run'))
  run = trainer.setup(config, str(tmp / 'run'))
  run.checkpointer.close()
  return tmp, run


def _setup(config, workdir):
  run = trainer.setup(config, str(workdir))
  run.checkpointer.close()
  return run


def test_child_inherits_tokenizer_and_grows_the_vocabulary(parent, tmp_path):
  tmp, p = parent
  child = tiny(tmp_path, vocab_size=2048 + 128)  # 128 new rows; the tokenizer stays the parent's
  child.init_from = f'lmjax:{tmp / "run"}'
  given = child.to_dict()
  run = _setup(child, tmp_path / 'child')
  assert run.pipeline.tokenizer.path == p.pipeline.tokenizer.path
  assert child.to_dict() == given  # the run's tokenizer is chosen (trainer.run_tokenizer), not written in
  assert run.pipeline.tokenizer.vocab_size == 2048 and run.start_step == 0
  old = np.asarray(p.state['params']['embed_vd'])
  new = np.asarray(run.state['params']['embed_vd'])
  np.testing.assert_array_equal(new[:2048], old)
  np.testing.assert_allclose(new[2048:], np.broadcast_to(old.mean(0), (128, old.shape[1])), atol=1e-7)
  for a, b in zip(jax.tree.leaves(run.state['params']['layers']), jax.tree.leaves(p.state['params']['layers'])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_init_skip_starts_parameters_fresh_and_rerun_resumes_its_own_checkpoint(parent, tmp_path):
  tmp, p = parent
  child = tiny(tmp_path)
  child.init_from = str(tmp / 'run')  # a bare directory is an lmjax run
  child.init_skip = ('layers/w_down_lfd',)
  train.run(child, str(tmp_path / 'child'))
  scratch = _setup(tiny(tmp_path), tmp_path / 'scratch')
  first = _setup(tiny(tmp_path / 'fresh'), tmp_path / 'fresh_run')  # noqa: F841  (a different cache)
  resumed = _setup(child, tmp_path / 'child')
  assert resumed.start_step == 2  # its own checkpoint wins over init_from
  assert not np.array_equal(np.asarray(resumed.state['params']['embed_vd']),
                            np.asarray(p.state['params']['embed_vd']))  # it trained on from there
  child_start = tiny(tmp_path)
  child_start.init_from, child_start.init_skip = str(tmp / 'run'), ('layers/w_down_lfd',)
  started = _setup(child_start, tmp_path / 'child2')
  np.testing.assert_array_equal(np.asarray(started.state['params']['layers']['w_down_lfd']),
                                np.asarray(scratch.state['params']['layers']['w_down_lfd']))
  np.testing.assert_array_equal(np.asarray(started.state['params']['layers']['w_up_ldf']),
                                np.asarray(p.state['params']['layers']['w_up_ldf']))


def test_mismatches_and_a_different_tokenizer_are_named(parent, tmp_path):
  tmp, p = parent
  wide = tiny(tmp_path, d_ff=512)
  wide.init_from = f'lmjax:{tmp / "run"}'
  with pytest.raises(errors.CheckpointError, match=r"tensor 'layers/w_down_lfd' has shape \(4, 384, 128\) in the "
                                                 r"checkpoint, the model expects \(4, 512, 128\)"):
    _setup(wide, tmp_path / 'wide')
  other = tiny(tmp_path)
  other.init_from = f'lmjax:{tmp / "run"}'
  other.data.tokenizer.path = os.path.join(HF, 'no_such_tokenizer.model')
  with pytest.raises(FileNotFoundError, match='no_such_tokenizer.model'):
    _setup(other, tmp_path / 'other')
  sp = tiny(tmp_path)
  sp.data.tokenizer.vocab_size = 1024  # a different tokenizer, trained for this run
  _setup(sp, tmp_path / 'sp')
  own = trainer.setup(sp, str(tmp_path / 'sp')).pipeline.tokenizer.path
  different = tiny(tmp_path)
  different.init_from = f'lmjax:{tmp / "run"}'
  different.data.tokenizer.path = own
  with pytest.raises(errors.ConfigError, match=r'is not the tokenizer of config\.init_from'):
    _setup(different, tmp_path / 'different')
  with pytest.raises(errors.ConfigError, match=r"config\.init_from='s3:x'"):
    bad = tiny(tmp_path)
    bad.init_from = 's3:x'
    _setup(bad, tmp_path / 'bad')


def test_hugging_face_parent_loads_its_weights(tmp_path):
  """hf:DIR, through the same load the trainer calls: the golden tiny Llama's tensors, each onto its
  sharding on an 8-device mesh."""
  from lmjax import convert, init_from, sharding, steps
  directory = os.path.join(HF, 'llama_tied')
  if not os.path.isdir(directory):
    pytest.skip('tests/assets/hf holds no golden checkpoints (scripts/make_hf_golden.py)')
  fields = convert.model_fields(convert.read_config(directory))
  child = tiny(tmp_path, **{k: v for k, v in fields.items() if v is not None})
  child.init_from = f'hf:{directory}'
  child.mesh.update(data=1, fsdp=4, tensor=2)
  mesh = sharding.make_mesh(child.mesh)
  built = steps.build(child, mesh, fields['vocab_size'])
  params = init_from.load(child.init_from, child.init_skip, built.args, built.init(0)['params'], built.abstract_state['params'], mesh)
  _, want = convert.load(directory)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert params['embed_vd'].sharding.spec == jax.sharding.PartitionSpec('tensor', 'fsdp')


def test_a_hub_id_resolves_from_the_hugging_face_cache(tmp_path, monkeypatch):
  """hf:ORG/NAME[@REVISION] through huggingface_hub's cache, offline: the cache made here in the
  layout huggingface_hub writes (refs/<revision> holds the commit, snapshots/<commit>/ the files)
  gives the parameters of the directory it was copied from."""
  import shutil
  from lmjax import convert, init_from
  directory = os.path.join(HF, 'llama_tied')
  if not os.path.isdir(directory):
    pytest.skip('tests/assets/hf holds no golden checkpoints (scripts/make_hf_golden.py)')
  cache, commit = tmp_path / 'hub', 'a' * 40
  repo = cache / 'models--tiny-org--tiny-llama'
  shutil.copytree(directory, repo / 'snapshots' / commit, ignore=shutil.ignore_patterns('golden.npz'))
  (repo / 'refs').mkdir()
  (repo / 'refs' / 'main').write_text(commit)
  (repo / 'refs' / 'v1').write_text(commit)
  monkeypatch.setenv('HF_HUB_CACHE', str(cache))
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  import huggingface_hub.constants
  monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(cache))
  monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
  for spec in ('hf:tiny-org/tiny-llama', 'hf:tiny-org/tiny-llama@v1'):
    kind, found = init_from.parse(spec)
    assert kind == 'hf' and found == str(repo / 'snapshots' / commit)
    _, got = convert.load(found)
    _, want = convert.load(directory)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(errors.MissingFile, match="'tiny-org/absent' is not a local directory, and the "
                                               'Hugging Face Hub gives no checkpoint for it'):
    init_from.parse('hf:tiny-org/absent')
