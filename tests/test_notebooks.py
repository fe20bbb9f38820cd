"""Every notebook in notebooks/ executes end to end (they are thin: they import lmjax and define no
model code, so a failure here means the library API they show has drifted)."""
import glob
import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, 'notebooks', '*.ipynb')))


def test_there_are_notebooks():
  assert NOTEBOOKS


# Notebooks that show a demo's run: the session's run of it (tests/conftest.py), named by this variable.
DEMOS = {'continued_pretraining.ipynb': ('cpt_demo', 'LMJAX_CPT_DEMO'),
         'distillation.ipynb': ('distill_demo_quick', 'LMJAX_DISTILL_DEMO')}


@pytest.mark.parametrize('path', NOTEBOOKS, ids=os.path.basename)
def test_notebook_executes(path, request, monkeypatch):
  if os.path.basename(path) in DEMOS:
    fixture, variable = DEMOS[os.path.basename(path)]
    monkeypatch.setenv(variable, str(request.getfixturevalue(fixture)[0]))  # the kernel inherits it
  notebook = nbformat.read(path, as_version=4)
  NotebookClient(notebook, timeout=600, kernel_name='python3',
                 resources={'metadata': {'path': ROOT}}).execute()  # raises on a cell's error
