"""Random weights scaled so that tiny random models give peaked, varied logits (a parity test over a model
that repeats one token proves nothing)."""

from __future__ import annotations


def scale_weights(model, seed: int, gain: float = 1.0, embed_std: float = 0.5) -> None:
    """Re-draw every matrix with std gain/sqrt(fan_in) (token embeddings: ``embed_std``)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() < 2 or not p.requires_grad:  # frozen: Marian's and Pegasus' sinusoidal positions
                continue
            fan_in = p.shape[-1]
            std = gain / fan_in**0.5
            if "relative_attention_bias" in name:
                std = 0.5
            elif "embed" in name or "shared" in name:
                std = embed_std
            elif any(k in name for k in ("q_proj", "k_proj", ".q.", ".k.")):
                std *= 2.0  # sharper attention: outputs then depend on which passage was retrieved
            p.copy_(torch.randn(p.shape, generator=g) * std)


def draw_logits_bias(model, seed: int, std: float) -> None:
    """Draw a BART-like generator's ``final_logits_bias`` from N(0, std^2)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    model.final_logits_bias.copy_(torch.randn(model.final_logits_bias.shape, generator=g) * std)
