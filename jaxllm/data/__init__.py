"""Data layer: document sources, the SentencePiece tokenizer and grain input pipelines.

- `sources`: source spec strings (`text:`, `jsonl:`, `tfds:`, `stdlib:`) and their documents.
- `tokenizer`: training and loading the run's SentencePiece model (special ids, sentinels, roles).
- `lm`: the token cache and the causal-LM pretraining pipeline (packed rows, resumable order).
"""
