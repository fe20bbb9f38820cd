"""lmjax.export: a tiny trained run exported from the command line loads back (lmjax.convert) to its
checkpoint's params bit for bit, at the latest step and at --step in --dtype=bfloat16; the exported
tokenizer.json gives the ids of the run's sentencepiece model (the tokenizers library against
sentencepiece itself; transformers is not installed here: scripts/make_hf_golden.py loads the export
with AutoTokenizer and AutoModelForCausalLM) for lmjax's and Llama 2's sentencepiece settings and for
Hugging Face tokenizers; files are written with the umask's mode; errors are one line."""
import json
import os
import re
import shutil
import stat
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
import sentencepiece as spm
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmjax import config as config_lib, convert, errors, export, train
from lmjax.data import tokenizer as tokenizer_lib
from lmjax.eval import runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ('the of and to in is that with for as by on licence software permission granted copy use '
         'free charge person any notice above shall be included all copies or portions provided').split()
TEXTS = [
    'Permission is hereby granted, free of charge, to any person obtaining a copy.\n',
    'def f(x, *args):\n\tif x:\n        return {"a": [1, 2.5e-3]}  # comment 12345\n',
    '床前明月光，疑是地上霜。举头望明月，低头思故乡。\n',
    'naïve café — “quoted” ünïcödé 😀 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 beyond the vocabulary\n',
    '   leading, inner    and trailing spaces   ', '\n\n\t\t  \n', ' ', '',
]
EXPORTED = ['config.json', 'generation_config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer.model',
            'tokenizer_config.json']


def documents(n: int, seed: int) -> list[str]:
  rng = np.random.default_rng(seed)
  return [' '.join(rng.choice(WORDS, 40)).capitalize() + '.\n' + TEXTS[k % 4] for k in range(n)]


def random_texts(n: int, seed: int) -> list[str]:
  """Texts of characters the tokenizers handle differently: runs of spaces, tabs, newlines, digits,
  '▁' itself, and characters outside the vocabulary (byte fallback)."""
  rng = np.random.default_rng(seed)
  alphabet = [*'abcdefghij  klmnop \t\n0123456789.,;:-_()[]{}<>', 'é', '中', '文', '😀', '▁', '\u3000']
  return [''.join(rng.choice(alphabet, rng.integers(1, 60))) for _ in range(200)]


def command(module, *flags, umask=0o022):
  return subprocess.run([sys.executable, '-m', module, *flags], cwd=ROOT, capture_output=True, text=True,
                        env=dict(os.environ, JAX_PLATFORMS='cpu'), timeout=300, umask=umask)


