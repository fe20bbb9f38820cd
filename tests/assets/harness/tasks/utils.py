"""Loaders of the parity tasks' local data (lm-eval's `custom_dataset`): each jsonl beside this file
as the test split."""
import json
import os

import datasets

HERE = os.path.dirname(os.path.abspath(__file__))


def _test_split(name: str) -> datasets.DatasetDict:
  with open(os.path.join(HERE, f'{name}.jsonl'), encoding='utf-8') as f:
    return datasets.DatasetDict({'test': datasets.Dataset.from_list([json.loads(line) for line in f])})


def mc(**_) -> datasets.DatasetDict:
  return _test_split('mc')


def ppl(**_) -> datasets.DatasetDict:
  return _test_split('ppl')


def gen(**_) -> datasets.DatasetDict:
  return _test_split('gen')
