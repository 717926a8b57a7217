"""Generator families and config variants: each exports with default validation and answers
token-identically to transformers, for RAG-Token and RAG-Sequence.

mBART, Marian and Pegasus run the BART-like decoder graph with other switches (pre-LayerNorm, final
LayerNorm, sinusoidal positions, embedding scale in the decoder); the BART and T5 variants cover the
config fields the issue lists (activations, scale_embedding, final_logits_bias, gated FFN, tied or not).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from support import assert_not_degenerate, reference_tokens, special_ids

RTOL = 1e-4


@dataclass(frozen=True)
class Variant:
    """A tiny checkpoint: generator family, config overrides and a random final_logits_bias."""

    generator: str
    overrides: dict = field(default_factory=dict)
    logits_bias_std: float = 0.2


VARIANTS = {
    "mbart": Variant("mbart"),  # pre-LN, scale_embedding, learned positions, final LayerNorm
    "marian": Variant("marian"),  # post-LN, sinusoidal positions, swish
    "pegasus": Variant("pegasus"),  # pre-LN, sinusoidal positions, relu
    "marian-tied": Variant("marian", {"tie_word_embeddings": True, "scale_embedding": False,
                                      "activation_function": "gelu"}),
    "bart-scaled-relu": Variant("bart", {"scale_embedding": True, "activation_function": "relu"}, 0.3),
    "bart-gelu-new": Variant("bart", {"activation_function": "gelu_new", "tie_word_embeddings": True}, 0.0),
    "t5-gated-silu": Variant("t5", {"feed_forward_proj": "gated-silu", "tie_word_embeddings": False}, 0.0),
    "t5-relu-tied": Variant("t5", {"feed_forward_proj": "relu", "tie_word_embeddings": True}, 0.0),
}
# The new families in both RAG kinds; the variants in RAG-Token (its reference runs the batch at once), to
# bound the run time.
CASES = [(name, kind) for name in ("mbart", "marian", "pegasus") for kind in ("token", "sequence")] + [
    ("marian-tied", "token"), ("bart-scaled-relu", "token"), ("bart-gelu-new", "token"),
    ("t5-gated-silu", "token"), ("t5-relu-tied", "token"),
]
SETTINGS = {
    "beam-return2-ndocs3-norepeat2": dict(num_beams=4, num_return_sequences=2, n_docs=3, no_repeat_ngram_size=2,
                                          max_length=12),
    "greedy-ndocs4-min5": dict(num_beams=1, n_docs=4, min_length=5, max_length=10, no_repeat_ngram_size=3),
}


class _Built:
    """A variant's checkpoint, its export (default validation), the reference and the pipeline, built once."""

    def __init__(self, work_dir: Path, name: str, kind: str):
        from rag_export import export
        from rag_runtime import RagPipeline
        from rag_testing.factory import make_checkpoint
        from rag_testing.reference import Reference

        v = VARIANTS[name]
        self.checkpoint = work_dir / f"family-{name}-{kind}"
        if not (self.checkpoint / "config.json").exists():
            make_checkpoint(self.checkpoint, kind, v.generator, generator_config=v.overrides,
                            logits_bias_std=v.logits_bias_std)
        self.export = work_dir / f"family-export-{name}-{kind}"
        if not (self.export / "manifest.json").exists():
            export(str(self.checkpoint), self.export, force=True)
        self.reference = Reference(str(self.checkpoint))
        self.pipeline = RagPipeline.load(self.export)


@pytest.fixture(scope="module")
def built(work_dir):
    cache: dict[tuple[str, str], _Built] = {}

    def get(name: str, kind: str) -> _Built:
        if (name, kind) not in cache:
            cache[(name, kind)] = _Built(work_dir, name, kind)
        return cache[(name, kind)]

    return get


