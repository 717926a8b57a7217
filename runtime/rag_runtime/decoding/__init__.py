"""Decoding algorithms in numpy over a generator backend: testable without onnxruntime."""