def leaves(tree):
  return {'/'.join(str(k.key) for k in path): np.asarray(x)
          for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def modes(directory):
  return {name: stat.S_IMODE(os.stat(os.path.join(directory, name)).st_mode)
          for name in os.listdir(directory)}


# ----------------------------------------------------------------------------- a tiny trained run


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """(config, workdir) of 4 steps of a tiny model, checkpoints at steps 2 and 4, with the
  sentencepiece tokenizer it trained."""
  root = tmp_path_factory.mktemp('export')
  corpus = root / 'docs.jsonl'
  corpus.write_text(''.join(json.dumps({'text': d}, ensure_ascii=False) + '\n' for d in documents(30, 0)))
  config = config_lib.load(os.path.join(ROOT, 'configs', 'tiny.py'), 'steps=4')
  config.model.update(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, vocab_size=512)
  config.train.update(batch_size=8, seq_len=64, eval_every=100, checkpoint_every=2, log_every=2)
  config.data.sources = {'code': dict(corpora=f'jsonl:{corpus}', max_chars=0)}
  config.data.tokenizer.update(vocab_size=400, character_coverage=0.98)
  workdir = str(root / 'run')
  train.run(config, workdir)
  return config, workdir


@pytest.fixture(scope='module')
def exported(run, tmp_path_factory):
  """The run's latest checkpoint exported by the command line."""
  out = tmp_path_factory.mktemp('hf') / 'model'
  result = command('lmjax.export', f'--workdir={run[1]}', f'--out={out}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout == f'exported step 4 of {run[1]} to {out}\n'
  return str(out)


def test_export_loads_back_to_the_checkpoints_params_bit_for_bit(run, exported):
  config, workdir = run
  ev = runs.build(config, workdir, data=False)
  step, want = runs.load_params(ev, workdir)
  args, got = convert.load(exported)
  assert step == 4
  assert {f: getattr(args, f) for f in convert.model_fields(convert.read_config(exported))} == {
      f: getattr(ev.steps.args, f) for f in convert.model_fields(convert.read_config(exported))}
  want, got = leaves(want), leaves(got)
  assert sorted(want) == sorted(got)
  for name, x in want.items():
    assert x.dtype == got[name].dtype == np.float32 and x.tobytes() == got[name].tobytes(), name


def test_an_earlier_step_in_bfloat16_with_the_umasks_mode(run, tmp_path):
  config, workdir = run
  out = tmp_path / 'step2'
  result = command('lmjax.export', f'--workdir={workdir}', f'--out={out}', '--step=2', '--dtype=bfloat16',
                   umask=0o027)
  assert result.returncode == 0, result.stderr[-3000:]
  assert modes(out) == dict.fromkeys(EXPORTED, 0o640) and modes(tmp_path) == {'step2': 0o750}
  assert {x.dtype for _, x in convert.checkpoint_tensors(str(out)).values()} == {np.dtype(ml_dtypes.bfloat16)}
  ev = runs.build(config, workdir, data=False)
  (_, step_2), (_, step_4) = runs.load_params(ev, workdir, 2), runs.load_params(ev, workdir, 4)
  _, got = convert.load(str(out))
  got = leaves(got)
  rounded_2, rounded_4 = ({k: x.astype(ml_dtypes.bfloat16).astype(np.float32) for k, x in leaves(p).items()}
                          for p in (step_2, step_4))
  for name, x in rounded_2.items():
    np.testing.assert_array_equal(got[name], x, err_msg=name)
  assert any(not np.array_equal(got[name], x) for name, x in rounded_4.items())  # step 2 is not step 4


def test_exported_files_are_the_umasks_0644_and_only_the_directory_remains(exported):
  assert modes(exported) == dict.fromkeys(EXPORTED, 0o644)
  assert os.listdir(os.path.dirname(exported)) == ['model']  # no DIR.partial<pid> left beside it


def test_exported_tokenizer_gives_the_runs_ids_and_special_tokens(run, exported):
  tok = tokenizer_lib.load(runs.run_tokenizer_path(run[1]))
  assert isinstance(tok, tokenizer_lib.SentencePieceTokenizer)
  hf = tokenizers.Tokenizer.from_file(os.path.join(exported, 'tokenizer.json'))
  for text in TEXTS + documents(20, 1) + random_texts(200, 2):
    ids = tok.encode(text)
    assert hf.encode(text, add_special_tokens=False).ids == ids, text
    assert hf.encode(text).ids == [tok.bos_id] + ids, text  # bos first, as training documents start
    assert hf.decode(ids) == tok.decode(ids), text
  again = tokenizer_lib.load(exported)  # lmjax's reading of the export: tokenizer_config.json's tokens
  assert (again.bos_id, again.eos_id) == (tok.bos_id, tok.eos_id)
  assert again.encode(TEXTS[1]) == tok.encode(TEXTS[1])
  special = dict(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=0)  # lmjax pads with 0
  for name in ('config.json', 'generation_config.json'):
    with open(os.path.join(exported, name)) as f:
      written = json.load(f)
    assert {k: written[k] for k in special} == special, name
  with open(os.path.join(exported, 'tokenizer_config.json')) as f:
    cfg = json.load(f)
  assert cfg['tokenizer_class'] == 'PreTrainedTokenizerFast'
  assert [cfg[f'{k}_token'] for k in ('bos', 'eos', 'pad')] == ['<s>', '</s>', '<unk>']
  with open(tok.path, 'rb') as a, open(os.path.join(exported, 'tokenizer.model'), 'rb') as b:
    assert a.read() == b.read()


# ----------------------------------------------------------------------------- tokenizers alone


def sentencepiece(tmp_path, **settings):
  """A sentencepiece model of the documents: lmjax's trainer settings, changed by `settings`."""
  sentences = [line for d in documents(40, 3) for line in d.split('\n') if line]
  options = dict(vocab_size=400, model_type='bpe', byte_fallback=True, character_coverage=0.98,
                 normalization_rule_name='identity', remove_extra_whitespaces=False, add_dummy_prefix=False,
                 allow_whitespace_only_pieces=True, split_digits=True, user_defined_symbols=['\n', '\t'],
                 unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, num_threads=1,
                 minloglevel=2)
  options.update(settings)
  path = str(tmp_path / 'sp.model')
  spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_prefix=path[:-len('.model')],
                                 **options)
  return tokenizer_lib.load(path)


@pytest.mark.parametrize('settings', [
    dict(model_type='unigram'),  # lmjax's other model type
    dict(add_dummy_prefix=True, user_defined_symbols=[]),  # Llama 2's tokenizer.model
    dict(model_type='unigram', add_dummy_prefix=True, byte_fallback=False),
])
def test_sentencepiece_variants_give_the_same_ids(settings, tmp_path):
  tok = sentencepiece(tmp_path, **settings)
  files = export.tokenizer_files(tok)
  hf = tokenizers.Tokenizer.from_str(files['tokenizer.json'])
  for text in TEXTS + documents(20, 4) + random_texts(200, 5):
    assert hf.encode(text, add_special_tokens=False).ids == tok.encode(text), text
  assert export.token_ids(files) == dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)


