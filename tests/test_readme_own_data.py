"""The README's "Your own data" config runs as written: its jsonl and parquet sources, cleaned and
mixed by phase, train end to end."""
import gzip
import json
import os
import re
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
from pydoc_data import topics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_config() -> str:
  text = open(os.path.join(ROOT, 'README.md'), encoding='utf-8').read()
  section = text[text.index('## Your own data'):]
  return re.search(r'```python\n(.*?)```', section, re.S).group(1)


def test_the_readme_own_data_config_trains(tmp_path):
  docs = sorted(topics.topics.values())  # English prose: the Python reference's topics
  (tmp_path / 'data' / 'web').mkdir(parents=True)
  (tmp_path / 'data' / 'papers').mkdir(parents=True)
  with gzip.open(tmp_path / 'data' / 'web' / 'part-0.jsonl.gz', 'wt', encoding='utf-8') as f:
    for doc in docs[::2]:
      f.write(json.dumps({'text': doc, 'url': 'https://example.com'}) + '\n')
  pq.write_table(pa.table({'body': docs[1::2], 'year': list(range(len(docs[1::2])))}),
                 tmp_path / 'data' / 'papers' / 'part-0.parquet')
  (tmp_path / 'my_data.py').write_text(readme_config())
  run = subprocess.run([sys.executable, '-m', 'lmjax.train', '--config=my_data.py:steps=4',
                        '--workdir=run', '--config.train.batch_size=4', '--config.train.eval_every=4'],
                       cwd=tmp_path, capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=''))
  assert run.returncode == 0, run.stderr[-3000:]
  report = json.loads((tmp_path / 'run' / 'data_report.json').read_text())
  train_docs = {s: report['sources'][s]['train']['documents'] for s in ('web', 'papers')}
  assert train_docs['web'] > 0 and train_docs['papers'] > 0, train_docs
  metrics = [json.loads(l) for l in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
  assert {'eval/web/loss', 'eval/papers/loss'} <= set(metrics[-1])
  assert [m['data/phase'] for m in metrics if 'data/phase' in m][-1] == 1  # the anneal at step 4 of 4
