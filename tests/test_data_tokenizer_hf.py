"""Hugging Face tokenizer.json behind the tokenizer interface: a byte-level BPE trained here, exact
round trips, no special tokens added by encode, BOS/EOS from the checkpoint's files, loading by path."""
import json

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmjax import errors
from lmjax.data import tokenizer

ZH = '床前明月光，疑是地上霜。举头望明月，低头思故乡。\n今天天气很好，我们一起去公园散步吧。\n'
EN = 'The quick brown fox jumps over the lazy dog.  Twice-spaced, trailing  \nCRLF line\r\nend\n'
CODE = 'def f(x, *args):\n\tif x:\n        return {"a": [1, 2.5e-3]}  # comment\n\n\n    pass \\\n'
ODD = '\x00\x01 é ü ß 😀 \u200b \ufeff tab\tend  \n'
SPECIALS = ['<unk>', '<s>', '</s>', '<|endoftext|>']


@pytest.fixture(scope='module')
def tokenizer_json(tmp_path_factory):
  """A byte-level BPE (GPT-2 / Llama-3 style: every byte is a token, so any text round-trips)."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator([ZH, EN, CODE] * 20, trainer=trainer)
  path = tmp_path_factory.mktemp('hf') / 'tokenizer.json'
  tok.save(str(path))
  return path


def checkpoint_dir(tmp_path, tokenizer_json, **files):
  """A directory with the tokenizer.json and the given JSON files (name without .json -> dict)."""
  tmp_path.mkdir(exist_ok=True)
  (tmp_path / 'tokenizer.json').write_bytes(tokenizer_json.read_bytes())
  for name, content in files.items():
    (tmp_path / f'{name}.json').write_text(json.dumps(content))
  return tmp_path


@pytest.fixture
def tok(tmp_path, tokenizer_json):
  return tokenizer.load(str(checkpoint_dir(tmp_path, tokenizer_json, tokenizer_config=dict(
      bos_token='<s>', eos_token=dict(content='</s>', special=True)))))


@pytest.mark.parametrize('text', [ZH, EN, CODE, ODD, ZH + EN + CODE, '', ' ', '\n\n'])
def test_round_trip_is_exact(tok, text):
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  assert tok.bos_id not in ids and tok.eos_id not in ids


def test_interface_matches_sentencepiece(tok):
  assert isinstance(tok, tokenizer.HFTokenizer)
  assert tok.vocab_size == 400 and tok.path.endswith('tokenizer.json')
  assert (tok.bos_id, tok.eos_id) == (1, 2)
  assert tok.id_to_piece(tok.eos_id) == '</s>'
  assert tok.encode_batch([EN, CODE], num_threads=2) == [tok.encode(EN), tok.encode(CODE)]
  assert tok.decode([tok.bos_id, *tok.encode('hi')]) == '<s>hi'


def test_special_tokens_come_from_the_checkpoint_files(tmp_path, tokenizer_json):
  # Qwen2-style: tokenizer_config names no BOS; config.json's ids are the next source.
  qwen = tokenizer.load(str(checkpoint_dir(
      tmp_path / 'qwen', tokenizer_json, tokenizer_config=dict(bos_token=None, eos_token='<|endoftext|>'),
      config=dict(bos_token_id=2, eos_token_id=2))))
  assert (qwen.bos_id, qwen.eos_id) == (2, 3)
  # Ids only, eos as a list (generation_config.json of instruct models): the first one.
  ids = tokenizer.load(str(checkpoint_dir(tmp_path / 'ids', tokenizer_json,
                                          generation_config=dict(bos_token_id=1, eos_token_id=[3, 2]))))
  assert (ids.bos_id, ids.eos_id) == (1, 3)
  # No BOS anywhere: EOS starts documents too.
  no_bos = tokenizer.load(str(checkpoint_dir(tmp_path / 'nobos', tokenizer_json,
                                             special_tokens_map=dict(eos_token='</s>'))))
  assert no_bos.bos_id == no_bos.eos_id == 2


def test_errors_name_the_file(tmp_path, tokenizer_json):
  with pytest.raises(errors.DataError, match='no EOS token'):
    tokenizer.load(str(checkpoint_dir(tmp_path / 'none', tokenizer_json)))
  with pytest.raises(errors.DataError, match=r"tokenizer_config.json: eos_token='<eos>' is not in the vocabulary"):
    tokenizer.load(str(checkpoint_dir(tmp_path / 'bad', tokenizer_json,
                                      tokenizer_config=dict(eos_token='<eos>'))))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(errors.MissingFile, match='holds no tokenizer.json'):
    tokenizer.load(str(tmp_path / 'empty'))
  (tmp_path / 'broken.json').write_text('{"not": "a tokenizer"}')
  with pytest.raises(errors.DataError, match='broken.json.*is not a Hugging Face tokenizer.json'):
    tokenizer.load(str(tmp_path / 'broken.json'))
  with pytest.raises(errors.MissingFile, match='nope.json'):
    tokenizer.load(str(tmp_path / 'nope.json'))
