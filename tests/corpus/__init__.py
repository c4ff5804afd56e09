"""The model corpus: real model families built by the tests (see docs/corpus.md)."""
