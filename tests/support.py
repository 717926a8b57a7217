"""Test helpers shared by the parity tests: an independent reading of the reference's rows, and the
check that a reference output is varied enough for agreement with it to mean something."""

from __future__ import annotations

import numpy as np


def assert_not_degenerate(rows: list[np.ndarray], special: set[int]) -> None:
    generated = [t for r in rows for seq in r for t in seq[1:].tolist() if t not in special]
    assert len(set(generated)) >= 3, f"reference output is degenerate: {rows}"


def reference_tokens(row: np.ndarray, eos: set[int], pad: int) -> list[int]:
    """A reference row as the runtime reports an answer's token ids: up to its first EOS after the start
    token, else without trailing padding. Written here independently of the runtime's own trimming."""
    tokens = row.tolist()
    for i in range(1, len(tokens)):
        if tokens[i] in eos:
            return tokens[: i + 1]
    while len(tokens) > 1 and tokens[-1] == pad:
        tokens.pop()
    return tokens


def special_ids(pipeline) -> tuple[set[int], int]:
    """EOS ids and the pad id the export recorded."""
    d = pipeline.manifest.generation_defaults
    return set(d.eos_token_id), d.pad_token_id


def spread_checkpoint(src, dst, std: float, seed: int = 1):
    """A copy of the RAG checkpoint ``src`` at ``dst`` whose every matrix of the question encoder and the
    generator is redrawn from N(0, std^2): std 1 makes attention nearly one-hot and the logits large,
    the hardest case for fp32 agreement."""
    import shutil
    from pathlib import Path

    import torch
    from transformers import AutoConfig, RagSequenceForGeneration, RagTokenForGeneration

    src, dst = Path(src), Path(dst)
    if (dst / "spread.done").is_file():
        return dst
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    token = "RagTokenForGeneration" in (AutoConfig.from_pretrained(src).architectures or [])
    model = (RagTokenForGeneration if token else RagSequenceForGeneration).from_pretrained(src).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and ("question_encoder" in name or "generator" in name):
                p.copy_(torch.randn(p.shape, generator=g) * std)
    model.save_pretrained(dst)
    (dst / "spread.done").write_text("ok")
    return dst
