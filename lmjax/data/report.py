"""The prepare report: what every stage kept and dropped, per source, with examples.

`build` makes a JSON-able dict from a clean store's counters and drops (prepare.py; `summarize`
reads the drops, or the Beam runner summarizes them in its pipeline) and the shards' stats:

  sources   {source: {kind, languages, train/eval documents and tokens, tokens_per_char}}
  rows      [{source, stage, outcome, docs, chars, tokens}] for the stages read, normalize, langid,
            quality, dedup; outcome 'in', 'kept', 'edited' (kept but shortened; chars cut) or a drop
            reason. Tokens are estimates: chars x the source's tokens per character of its train
            text (a dropped document is never tokenized); `sources` has the shards' exact counts.
  dedup     exact_groups (contents with more than one copy), exact_dropped, near_clusters,
            near_dropped
  examples  {'source/stage/reason': up to EXAMPLES dropped documents (id, chars, the first
            records.SNIPPET_CHARS characters)}: those with the smallest blake2b of their id, so the
            choice does not depend on the runner or reading order
  clusters  the CLUSTERS largest near-duplicate clusters: the kept document and up to EXAMPLES of
            the dropped ones

`table` prints it as text, `figure` draws documents kept and dropped per source and stage (a
matplotlib Figure: inline in a notebook, a PNG with `save`). Memory is bounded: the drops are read in
two streaming passes that hold only counts per cluster and the examples.
"""
from __future__ import annotations

import collections
import fnmatch
import heapq
import json
import os
from typing import Callable, Iterable, Iterator

from matplotlib.backends import backend_agg
from matplotlib import figure as figure_lib

from lmjax import fs
from lmjax.data import records

STAGES = ('read', 'normalize', 'langid', 'quality', 'dedup')
EXAMPLES = 3  # example drops per (source, stage, reason), and dropped members shown per cluster
CLUSTERS = 5  # near-duplicate clusters shown
DUPLICATES = ('exact_duplicate', 'near_duplicate')  # the dedup stage's drop reasons


def drops(store: str) -> Iterator[dict]:
  """The drop records of a clean store (records.drop_record), file by file."""
  for name in fs.listdir(store):
    if not fnmatch.fnmatchcase(name, 'drops-*-of-*.jsonl'):
      continue
    with fs.open(os.path.join(store, name)) as f:
      for line in f:
        yield json.loads(line)


def summarize(read_drops: Callable[[], Iterable[dict]],
              find_kept: Callable[[bytes], tuple[str, dict] | None]) -> dict:
  """The report's dedup, examples and clusters from the drop records (two streaming passes of
  `read_drops()`); find_kept(content_key) -> (source, {"id", "text"}) of the kept document with that
  content, or None. The Beam runner computes the same in its pipeline (beam.report_summary)."""
  groups = {DUPLICATES[0]: collections.Counter(), DUPLICATES[1]: collections.Counter()}
  examples = collections.defaultdict(list)  # heaps of (-rank, ...) keeping the EXAMPLES smallest
  for r in read_drops():  # pass 1: group sizes and examples
    if r['reason'] in groups:
      groups[r['reason']][(r['source'], r['of'])] += 1
    heap = examples[f'{r["source"]}/{r["stage"]}/{r["reason"]}']
    item = (tuple(-b for b in records.rank(r['source'], r['id'])), r['id'], r['chars'], r['text'])
    if len(heap) < EXAMPLES:
      heapq.heappush(heap, item)
    elif item > heap[0]:
      heapq.heapreplace(heap, item)
  # A cluster is named by the content key of its kept document; its members may be in any source.
  near = collections.Counter()
  for (_, of), n in groups['near_duplicate'].items():
    near[of] += n
  exact = {of for _, of in groups['exact_duplicate']}
  top = sorted(near.items(), key=lambda kv: (-kv[1], kv[0]))[:CLUSTERS]
  members = {of: [] for of, _ in top}
  for r in read_drops():  # pass 2: the members of the clusters shown
    if r['reason'] == 'near_duplicate' and r['of'] in members:
      members[r['of']].append((records.rank(r['source'], r['id']),
                               dict(source=r['source'], id=r['id'], text=r['text'])))
  clusters = []
  for of, n in top:
    found, kept = find_kept(bytes.fromhex(of)), None
    if found is not None:
      name, doc = found
      kept = dict(source=name, id=doc['id'], text=doc['text'][:records.SNIPPET_CHARS])
    clusters.append(dict(size=n + 1, kept=kept,
                         dropped=[m for _, m in sorted(members[of], key=lambda x: x[0])[:EXAMPLES]]))
  return dict(
      dedup=dict(exact_groups=len(exact), exact_dropped=sum(groups['exact_duplicate'].values()),
                 near_clusters=len(near), near_dropped=sum(near.values())),
      examples={k: [dict(id=i, chars=c, text=t) for _, i, c, t in sorted(v, reverse=True)]
                for k, v in sorted(examples.items())},
      clusters=clusters)


