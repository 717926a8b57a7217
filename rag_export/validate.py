"""Check each exported graph in onnxruntime against PyTorch: shapes first, then values."""

from __future__ import annotations

import logging

import numpy as np
import torch

from rag_runtime import constants as C

from .errors import ValidationError

logger = logging.getLogger(__name__)


def _session(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def compare(graph: str, names: list[str], ort_outputs, torch_outputs, atol: float) -> dict[str, float]:
    """Max abs difference per output; raises ValidationError on a shape mismatch or a violation."""
    diffs = {}
    for name, got, ref in zip(names, ort_outputs, torch_outputs, strict=True):
        ref = ref.detach().numpy() if isinstance(ref, torch.Tensor) else np.asarray(ref)
        if got.shape != ref.shape:
            raise ValidationError(graph, f"{name} shape {got.shape} vs {ref.shape}", float("inf"), atol)
        diffs[name] = float(np.abs(got.astype(np.float32) - ref.astype(np.float32)).max()) if got.size else 0.0
    worst = max(diffs, key=diffs.get)
    if diffs[worst] > atol:
        raise ValidationError(graph, worst, diffs[worst], atol)
    return diffs


def _sample_ids(vocab: int, rows: int, length: int, seed: int, low: int = 5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, max(low + 1, min(vocab, 30000)), (rows, length), generator=g)
    mask = torch.ones_like(ids)
    for r in range(1, rows):  # ragged rows, right-padded like the tokenizers pad
        mask[r, max(2, length - 3 * r):] = 0
    return ids, mask


def validate_encoder(graph: str, path, module, output_names, vocab: int, atol: float) -> dict[str, float]:
    ids, mask = _sample_ids(vocab, 3, 13, seed=1)
    with torch.no_grad():
        ref = module(ids, mask)
    ref = ref if isinstance(ref, tuple) else (ref,)
    got = _session(path).run(output_names, {C.INPUT_IDS: ids.numpy(), C.ATTENTION_MASK: mask.numpy()})
    return compare(graph, output_names, got, ref, atol)


def validate_generator(encoder_path, decoder_path, generator, dims: dict, decoder_start: int, atol: float,
                       steps: int = 5, beams: int = 2) -> dict[str, float]:
    """Encode, then decode ``steps`` tokens one at a time with the KV cache and ``beams`` folded rows per
    context, and compare each step's logits with the PyTorch generator run on the whole prefix."""
    enc, dec = _session(encoder_path), _session(decoder_path)
    ids, mask = _sample_ids(dims["vocab"], 2, 11, seed=2)
    hidden, keys, values = enc.run(None, {C.INPUT_IDS: ids.numpy(), C.ATTENTION_MASK: mask.numpy()})
    with torch.no_grad():
        ref_hidden = generator.get_encoder()(input_ids=ids, attention_mask=mask, return_dict=True)[0]
    diffs = compare("generator_encoder", [C.ENCODER_HIDDEN_STATES], [hidden], [ref_hidden], atol)

    rows = ids.shape[0] * beams
    g = torch.Generator().manual_seed(3)
    dec_ids = torch.randint(5, max(6, min(dims["vocab"], 30000)), (rows, steps), generator=g)
    dec_ids[:, 0] = decoder_start
    with torch.no_grad():
        ref_logits = generator(input_ids=ids.repeat_interleave(beams, 0),
                               attention_mask=mask.repeat_interleave(beams, 0),
                               decoder_input_ids=dec_ids).logits.numpy()
    shape = (dims["layers"], rows, dims["heads"], 0, dims["head_dim"])
    past_k = past_v = np.zeros(shape, dtype=np.float32)
    worst = 0.0
    for t in range(steps):
        logits, past_k, past_v = dec.run(None, {
            C.DECODER_INPUT_IDS: dec_ids[:, t : t + 1].numpy(), C.PAST_KEYS: past_k, C.PAST_VALUES: past_v,
            C.CROSS_KEYS: keys, C.CROSS_VALUES: values, C.ENCODER_ATTENTION_MASK: mask.numpy(),
        })
        step = compare("generator_decoder", [f"{C.LOGITS}[step {t}]"], [logits[:, 0]], [ref_logits[:, t]], atol)
        worst = max(worst, *step.values())
    diffs[f"{C.LOGITS} ({steps} cached steps)"] = worst
    return diffs
