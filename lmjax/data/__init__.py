"""Data: real corpora (corpora.py) -> sentencepiece (tokenizer.py) -> ArrayRecord shards (prepare.py)
-> grain mixture of packed rows with stage-scheduled weights (pipeline.py; its `build` is the entry)."""