@pytest.mark.parametrize('settings,refused', [
    (dict(normalization_rule_name='nmt_nfkc'), 'normalization_rule_name'),
    (dict(remove_extra_whitespaces=True), 'remove_extra_whitespaces'),
    (dict(user_defined_symbols=['\n', '<tab>']), 'user_defined_symbols'),
])
def test_sentencepiece_settings_without_a_tokenizer_json_are_refused(settings, refused, tmp_path):
  with pytest.raises(errors.ConfigError, match=f'its {refused} setting is not one export rebuilds'):
    export.tokenizer_files(sentencepiece(tmp_path, **settings))


def test_a_hugging_face_tokenizer_is_copied_with_lmjaxs_special_tokens(tmp_path):
  """Qwen2-style: the tokenizer names no bos, so lmjax put its eos before every document."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(TEXTS * 10, trainer=trainers.BpeTrainer(
      vocab_size=400, special_tokens=['<|endoftext|>', '<|pad|>'], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  source, out = tmp_path / 'source', tmp_path / 'out'
  source.mkdir()
  out.mkdir()
  tok.save(str(source / 'tokenizer.json'))
  (source / 'tokenizer_config.json').write_text(json.dumps(dict(
      tokenizer_class='Qwen2Tokenizer', bos_token=None, eos_token='<|endoftext|>', pad_token='<|pad|>')))
  lmjax_tok = tokenizer_lib.load(str(source))
  files = export.tokenizer_files(lmjax_tok)
  assert sorted(files) == ['tokenizer.json', 'tokenizer_config.json']
  assert files['tokenizer.json'] == (source / 'tokenizer.json').read_text()
  assert json.loads(files['tokenizer_config.json']) == dict(
      tokenizer_class='PreTrainedTokenizerFast', bos_token='<|endoftext|>', eos_token='<|endoftext|>',
      pad_token='<|pad|>', clean_up_tokenization_spaces=False)
  assert export.token_ids(files) == dict(bos_token_id=0, eos_token_id=0, pad_token_id=1)
  for name, contents in files.items():
    (out / name).write_text(contents)
  again = tokenizer_lib.load(str(out))
  assert (again.bos_id, again.eos_id) == (lmjax_tok.bos_id, lmjax_tok.eos_id) == (0, 0)
  for text in TEXTS:
    assert again.encode(text) == lmjax_tok.encode(text)


# ----------------------------------------------------------------------------- the command line


def test_overwrite_replaces_an_earlier_export_and_only_that(run, tmp_path):
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'model-00001-of-00002.safetensors').write_text('an earlier, sharded export')
  (out / 'config.json').write_text('{}')
  refused = command('lmjax.export', f'--workdir={run[1]}', f'--out={out}')
  assert refused.returncode == 2 and refused.stderr.splitlines() == [
      f'lmjax.export: error: --out={out} holds an export already (config.json, '
      'model-00001-of-00002.safetensors, ...): pass --overwrite to replace it, or choose another directory']
  result = command('lmjax.export', f'--workdir={run[1]}', f'--out={out}', '--overwrite')
  assert result.returncode == 0, result.stderr[-3000:]
  assert sorted(os.listdir(out)) == EXPORTED and sorted(os.listdir(tmp_path)) == ['out']
  (out / 'notes.txt').write_text('mine')
  with pytest.raises(errors.ConfigError, match=r"holds \['notes.txt'\], which an export does not write"):
    export.export(run[1], str(out), overwrite=True)


@pytest.mark.parametrize('case', ['no run', 'no checkpoint', 'no such step', 'no --out'])
def test_mistakes_are_one_line_and_exit_code_2(case, run, tmp_path):
  workdir, out = run[1], tmp_path / 'out'
  flags, expected = {
      'no run': ([f'--workdir={tmp_path}/nothing', f'--out={out}'],
                 f"run directory '{tmp_path}/nothing' does not exist"),
      'no checkpoint': ([f'--workdir={tmp_path}', f'--out={out}'],
                        f'{tmp_path}/checkpoints: expected a finished checkpoint; found steps []'),
      'no such step': ([f'--workdir={workdir}', f'--out={out}', '--step=3'],
                       f'{workdir}/checkpoints: expected checkpoint 3; found steps [2, 4]'),
      'no --out': ([f'--workdir={workdir}'],
                   'flag --out=None: Flag --out must have a value other than None.'),
  }[case]
  if case == 'no checkpoint':  # a run that has started but not saved
    with open(os.path.join(workdir, 'config.json')) as f:
      (tmp_path / 'config.json').write_text(f.read())
  result = command('lmjax.export', *flags)
  assert (result.returncode, result.stderr.splitlines()) == (2, [f'lmjax.export: error: {expected}'])
  assert not out.exists()


def test_other_unusable_directories_name_the_cause(run, tmp_path):
  with pytest.raises(errors.CheckpointError, match='is not an lmjax run directory: it has no config.json'):
    export.export(str(tmp_path), str(tmp_path / 'out'))
  (tmp_path / 'file').write_text('')
  with pytest.raises(errors.ConfigError, match='is a file; expected a directory'):
    export.export(run[1], str(tmp_path / 'file'))
  moved = tmp_path / 'moved'  # a run copied without the tokenizer its provenance.json names
  shutil.copytree(run[1], moved, ignore=shutil.ignore_patterns('data'))
  with open(moved / 'provenance.json') as f:
    recorded = json.load(f)['tokenizer']
  recorded = recorded.replace(run[1], str(moved))
  (moved / 'provenance.json').write_text(json.dumps(dict(tokenizer=recorded)))
  expected = f"provenance.json: the tokenizer it records ('{recorded}') does not exist"
  with pytest.raises(errors.MissingFile, match=re.escape(expected)):
    export.export(str(moved), str(tmp_path / 'out'))


def test_help_lists_the_flags_and_convert_points_to_export():
  help_text = command('lmjax.export', '--help').stdout
  for flag in ('--workdir', '--step', '--out', '--dtype', '--[no]overwrite'):
    assert f'\n  {flag}:' in help_text, flag
  result = command('lmjax.convert', '--help')
  assert (result.returncode, result.stdout) == (2, '')
  assert result.stderr.splitlines() == [
      'lmjax.convert: error: a library, not a command; to export a run as a Hugging Face model: '
      'python -m lmjax.export --workdir=RUN --out=DIR']