def build(kinds: dict[str, dict], counters, summary: dict, stats: dict[str, dict],
          runner: str) -> dict:
  """The report (see the module docstring).

  Args:
    kinds: {source: {kind, languages}}; counters: stages.Counters of the clean store; summary: its
    drops' `summarize`; stats: {source: the stats.json of its prepared shards}; runner: 'local' or
    'beam'.
  """
  sources = {}
  for name, s in stats.items():
    per_char = s['train']['tokens'] / max(s['train']['chars'], 1)
    sources[name] = dict(**kinds[name], tokens_per_char=round(per_char, 4),
                         train=dict(documents=s['train']['documents'], tokens=s['train']['tokens']),
                         eval=dict(documents=s['eval']['documents'], tokens=s['eval']['tokens']))
  rows = [dict(r, tokens=round(r['chars'] * sources[r['source']]['tokens_per_char']))
          for r in counters.rows()]
  return dict(runner=runner, sources=sources, rows=rows, **summary)


def outcomes(report: dict) -> dict[tuple[str, str], dict[str, dict]]:
  """{(source, stage): {outcome: {docs, chars, tokens}}} of the report's rows."""
  out = collections.defaultdict(dict)
  for r in report['rows']:
    out[(r['source'], r['stage'])][r['outcome']] = r
  return out


def table(report: dict) -> str:
  """The report as text: per source and stage, documents and tokens in, kept and dropped, and the
  drop reasons; then the dedup summary."""
  by = outcomes(report)
  lines = [f'{"source":8s} {"stage":9s} {"docs in":>9s} {"kept":>9s} {"dropped":>8s} '
           f'{"tokens in":>11s} {"kept":>11s} {"dropped":>10s}  dropped by'.rstrip()]
  for name in report['sources']:
    for stage in STAGES:
      o = by.get((name, stage))
      if not o:
        continue
      drops = {k: v for k, v in o.items() if k not in ('in', 'kept', 'edited')}
      kept = o.get('kept', dict(docs=0, tokens=0))
      docs_in = o['in']['docs'] if 'in' in o else kept['docs'] + sum(v['docs'] for v in drops.values())
      tokens_in = (o['in']['tokens'] if 'in' in o
                   else kept['tokens'] + sum(v['tokens'] for v in drops.values()))
      reasons = ', '.join(f'{k} {v["docs"]:,}' for k, v in sorted(drops.items(),
                                                                   key=lambda kv: -kv[1]['docs']))
      lines.append(f'{name:8s} {stage:9s} {docs_in:9,d} {kept["docs"]:9,d} '
                   f'{sum(v["docs"] for v in drops.values()):8,d} {tokens_in:11,d} '
                   f'{kept["tokens"]:11,d} {sum(v["tokens"] for v in drops.values()):10,d}  {reasons}'
                   .rstrip())
  d = report['dedup']
  lines.append(f'dedup across sources: {d["exact_groups"]:,} exact groups ({d["exact_dropped"]:,} '
               f'copies dropped), {d["near_clusters"]:,} near-duplicate clusters '
               f'({d["near_dropped"]:,} documents dropped); runner: {report["runner"]}')
  lines.append('(tokens estimated from characters at each source\'s tokens per character; the '
               'shards\' exact counts are in the prepare summary)')
  return '\n'.join(lines)


def figure(report: dict) -> figure_lib.Figure:
  """Documents per source: a bar per stage, kept (green) and dropped (red), on a log scale."""
  by = outcomes(report)
  names = list(report['sources'])
  fig = figure_lib.Figure(figsize=(2.2 * len(STAGES), 3.2), layout='constrained')
  axes = fig.subplots(1, len(STAGES), sharey=True, squeeze=False)[0]
  for ax, stage in zip(axes, STAGES):
    kept = [by.get((n, stage), {}).get('kept', {}).get('docs', 0) for n in names]
    dropped = [sum(v['docs'] for k, v in by.get((n, stage), {}).items()
                   if k not in ('in', 'kept', 'edited')) for n in names]
    ax.bar(names, kept, color='tab:green', label='kept')
    ax.bar(names, dropped, bottom=kept, color='tab:red', label='dropped')
    ax.set_title(stage)
    ax.set_yscale('log')
    ax.tick_params(axis='x', labelrotation=45)
  axes[0].set_ylabel('documents')
  axes[-1].legend(fontsize='small')
  return fig


def save(report: dict, path: str) -> None:
  """Writes the report's JSON to `path` and its figure to the same path with .png (local or URL)."""
  fs.makedirs(os.path.dirname(path))
  fs.write_atomic(path, json.dumps(report, indent=1, ensure_ascii=False))
  fig = figure(report)
  backend_agg.FigureCanvasAgg(fig)  # draws without pyplot, so no global backend is chosen
  fs.write_figure(fig, os.path.splitext(path)[0] + '.png', dpi=90)


def load(path: str) -> dict:
  return json.loads(fs.read_text(path))
