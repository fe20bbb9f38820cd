"""Streaming readers: every spec kind and compression, every kind of bad input counted by reason."""
import collections
import gzip
import json

import pytest

from lmjax.data import readers
from lmjax.data.records import Doc, Drop

CFG = readers.defaults()


def _read(spec, max_doc_bytes=None):
  cfg = readers.defaults()
  if max_doc_bytes:
    cfg.max_doc_bytes = max_doc_bytes
  records = list(readers.read(spec, 'src', cfg))
  docs = [r for r in records if isinstance(r, Doc)]
  drops = collections.Counter(r.reason for r in records if isinstance(r, Drop))
  assert all(r.source == 'src' for r in records)
  return docs, drops


def _jsonl(n, field='text'):
  return ''.join(json.dumps({field: f'document {i}', 'id': i}) + '\n' for i in range(n)).encode()


def test_spec_syntax():
  assert readers.parse_spec('txt:a/*.txt') == readers.Spec('txt', 'a/*.txt', '')
  assert readers.parse_spec('jsonl:a/**/*.jsonl.gz') == readers.Spec('jsonl', 'a/**/*.jsonl.gz',
                                                                     'text')
  assert readers.parse_spec('parquet:gs://b/x-*.parquet#content') == readers.Spec(
      'parquet', 'gs://b/x-*.parquet', 'content')
  assert readers.parse_spec('jsonl:dir#1/*.jsonl') == readers.Spec('jsonl', 'dir#1/*.jsonl', 'text')
  for bad in ('csv:x', 'x.txt', 'jsonl:', 'txt:a#text'):
    with pytest.raises(ValueError, match='reader spec'):
      readers.parse_spec(bad)


def test_txt_jsonl_gz_zst_read_in_sorted_order_with_ids(tmp_path):
  zstandard = pytest.importorskip('zstandard')
  (tmp_path / 'b.txt').write_text('second file\n')
  (tmp_path / 'a.txt').write_text('first file\n')
  (tmp_path / 'sub').mkdir()
  (tmp_path / 'sub' / 'c.txt').write_bytes(gzip.compress(b'nested and compressed'))
  (tmp_path / 'sub' / 'c.txt').rename(tmp_path / 'sub' / 'c.txt.gz')
  docs, drops = _read(f'txt:{tmp_path}/**/*.txt*')
  assert [(d.doc_id, d.text) for d in docs] == [
      (f'{tmp_path}/a.txt', 'first file\n'), (f'{tmp_path}/b.txt', 'second file\n'),
      (f'{tmp_path}/sub/c.txt.gz', 'nested and compressed')]
  assert not drops
  (tmp_path / 'p.jsonl').write_bytes(_jsonl(3, 'content'))
  (tmp_path / 'q.jsonl.gz').write_bytes(gzip.compress(_jsonl(2)) + gzip.compress(_jsonl(2)))
  (tmp_path / 'r.jsonl.zst').write_bytes(zstandard.ZstdCompressor().compress(_jsonl(4)))
  docs, drops = _read(f'jsonl:{tmp_path}/p.jsonl#content')
  assert [d.doc_id for d in docs] == [f'{tmp_path}/p.jsonl:{i}' for i in (1, 2, 3)]
  docs, drops = _read(f'jsonl:{tmp_path}/[qr].jsonl.*')
  assert [d.text for d in docs] == (['document 0', 'document 1'] * 2
                                    + [f'document {i}' for i in range(4)])
  assert not drops


def test_bad_jsonl_lines_are_counted_by_reason(tmp_path):
  lines = [b'{"text": "good one"}', b'not json', b'{"txt": "no field"}', b'[1, 2]',
           b'{"text": 7}', b'{"text": "   "}', b'{"text": "\\ud800 lone surrogate"}',
           b'{"text": "bad \xff utf8"}', b'', b'   ', b'{"text": "' + b'x' * 300 + b'"}',
           b'{"text": "good two"}', b'{"text": "good three, no newline at the end"}']
  (tmp_path / 'bad.jsonl').write_bytes(b'\n'.join(lines))
  docs, drops = _read(f'jsonl:{tmp_path}/bad.jsonl', max_doc_bytes=100)
  assert [d.text for d in docs] == ['good one', 'good two', 'good three, no newline at the end']
  assert [d.doc_id.rsplit(':', 1)[1] for d in docs] == ['1', '12', '13']
  assert drops == {'invalid_json': 1, 'missing_field': 2, 'not_text': 1, 'empty': 1,
                   'invalid_utf8': 2, 'too_large': 1}


def test_oversize_line_is_skipped_without_losing_the_next(tmp_path):
  big = b'{"text": "' + b'y' * (3 << 20) + b'"}\n'  # spans several 1 MiB read blocks
  (tmp_path / 'big.jsonl').write_bytes(big + _jsonl(2) + big)
  docs, drops = _read(f'jsonl:{tmp_path}/big.jsonl', max_doc_bytes=1 << 20)
  assert [d.doc_id.rsplit(':', 1)[1] for d in docs] == ['2', '3']
  assert drops == {'too_large': 2}


