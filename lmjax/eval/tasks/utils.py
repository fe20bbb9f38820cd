"""Loaders of lmjax's local harness tasks (lm-eval's `custom_dataset`): a jsonl file beside this one
as the test split."""
import json
import os

import datasets

HERE = os.path.dirname(os.path.abspath(__file__))


def _test_split(name: str) -> datasets.DatasetDict:
  with open(os.path.join(HERE, name), encoding='utf-8') as f:
    return datasets.DatasetDict({'test': datasets.Dataset.from_list([json.loads(line) for line in f])})


def legal_cloze(**_) -> datasets.DatasetDict:
  return _test_split('legal_cloze.jsonl')


def arithmetic(**_) -> datasets.DatasetDict:
  return _test_split('arithmetic.jsonl')