@pytest.mark.parametrize(("name", "kind"), CASES, ids=[f"{n}-{k}" for n, k in CASES])
def test_family_matches_transformers(built, questions, name, kind):
    b = built(name, kind)
    manifest = json.loads((b.export / "manifest.json").read_text())
    assert manifest["generator_type"] == VARIANTS[name].generator
    gen_cfg = b.reference.model.generator.config
    for key, value in VARIANTS[name].overrides.items():
        if key != "tie_word_embeddings":  # T5Config rewrites it (into scale_decoder_outputs)
            assert getattr(gen_cfg, key) == value, key
    generator = b.reference.model.generator
    tied = generator.lm_head.weight.data_ptr() == generator.get_input_embeddings().weight.data_ptr()
    tie = VARIANTS[name].overrides.get("tie_word_embeddings", False)
    if VARIANTS[name].generator == "t5":
        # transformers 5.x always ties T5's head; tie_word_embeddings=False (T5 v1.1, flan-t5, mT5) means
        # unscaled decoder outputs, which the T5 graph reads.
        assert tied and gen_cfg.scale_decoder_outputs == tie
    else:
        assert tied == tie
    if VARIANTS[name].logits_bias_std:  # the bias is really there, and is in the exported logits
        assert float(b.reference.model.generator.final_logits_bias.abs().max()) > 0.1

    qs = [questions[0], questions[7], questions[13]]  # different lengths, padded together
    eos, pad = special_ids(b.pipeline)
    start = b.pipeline.manifest.generation_defaults.decoder_start_token_id
    for setting, params in SETTINGS.items():
        ref = b.reference.generate(qs, **params)
        got = b.pipeline.generate(qs, **params)
        assert_not_degenerate([r.sequences for r in ref], eos | {pad, start})
        assert len(got) == len(qs)
        for q, r, g in zip(qs, ref, got, strict=True):
            assert [d.id for d in g.docs] == r.doc_ids.tolist()
            np.testing.assert_allclose([d.score for d in g.docs], r.doc_scores, rtol=RTOL, atol=1e-5)
            assert len(g.answers) == params.get("num_return_sequences", 1)
            assert [a.token_ids for a in g.answers] == [reference_tokens(row, eos, pad) for row in r.sequences], (
                f"{setting} {q!r}: runtime scores {[a.score for a in g.answers]}, reference scores {r.scores}"
            )
            if r.scores is not None:
                np.testing.assert_allclose([a.score for a in g.answers], r.scores, rtol=RTOL, atol=1e-5)


def test_decoder_start_and_special_ids(built):
    """Marian and Pegasus decode from the pad token, mBART from EOS with BOS forced, as their checkpoints do."""
    for name, forced_bos in (("marian", None), ("pegasus", None), ("mbart", 0)):
        d = built(name, "token").pipeline.manifest.generation_defaults
        assert d.decoder_start_token_id == (d.pad_token_id if forced_bos is None else d.eos_token_id[0]), name
        assert d.forced_bos_token_id == forced_bos, name


@pytest.mark.parametrize("bad", [
    {"model_type": "prophetnet"},
    {"model_type": "marian", "decoder_vocab_size": 2000},
], ids=["unknown-type", "marian-separate-target-vocab"])
def test_unsupported_generator_refused(built, tmp_path, capsys, bad):
    from rag_export.cli import main

    src = built("marian", "token").checkpoint
    ckpt = tmp_path / "ckpt"
    shutil.copytree(src, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["generator"].update(bad)
    (ckpt / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    assert main([str(ckpt), str(out)]) == 2
    err = capsys.readouterr().err
    if bad["model_type"] == "prophetnet":
        assert "unsupported generator 'prophetnet'; supported are: bart, t5, mbart, marian, pegasus" in err
    else:
        assert "decoder_vocab_size 2000 != vocab_size" in err and "supported are:" in err
    assert not out.exists()


@pytest.mark.parametrize("name", ["mbart", "marian"])  # a pre-LN and a post-LN family
def test_optimized_family_matches_transformers(built, questions, tmp_path, name):
    """onnxruntime's BART fusions (the optimizer has no mBART/Marian/Pegasus type) on pre- and post-LN
    layers: the fused graphs validate and give the same answers."""
    import onnx

    from rag_export import export
    from rag_runtime import RagPipeline
    from rag_runtime import constants as C

    b = built(name, "token")
    out = export(str(b.checkpoint), tmp_path / "optimized", optimize=True)
    ops = {n.op_type for n in onnx.load(str(out / C.GENERATOR_DECODER_FILE)).graph.node}
    assert "SkipLayerNormalization" in ops, ops
    qs = questions[2:8]
    params = dict(num_beams=3, max_length=12, n_docs=5)
    ref = b.reference.generate(qs, **params)
    got = RagPipeline.load(out).generate(qs, **params)
    eos, pad = special_ids(b.pipeline)
    assert_not_degenerate([r.sequences for r in ref], eos | {pad, b.pipeline.manifest.generation_defaults.decoder_start_token_id})
    for r, g in zip(ref, got, strict=True):
        assert [a.token_ids for a in g.answers] == [reference_tokens(row, eos, pad) for row in r.sequences]


def test_the_factory_has_a_spec_for_every_registered_family():
    """The checkpoint factory builds every family of the exporter's registry, and no other."""
    from rag_export.graphs.families import family_names
    from rag_testing.factory.families import SPECS, generator_spec

    assert set(SPECS) == set(family_names())
    with pytest.raises(ValueError, match="unknown generator 'prophetnet'; supported are: bart, t5"):
        generator_spec("prophetnet")