def test_truncated_and_corrupt_compressed_files(tmp_path):
  zstandard = pytest.importorskip('zstandard')
  data = _jsonl(20000)
  gz = gzip.compress(data)
  (tmp_path / 'cut.jsonl.gz').write_bytes(gz[:len(gz) // 2])
  zst = zstandard.ZstdCompressor().compress(data)
  (tmp_path / 'cut.jsonl.zst').write_bytes(zst[:-10])
  (tmp_path / 'junk.jsonl.gz').write_bytes(b'\x1f\x8b\x08\x00 this is not deflate data')
  (tmp_path / 'cut.txt.gz').write_bytes(gzip.compress(b'whole document')[:-6])
  docs, drops = _read(f'jsonl:{tmp_path}/*.jsonl.*')
  assert drops == {'truncated_file': 2, 'corrupt_file': 1}
  for name in ('cut.jsonl.gz', 'cut.jsonl.zst'):  # the documents before the cut are kept
    texts = [d.text for d in docs if d.doc_id.startswith(f'{tmp_path}/{name}:')]
    assert len(texts) < 20000 and texts == [f'document {i}' for i in range(len(texts))]
  assert any(d.doc_id.startswith(f'{tmp_path}/cut.jsonl.gz:') for d in docs)
  docs, drops = _read(f'txt:{tmp_path}/cut.txt.gz')
  assert not docs and drops == {'truncated_file': 1}


def test_gzip_bomb_stops_at_the_size_limit(tmp_path):
  (tmp_path / 'bomb.txt.gz').write_bytes(gzip.compress(bytes(64 << 20)))  # 64 MiB of zeros, 64 KB
  (tmp_path / 'bomb.jsonl.gz').write_bytes(gzip.compress(
      b'{"text": "' + b'z' * (64 << 20) + b'"}\n' + _jsonl(1)))
  docs, drops = _read(f'txt:{tmp_path}/bomb.txt.gz', max_doc_bytes=1 << 20)
  assert not docs and drops == {'too_large': 1}
  docs, drops = _read(f'jsonl:{tmp_path}/bomb.jsonl.gz', max_doc_bytes=1 << 20)
  assert [d.text for d in docs] == ['document 0'] and drops == {'too_large': 1}


def test_txt_files_too_large_invalid_or_empty(tmp_path):
  (tmp_path / 'big.txt').write_bytes(b'z' * 5000)
  (tmp_path / 'latin1.txt').write_bytes('caf\xe9'.encode('latin-1'))
  (tmp_path / 'blank.txt').write_bytes(b' \n\t\n')
  (tmp_path / 'ok.txt').write_bytes('café\n'.encode())
  docs, drops = _read(f'txt:{tmp_path}/*.txt', max_doc_bytes=1000)
  assert [d.text for d in docs] == ['café\n']
  assert drops == {'too_large': 1, 'invalid_utf8': 1, 'empty': 1}


def test_parquet_column_and_bad_cells(tmp_path):
  pa = pytest.importorskip('pyarrow')
  pq = pytest.importorskip('pyarrow.parquet')
  pq.write_table(pa.table({'body': ['first', None, '', 'fourth', 'x' * 200], 'n': [1, 2, 3, 4, 5]}),
                 tmp_path / 'a.parquet', row_group_size=2)
  pq.write_table(pa.table({'body': pa.array([b'bytes ok', b'\xff\xfe'], pa.binary())}),
                 tmp_path / 'b.parquet')
  pq.write_table(pa.table({'other': ['no body column']}), tmp_path / 'c.parquet')
  pq.write_table(pa.table({'body': [1, 2]}), tmp_path / 'd.parquet')
  (tmp_path / 'e.parquet').write_bytes(b'PAR1 not really parquet')
  docs, drops = _read(f'parquet:{tmp_path}/*.parquet#body', max_doc_bytes=100)
  assert [(d.doc_id.rsplit('/', 1)[1], d.text) for d in docs] == [
      ('a.parquet:0', 'first'), ('a.parquet:3', 'fourth'), ('b.parquet:0', 'bytes ok')]
  assert drops == {'missing_field': 2, 'empty': 1, 'too_large': 1, 'invalid_utf8': 1,
                   'not_text': 1, 'corrupt_file': 1}


def test_fsspec_urls_keep_their_protocol():
  fsspec = pytest.importorskip('fsspec')
  fs = fsspec.filesystem('memory')
  fs.pipe('/lmjax-test/shard-0.jsonl.gz', gzip.compress(_jsonl(2)))
  fs.pipe('/lmjax-test/shard-1.jsonl.gz', gzip.compress(_jsonl(1)))
  try:
    assert readers.list_files('jsonl:memory://lmjax-test/*.jsonl.gz') == [
        'memory:///lmjax-test/shard-0.jsonl.gz', 'memory:///lmjax-test/shard-1.jsonl.gz']
    docs, drops = _read('jsonl:memory://lmjax-test/*.jsonl.gz')
    assert [d.doc_id for d in docs] == ['memory:///lmjax-test/shard-0.jsonl.gz:1',
                                        'memory:///lmjax-test/shard-0.jsonl.gz:2',
                                        'memory:///lmjax-test/shard-1.jsonl.gz:1'] and not drops
  finally:
    fs.rm('/lmjax-test', recursive=True)
