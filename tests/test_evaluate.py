"""lmjax.eval and lmjax.evaluate: bytes per token sum to the UTF-8 size of the text; held-out bpb,
choice and continuation log-likelihoods (and greedy flags) equal float64 numpy computations from
model.apply; acc/acc_norm by hand; task-file errors; the cloze builder (scripts/make_legal_cloze.py);
the forgetting report; and, on a tiny trained run, the bpb hook and the command lines of
lmjax.evaluate and lmjax.sample."""
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmjax import checkpoint, config as config_lib, decode, model, sharding, steps as steps_lib, trainer
from lmjax.data import tokenizer as tokenizer_lib
from lmjax.eval import choice, forgetting, heldout, hook, records as records_lib, runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLOZE = os.path.join(ROOT, 'lmjax', 'eval', 'tasks', 'legal_cloze.jsonl')
_spec = importlib.util.spec_from_file_location('make_legal_cloze',
                                               os.path.join(ROOT, 'scripts', 'make_legal_cloze.py'))
make_legal_cloze = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_legal_cloze)
TEXTS = [
    'Permission is hereby granted, free of charge, to any person obtaining a copy.\n',
    'def f(x, *args):\n\tif x:\n        return {"a": [1, 2.5e-3]}  # comment\n',
    '床前明月光，疑是地上霜。举头望明月，低头思故乡。\n',
    'naïve café — “quoted” ünïcödé 😀 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 beyond the vocabulary\n',
]
TOKENIZER_VOCAB, MODEL_VOCAB = 400, 512  # rows past the tokenizer's are padding, masked in the loss


WORDS = ('the of and to in is that with for as by on licence software permission granted copy use '
         'free charge person any notice above shall be included all copies or portions provided '
         'without warranty kind express implied').split()


def documents(n: int, seed: int) -> list[str]:
  """n distinct documents: random licence-like words, then one of TEXTS (code, Chinese, emoji)."""
  rng = np.random.default_rng(seed)
  return [' '.join(rng.choice(WORDS, 40)).capitalize() + '.\n' + TEXTS[k % len(TEXTS)]
          for k in range(n)]


@pytest.fixture(scope='module')
def sp_tokenizer(tmp_path_factory):
  sentences = [line for d in documents(40, 0) for line in d.split('\n') if line]
  return tokenizer_lib.train(sentences, str(tmp_path_factory.mktemp('sp') / 'tok.model'),
                             vocab_size=TOKENIZER_VOCAB, character_coverage=0.98)


def tiny_config(corpus: str, tokenizer_path: str = '', steps: int = 4):
  c = config_lib.load(os.path.join(ROOT, 'configs', 'tiny.py'), f'steps={steps}')
  c.model.update(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, vocab_size=MODEL_VOCAB)
  c.train.update(batch_size=8, seq_len=64, eval_every=2, checkpoint_every=steps, log_every=2)
  c.data.sources = {'code': dict(corpora=corpus, max_chars=0)}
  c.data.tokenizer.update(vocab_size=TOKENIZER_VOCAB, character_coverage=0.98, path=tokenizer_path)
  return c


def write_jsonl(path, docs):
  path.write_text(''.join(json.dumps({'text': d}, ensure_ascii=False) + '\n' for d in docs))
  return f'jsonl:{path}'


def log_softmax64(logits, vocab):
  logits = np.asarray(logits, np.float64)[..., :vocab]
  m = logits.max(-1, keepdims=True)
  return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


# ----------------------------------------------------------------------------- bytes per token


def test_token_bytes_of_sentencepiece_sum_to_the_utf8_size(sp_tokenizer):
  table = heldout.token_bytes(sp_tokenizer)
  assert table.shape == (TOKENIZER_VOCAB,)
  assert table[sp_tokenizer.bos_id] == table[sp_tokenizer.eos_id] == 0
  unseen = 'unseen: \ua66e \u16a0\u16c7\u16bb \U0001f980'  # spelled in byte-fallback pieces
  assert any(sp_tokenizer.id_to_piece(i).startswith('<0x') for i in sp_tokenizer.encode(unseen))
  for text in TEXTS + [''.join(TEXTS), '  leading spaces\n\n\ttabs  ', unseen]:
    assert table[sp_tokenizer.encode(text)].sum() == len(text.encode('utf-8')), text


