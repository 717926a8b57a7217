"""One factory spec per generator family of the exporter's registry (:mod:`rag_export.graphs.families`)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class GeneratorSpec:
    """How the factory builds one family's generator.

    Attributes:
        config: transformers config class name.
        model: transformers model class name.
        layout: ``"bart"`` (byte-level BPE tokenizer, BART's config fields: every BART-like family) or ``"t5"``
            (unigram tokenizer, T5's fields); also picks the dimensions of :data:`rag_testing.factory.configs.SIZES`.
        embed_std: Std of the redrawn token embeddings. Pre-norm stacks (T5, mBART, Pegasus) keep the
            embedding in their residual stream to the end, and scaled embeddings (x sqrt(d_model)) are larger
            still: a large token embedding would dominate it and the model would repeat its input.
        variant: Config fields of the family's usual variant (a checkpoint's overrides try the others). Heads
            are untied for every family: random tied weights make the model predict its input token again.
        start_from_pad: Decoding starts from the pad token with no forced BOS (Marian, Pegasus); otherwise
            from EOS with BOS forced first (BART, mBART, as their real checkpoints do). T5 starts from pad.
        prefix: The generator config's ``prefix`` (RAG prepends it to every context).
    """

    config: str
    model: str
    layout: str
    embed_std: float
    variant: dict = field(default_factory=dict)
    start_from_pad: bool = False
    prefix: str | None = None


SPECS = {
    "bart": GeneratorSpec("BartConfig", "BartForConditionalGeneration", "bart", 0.5, {"scale_embedding": False}),
    "t5": GeneratorSpec("T5Config", "T5ForConditionalGeneration", "t5", 0.05,
                        {"feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32,
                         "relative_attention_max_distance": 128},
                        start_from_pad=True, prefix="answer: "),
    "mbart": GeneratorSpec("MBartConfig", "MBartForConditionalGeneration", "bart", 0.05, {"scale_embedding": True}),
    "marian": GeneratorSpec("MarianConfig", "MarianMTModel", "bart", 0.1,
                            {"scale_embedding": True, "activation_function": "swish"}, start_from_pad=True),
    "pegasus": GeneratorSpec("PegasusConfig", "PegasusForConditionalGeneration", "bart", 0.05,
                             {"scale_embedding": True, "activation_function": "relu"}, start_from_pad=True),
}


def generators() -> tuple[str, ...]:
    """The generator families the factory builds: the exporter's registry, in its order (imports torch)."""
    from rag_export.graphs.families import family_names

    return family_names()


def generator_spec(name: str) -> GeneratorSpec:
    """The spec of family ``name``.

    Raises:
        ValueError: ``name`` is not a registered family, or the registry has a family this module lacks.
    """
    if name not in generators():
        raise ValueError(f"unknown generator {name!r}; supported are: {', '.join(generators())}")
    if name not in SPECS:
        raise ValueError(f"generator family {name!r} is registered but the factory has no spec for it: add "
                         "one to rag_testing.factory.families.SPECS")
    return SPECS[name]
