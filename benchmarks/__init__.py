"""Benchmarks: rag_runtime against the transformers reference."""