def test_token_bytes_of_a_byte_level_bpe_sum_to_the_utf8_size(tmp_path):
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(TEXTS * 10, trainer=trainers.BpeTrainer(
      vocab_size=400, special_tokens=['<s>', '</s>'], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.save(str(tmp_path / 'tokenizer.json'))
  (tmp_path / 'tokenizer_config.json').write_text(json.dumps({'bos_token': '<s>', 'eos_token': '</s>'}))
  hf = tokenizer_lib.load(str(tmp_path))
  table = heldout.token_bytes(hf)
  assert table[hf.bos_id] == table[hf.eos_id] == 0
  for text in TEXTS + [''.join(TEXTS)]:
    assert table[hf.encode(text)].sum() == len(text.encode('utf-8')), text


# ----------------------------------------------------------------------------- held-out loss and bpb


def test_heldout_loss_and_bpb_equal_a_float64_hand_computation(tmp_path):
  """The held-out batches cover every held-out document whole: the bytes are the UTF-8 size of the
  text their targets decode to (document by document, EOS decoding to nothing), the target tokens
  the documents' tokens plus EOS, and the nats those of model.apply's logits in float64 over the
  tokenizer's rows."""
  config = tiny_config(write_jsonl(tmp_path / 'docs.jsonl', documents(30, 1)))
  ev = runs.build(config, str(tmp_path / 'run'))
  _, params = runs.load_params(ev, str(tmp_path / 'run'), 0)
  got = heldout.heldout(ev, params)['code']

  batches, tok = ev.eval_batches['code'], ev.tokenizer
  stream = np.concatenate([b['targets'][b['weights'] > 0] for b in batches])  # in document order
  assert stream[-1] == tok.eos_id and (stream == tok.eos_id).sum() >= 2
  held = np.split(stream, np.flatnonzero(stream == tok.eos_id)[:-1] + 1)  # each ends with its EOS
  nats = 0.0
  for b in batches:
    logp = log_softmax64(model.apply(ev.steps.graphdef, params, b), tok.vocab_size)
    nats -= (np.take_along_axis(logp, b['targets'][..., None], -1)[..., 0] * b['weights']).sum()
  assert got['tokens'] == len(stream)
  assert got['bytes'] == sum(len(tok.decode(d[:-1]).encode('utf-8')) for d in held)
  np.testing.assert_allclose(got['loss'], nats / got['tokens'], rtol=1e-5)
  np.testing.assert_allclose(got['bpb'], nats / (math.log(2) * got['bytes']), rtol=1e-5)


# ----------------------------------------------------------------------------- multiple-choice tasks


def test_split_choice_moves_the_contexts_trailing_space(sp_tokenizer):
  context_ids, choice_ids = choice.split_choice(sp_tokenizer, 'free of ', 'charge')
  assert context_ids == sp_tokenizer.encode('free of')
  assert choice_ids == sp_tokenizer.encode('free of charge')[len(context_ids):]
  assert sp_tokenizer.decode(choice_ids) == ' charge'


def test_choice_loglikelihoods_equal_float64_sums_from_model_apply(sp_tokenizer):
  config = tiny_config('python_stdlib', sp_tokenizer.path)
  mesh = sharding.make_mesh(config.mesh)
  steps = steps_lib.build(config, mesh, sp_tokenizer.vocab_size)
  params = steps.init(3)['params']
  ev = heldout.Evaluator(config, mesh, steps, sp_tokenizer, {})
  examples = [
      dict(context='Permission is hereby ', choices=['granted, free', 'denied', '床前'], answer=0),
      dict(context='', choices=['def f(x):', 'naïve 😀'], answer=1),
      dict(context=''.join(TEXTS) * 2, choices=[' and more', ' 举头望明月'], answer=0),  # cut from the left
  ] * 3  # 21 rows: more than one batch of 8
  got = choice.choice_loglikelihoods(ev, params, examples)
  width = config.train.seq_len  # each sequence alone at the start of a zero row: causal attention
  apply = jax.jit(model.apply, static_argnums=0)  # keeps the zeros after it out of its logits
  for ex, ll in zip(examples, got):
    want = []
    for option in ex['choices']:
      context_ids, choice_ids = choice.split_choice(sp_tokenizer, ex['context'], option)
      seq = np.array([sp_tokenizer.bos_id, *context_ids, *choice_ids])[-(width + 1):]
      t = len(seq) - 1
      inputs = np.zeros((1, width), np.int32)
      inputs[0, :t] = seq[:-1]
      batch = dict(inputs=inputs, positions=np.arange(width)[None], segment_ids=np.ones((1, width), np.int32))
      logp = log_softmax64(apply(steps.graphdef, params, batch)[0], sp_tokenizer.vocab_size)
      want.append(logp[np.arange(t), seq[1:]][t - len(choice_ids):].sum())
    np.testing.assert_allclose(ll, want, rtol=1e-5)


@pytest.mark.parametrize('implementation', ['materialize', 'chunked'])
def test_continuation_loglikelihoods_and_greedy_flags_equal_float64_model_apply(sp_tokenizer,
                                                                               implementation):
  """Token-id pairs as lm-eval-harness's loglikelihood requests give them: each sum equals a float64
  sum from model.apply and each flag its argmax, the loss whole or in blocks of positions; a
  continuation made by argmax from model.apply is greedy, the same with its last token changed is not."""
  config = tiny_config('python_stdlib', sp_tokenizer.path)
  config.loss.update(implementation=implementation, chunk_tokens=40)  # chunked: 5 positions a block
  mesh = sharding.make_mesh(config.mesh)
  steps = steps_lib.build(config, mesh, sp_tokenizer.vocab_size)
  params = steps.init(3)['params']
  ev = heldout.Evaluator(config, mesh, steps, sp_tokenizer, {})
  width, vocab = config.train.seq_len, sp_tokenizer.vocab_size
  apply = jax.jit(model.apply, static_argnums=0)

  def next_logp(ids):  # float64 [len(ids), V]: log p(next token | ids[:i + 1]), ids alone in a zero row
    inputs = np.zeros((1, width), np.int32)
    inputs[0, :len(ids)] = ids
    batch = dict(inputs=inputs, positions=np.arange(width)[None], segment_ids=np.ones((1, width), np.int32))
    return log_softmax64(apply(steps.graphdef, params, batch)[0], vocab)[:len(ids)]

  bos = sp_tokenizer.bos_id
  context = [bos, *sp_tokenizer.encode('def f(x):')]
  greedy = []
  for _ in range(4):
    greedy.append(int(np.argmax(next_logp(context + greedy)[-1])))
  text = sp_tokenizer.encode(''.join(TEXTS) * 2)
  short = [bos, *text[:24]]
  pairs = [(context, greedy), (context, greedy[:-1] + [(greedy[-1] + 1) % vocab]),
           ([bos], sp_tokenizer.encode('naïve 😀')),
           ([bos, *text], sp_tokenizer.encode(' and more'))] * 3
  # one context, continuations of 1 token and ones that fill more than a row together, one cut
  pairs += [(short, [t]) for t in (5, 6, 7)] + [(short, text[k:k + 20]) for k in range(4)]
  pairs += [(short, text[:30])]  # a continuation longer than its context: a row of its own
  pairs += [(short, text[:width])]
  got = choice.continuation_loglikelihoods(ev, params, pairs)  # 21 pairs: more than one batch of 8 rows
  assert [g for _, g in got[:2]] == [True, False]
  for (context_ids, ids), (ll, is_greedy) in zip(pairs, got, strict=True):
    seq = [*context_ids, *ids][-(width + 1):]
    logp = next_logp(seq[:-1])[len(seq) - 1 - len(ids):]
    np.testing.assert_allclose(ll, logp[np.arange(len(ids)), ids].sum(), rtol=1e-5)
    assert is_greedy == bool((logp.argmax(-1) == ids).all())
  assert choice.continuation_loglikelihoods(ev, params, []) == []
  rows = choice.plan_rows(pairs, width)  # what shares a row (each row's scores are checked above)
  assert sum(len(r.continuations) for r in rows) == len(pairs) and all(len(r) <= width for r in rows)
  shared = sorted((len(r.context), len(r.continuations)) for r in rows if r.context == short)
  assert shared == [(25, 1), (25, 2), (25, 5)]  # 25 + 3 x 0 + 2 x 19 = 63 inputs; the next 19 starts a row
  assert [len(r.context) for r in rows if r.continuations[0][1] == text[:width]] == [1]  # cut
  assert [len(r.continuations) for r in rows if r.context == context] == [6]
  with pytest.raises(ValueError, match=r'pair 1: 1 context and 0 continuation tokens'):
    choice.continuation_loglikelihoods(ev, params, [([bos], [5]), ([bos], [])])


def test_accuracy_and_length_normalised_accuracy_by_hand():
  examples = [dict(context='', choices=['a', 'bbbb'], answer=1),   # raw: a; per byte: bbbb
              dict(context='', choices=['é', 'ab'], answer=0),     # 'é' is 2 bytes
              dict(context='', choices=['x', 'y', 'z'], answer=0)]  # a tie goes to the first
  lls = [np.array([-2.0, -4.0]), np.array([-3.0, -2.0]), np.array([-1.0, -1.0, -5.0])]
  # acc: 0 (argmax a), 0 (ab), 1 -> 1/3; acc_norm: -2 vs -1 -> 1 ok; -1.5 vs -1 -> 1 wrong; 0 ok.
  assert choice.accuracy(lls, examples) == dict(acc=1 / 3, acc_norm=2 / 3)


@pytest.mark.parametrize('line, message', [
    ('not json', r'task\.jsonl:2: not JSON'),
    ('{"choices": ["a", "b"], "answer": 0}', r'task\.jsonl:2: expected an object with "context"'),
    ('{"context": "c", "choices": ["a"], "answer": 0}', r'"choices" must be a list of at least 2'),
    ('{"context": "c", "choices": ["a", ""], "answer": 0}', r'"choices" must be a list of at least 2'),
    ('{"context": "c", "choices": ["a", "b"], "answer": 2}', r'"answer"=2: expected the index of a choice, 0\.\.1'),
    ('{"context": "c", "choices": ["a", "b"], "answer": true}', r'"answer"=True'),
])
def test_task_file_errors_name_the_line_and_field(tmp_path, line, message):
  path = tmp_path / 'task.jsonl'
  path.write_text('{"context": "c", "choices": ["a", "b"], "answer": 1}\n' + line + '\n')
  with pytest.raises(ValueError, match=message):
    choice.read_task(str(path))


def test_cloze_is_deterministic_and_its_answer_continues_the_context():
  docs = [f'licence {k}: ' + ' '.join(f'w{k}x{j}' for j in range(300)) for k in range(6)]
  examples = make_legal_cloze.cloze(docs, 20, context_chars=120, choice_chars=30, seed=5)
  assert examples == make_legal_cloze.cloze(docs, 20, context_chars=120, choice_chars=30, seed=5)
  assert examples != make_legal_cloze.cloze(docs, 20, context_chars=120, choice_chars=30, seed=6)
  for ex in examples:
    assert len(ex['choices']) == 4 and len(set(ex['choices'])) == 4
    right = ex['choices'][ex['answer']]
    assert any(ex['context'] + right in d for d in docs)
    assert not any(ex['context'] + c in d for d in docs for c in ex['choices'] if c != right)
  assert len({ex['answer'] for ex in examples}) > 1


def test_the_legal_cloze_asset_is_a_valid_task():
  examples = choice.read_task(CLOZE)
  assert len(examples) == 64 and all(len(ex['choices']) == 4 for ex in examples)


# ----------------------------------------------------------------------------- the forgetting report


def write_run(directory, metrics, evaluations=()):
  directory.mkdir()
  for name, records in (('metrics.jsonl', metrics), ('evaluations.jsonl', evaluations)):
    (directory / name).write_text(''.join(json.dumps(r) + '\n' for r in records))
  return str(directory)


def losses(step, legal, en, zh, **extra):
  return {'step': step, 'eval/legal/loss': legal, 'eval/en/loss': en, 'eval/zh/loss': zh, **extra}


def test_forgetting_table_against_the_step_0_evaluation(tmp_path):
  a = write_run(tmp_path / 'r0', [{'step': 10, 'loss': 9.0}, losses(10, 4.0, 3.5, 6.0), losses(20, 3.0, 4.0, 7.0)],
                [losses(0, 5.0, 3.0, 5.0, **{'task/cloze/acc': 0.5}), {'step': 20, 'task/cloze/acc': 0.7}])
  b = write_run(tmp_path / 'r20', [losses(20, 3.5, 3.2, 5.4)], [losses(0, 5.0, 3.0, 5.0)])
  rows = forgetting.forgetting([a, b], 'legal')
  assert [(r['run'], r['step']) for r in rows] == [('r0', 0), ('r0', 10), ('r0', 20), ('r20', 0), ('r20', 20)]
  last = rows[2]
  assert last['domain'] == 3.0 and last['domain_gain'] == 2.0
  assert last['general'] == 5.5 and last['general_change'] == pytest.approx(1.5)
  assert last['en_change'] == pytest.approx(1.0) and last['zh_change'] == pytest.approx(2.0)
  assert rows[4]['general_change'] == pytest.approx(0.3)
  assert records_lib.eval_records(a)[20] == {'eval/legal/loss': 3.0, 'eval/en/loss': 4.0, 'eval/zh/loss': 7.0,
                                         'task/cloze/acc': 0.7}
  only_en = forgetting.forgetting({'x': a}, 'legal', general=['en'])
  assert only_en[2]['general_change'] == pytest.approx(1.0) and 'zh_change' not in only_en[2]
  text = forgetting.format_forgetting(rows, 'legal')
  assert 'r20' in text and '+1.5000' in text
  forgetting.plot_forgetting(rows, str(tmp_path / 'f.png'), 'legal')
  assert (tmp_path / 'f.png').read_bytes()[:4] == b'\x89PNG'


def test_forgetting_on_harness_scores_turns_the_signs_of_scores_better_higher(tmp_path):
  """A domain task's accuracy up and general accuracies down: a gain and forgetting, both > 0; on
  bits per byte (lower is better) the signs are a loss's. The hook's metrics.jsonl and evaluate's
  evaluations.jsonl both count."""
  acc = lambda step, legal, hella, arc: {'step': step, 'harness/lmjax_legal_cloze/acc': legal,
                                         'harness/hellaswag/acc': hella, 'harness/arc_easy/acc': arc}
  bpb = lambda step, legal, en: {'step': step, 'harness/lmjax_heldout_legal/bits_per_byte': legal,
                                 'harness/lmjax_heldout_en/bits_per_byte': en}
  run = write_run(tmp_path / 'r', [acc(10, 0.5, 0.3, 0.4), bpb(10, 1.5, 1.25)],
                  [acc(0, 0.25, 0.5, 0.5), bpb(0, 2.0, 1.0)])
  rows = forgetting.forgetting([run], 'lmjax_legal_cloze', metric='harness/acc')
  assert [r['step'] for r in rows] == [0, 10]
  assert rows[1]['domain'] == 0.5 and rows[1]['domain_gain'] == pytest.approx(0.25)
  assert rows[1]['general'] == pytest.approx(0.35) and rows[1]['general_change'] == pytest.approx(0.15)
  assert rows[1]['hellaswag_change'] == pytest.approx(0.2) and rows[1]['arc_easy_change'] == pytest.approx(0.1)
  rows = forgetting.forgetting([run], 'lmjax_heldout_legal', metric='harness/bits_per_byte')
  assert rows[1]['domain_gain'] == pytest.approx(0.5) and rows[1]['general_change'] == pytest.approx(0.25)
  assert '+0.2500' in forgetting.format_forgetting(rows, 'lmjax_heldout_legal', 'harness/bits_per_byte')
  with pytest.raises(ValueError, match=r"metric='acc': expected loss, bpb, harness/<metric>"):
    forgetting.forgetting([run], 'legal', metric='acc')


def test_records_and_the_forgetting_plot_live_in_a_url_workdir(tmp_path):
  """The run-directory files of lmjax.eval go through lmjax.fs: a memory:// workdir (the tests'
  stand-in for gs://) holds evaluations.jsonl, reads back the same records, and takes the plot."""
  import uuid  # pylint: disable=import-outside-toplevel
  from lmjax import fs  # pylint: disable=import-outside-toplevel
  run = f'memory://lmjax-test-{uuid.uuid4().hex}/r0'
  fs.write_atomic(f'{run}/metrics.jsonl', json.dumps(losses(10, 4.0, 3.5, 6.0)) + '\n')
  records_lib.save_record(run, 0, {k: v for k, v in losses(0, 5.0, 3.0, 5.0).items() if k != 'step'})
  records_lib.save_record(run, 10, {'task/cloze/acc': 0.25})
  assert records_lib.eval_records(run) == {0: {'eval/legal/loss': 5.0, 'eval/en/loss': 3.0, 'eval/zh/loss': 5.0},
                                        10: {'eval/legal/loss': 4.0, 'eval/en/loss': 3.5, 'eval/zh/loss': 6.0,
                                             'task/cloze/acc': 0.25}}
  rows = forgetting.forgetting([run], 'legal')
  assert rows[1]['domain_gain'] == 1.0 and rows[1]['general_change'] == pytest.approx(0.75)
  forgetting.plot_forgetting(rows, f'{run}/forgetting.png', 'legal')
  with fs.open(f'{run}/forgetting.png', 'rb') as f:
    assert f.read(4) == b'\x89PNG'
  fs.write_atomic(f'{run}/provenance.json', json.dumps({'tokenizer': f'{run}/missing.model'}))
  with pytest.raises(FileNotFoundError, match='missing.model'):
    runs.run_tokenizer_path(run)


def test_forgetting_without_a_step_0_evaluation_says_how_to_make_one(tmp_path):
  a = write_run(tmp_path / 'r', [losses(10, 4.0, 3.5, 6.0)])
  with pytest.raises(ValueError, match=r'no eval/legal/loss at step 0.*--checkpoint=0'):
    forgetting.forgetting([a], 'legal')
  with pytest.raises(ValueError, match="metric='acc'"):
    forgetting.forgetting([a], 'legal', metric='acc')


# ----------------------------------------------------------------------------- a tiny trained run


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """4 steps of a tiny model on a small jsonl corpus, with the bpb hook."""
  root = tmp_path_factory.mktemp('trained')
  corpus = write_jsonl(root / 'docs.jsonl', documents(30, 2))
  workdir = str(root / 'run')
  config = tiny_config(corpus)
  r = trainer.setup(config, workdir)
  writer = trainer.MetricsWriter(r)
  try:
    trainer.train(r, trainer.default_hooks(r, writer) + [hook.hook(r, writer)])
  finally:
    writer.close()
    r.checkpointer.close()
  flags = [f'--config=configs/tiny.py:steps=4', f'--workdir={workdir}',
           f'--config.data.sources.code.corpora={corpus}', '--config.data.tokenizer.vocab_size=400',
           '--config.data.tokenizer.character_coverage=0.98', '--config.model.vocab_size=512',
           '--config.model.d_model=32', '--config.model.n_layers=1', '--config.model.n_heads=2',
           '--config.model.n_kv_heads=1', '--config.model.d_ff=64', '--config.train.batch_size=8',
           '--config.train.seq_len=64']
  return config, workdir, flags


def cli(module, *flags):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', module, *flags], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)


def test_hook_records_bpb_beside_the_loss(trained):
  config, workdir, _ = trained
  records = records_lib.eval_records(workdir)
  assert sorted(records) == [0, 2, 4]  # evaluated before the first step too
  assert set(records[4]) == {'eval/code/loss', 'eval/code/bpb'}
  ev = runs.build(config, workdir)
  step, params = runs.load_params(ev, workdir)
  assert step == 4
  np.testing.assert_allclose(records[4]['eval/code/bpb'], heldout.heldout(ev, params)['code']['bpb'],
                             rtol=1e-6)


def test_a_checkpoint_loads_for_evaluation_whatever_optimizer_state_it_holds(trained):
  """Evaluation reads a checkpoint's params alone: a config whose optimizer state has another layout
  (bf16 moments, the fused AdamW) loads the same params, bit for bit, as the state's restore gives."""
  config, workdir, _ = trained
  ev = runs.build(config, workdir)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'))
  want, _ = ckpt.restore(4, ev.steps.abstract_state)
  ckpt.close()
  other = config.copy_and_resolve_references()
  other.optim.moments_dtype = 'bfloat16'
  _, params = runs.load_params(runs.build(other, workdir), workdir, 4)
  for got, expected in zip(jax.tree.leaves(params), jax.tree.leaves(want['params'])):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


def test_evaluate_cli_scores_the_starting_params_and_records_them(trained, tmp_path):
  config, workdir, flags = trained
  task = tmp_path / 'mini.jsonl'
  task.write_text(''.join(json.dumps(dict(context=t[:20], choices=[t[20:30], u[20:30]], answer=0)) + '\n'
                          for t, u in zip(TEXTS, TEXTS[1:] + TEXTS[:1])))
  run = cli('lmjax.evaluate', *flags, '--checkpoint=0', f'--tasks={task}')
  assert run.returncode == 0, run.stderr[-3000:]
  assert 'step 0 (the starting params)' in run.stdout and 'task mini: acc' in run.stdout
  with open(os.path.join(workdir, records_lib.EVALUATIONS)) as f:
    (record,) = [json.loads(line) for line in f]
  ev = runs.build(config, workdir)
  _, params = runs.load_params(ev, workdir, 0)
  want = records_lib.scores(ev, params, [str(task)])
  assert record['step'] == 0 and set(record) == {'step', *want}
  for k, v in want.items():
    np.testing.assert_allclose(record[k], v, rtol=1e-5, err_msg=k)
  missing = cli('lmjax.evaluate', *flags, '--checkpoint=3')
  assert missing.returncode == 2 and 'expected checkpoint 3; found steps [4]' in missing.stderr


def test_evaluate_on_a_read_only_run_prints_its_results_then_one_line(trained, tmp_path):
  _, workdir, flags = trained
  disk = tmp_path / 'disk'
  disk.mkdir()
  if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=64m', 'tmpfs', str(disk)],
                    capture_output=True).returncode:
    pytest.skip('cannot mount a tmpfs here (needs root)')
  try:
    shutil.copytree(workdir, disk / 'run')
    subprocess.run(['mount', '-o', 'remount,ro', str(disk)], check=True)
    flags = [f'--workdir={disk}/run' if f.startswith('--workdir=') else f for f in flags]
    run = cli('lmjax.evaluate', *flags)
  finally:
    subprocess.run(['umount', '-l', str(disk)], check=False)
  assert run.returncode == 2 and 'Traceback' not in run.stderr, run.stderr[-3000:]
  assert 'step 4' in run.stdout and 'code' in run.stdout  # the results, printed first
  assert run.stderr.strip().splitlines()[-1] == (
      f'lmjax.evaluate: error: could not record the results in {disk}/run/{records_lib.EVALUATIONS}: '
      'Read-only file system (they are printed above)')


def test_sample_cli_prints_the_greedy_continuation_of_the_latest_params(trained):
  config, workdir, flags = trained
  run = cli('lmjax.sample', *flags, '--prompt=def f(x', '--max_new_tokens=12')
  assert run.returncode == 0, run.stderr[-3000:]
  ev = runs.build(config, workdir, data=False)
  _, params = runs.load_params(ev, workdir)
  tok = ev.tokenizer
  new = decode.generate(ev.steps.graphdef, params, [[tok.bos_id] + tok.encode('def f(x')], 12,
                        eos_id=tok.eos_id)[0].tolist()
  new = new[:new.index(tok.eos_id)] if tok.eos_id in new else new
  assert run.stdout == 'def f(x' + tok.decode(new) + '\n'


def test_sample_and_evaluate_read_the_runs_config_when_config_is_left_out(trained, tmp_path):
  _, workdir, flags = trained
  with_config = cli('lmjax.sample', *flags, '--prompt=def g(', '--max_new_tokens=8')
  from_run = cli('lmjax.sample', f'--workdir={workdir}', '--prompt=def g(', '--max_new_tokens=8')
  assert from_run.returncode == 0 and from_run.stdout == with_config.stdout, from_run.stderr[-3000:]
  copy = shutil.copytree(workdir, tmp_path / 'run')  # evaluate records its scores in the run
  scored = cli('lmjax.evaluate', f'--workdir={copy}', '--checkpoint=4')
  assert scored.returncode == 0, scored.stderr[-3000:]
  assert scored.stdout.startswith('step 4\n') and '\ncode ' in scored.stdout
  help_text = cli('lmjax.sample', '--help').stdout
  assert '--config:' in help_text and '--workdir:' in help_text and "the run's config.json" in help_text
  not_a_run = cli('lmjax.sample', f'--workdir={workdir}/checkpoints', '--prompt=x')
  assert not_a_run.returncode == 2 and not_a_run.stderr.strip() == (
      f'lmjax.sample: error: {workdir}/checkpoints/config.json does not exist: --workdir is not a run '
      'directory')
