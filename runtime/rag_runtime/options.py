"""Generation options: transformers' parameter names, defaults from the export's manifest."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import InvalidOptionError, UnknownOptionError

if TYPE_CHECKING:
    from .artifact import GenerationDefaults, RagSettings


@dataclass(frozen=True)
class GenerationOptions:
    """Parameters of ``RagPipeline.generate``; ``None`` means "the checkpoint's default".

    Attributes:
        num_beams: Beams (1 = greedy).
        max_length: Maximum answer length in tokens, decoder start token included.
        min_length: Minimum answer length (EOS blocked before it).
        n_docs: Passages retrieved and marginalized over per question.
        num_return_sequences: Answers returned per question (at most num_beams, RAG-Token beam search).
        no_repeat_ngram_size: Forbid repeating n-grams of this size (0 = off).
        length_penalty: Exponent of the length normalization in beam search.
        early_stopping: True, False or "never" (transformers' beam stopping rule).
        repetition_penalty: Penalty for tokens already generated (1.0 = off).
        forced_bos_token_id: Token forced first.
        forced_eos_token_id: Token forced at max_length - 1.
        bad_words_ids: Token sequences never generated.
        do_deduplication: RAG-Sequence: drop duplicate candidates before rescoring.
        fast_decoding: RAG-Sequence: skip rescoring candidates against passages that did not produce them
            (an approximation; not token-identical to the reference's thorough decoding).
        reference_compatible: RAG-Sequence: reproduce two behaviours of transformers' thorough decoding:
            candidates are generated from contexts padded to max_combined_length with the padding *not*
            masked, and rescored against the checkpoint's configured n_docs passages whatever n_docs was
            asked for. False masks the padding and rescores with the requested n_docs: cheaper and
            consistent, but not token-identical to the reference.
    """

    num_beams: int | None = None
    max_length: int | None = None
    min_length: int | None = None
    n_docs: int | None = None
    num_return_sequences: int | None = None
    no_repeat_ngram_size: int | None = None
    length_penalty: float | None = None
    early_stopping: bool | str | None = None
    repetition_penalty: float | None = None
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | None = None
    bad_words_ids: list[list[int]] | None = None
    do_deduplication: bool | None = None
    fast_decoding: bool = False
    reference_compatible: bool = True

    @classmethod
    def from_kwargs(cls, **kwargs) -> GenerationOptions:
        names = {f.name for f in dataclasses.fields(cls)}
        for key in kwargs:
            if key not in names:
                raise UnknownOptionError(f"generate() got an unexpected keyword argument {key!r}; "
                                f"accepted are: {', '.join(sorted(names))}")
        return cls(**kwargs)

    def resolved(self, defaults: GenerationDefaults, rag: RagSettings, kind: str) -> GenerationOptions:
        """Fill unset values from the export's defaults and validate the result."""
        values = dataclasses.asdict(self)
        fallback = {**dataclasses.asdict(defaults), "do_deduplication": rag.do_deduplication, "n_docs": rag.n_docs}
        for key, value in values.items():
            if value is None and key in fallback:
                values[key] = fallback[key]
        if values["num_return_sequences"] is None:
            values["num_return_sequences"] = 1
        opts = GenerationOptions(**values)
        opts._validate(kind)
        return opts

    def check_token_ids(self, vocab: int) -> None:
        """Every token id option must name a token of the generator's vocabulary."""
        ids = {"forced_bos_token_id": [self.forced_bos_token_id], "forced_eos_token_id": [self.forced_eos_token_id],
               "bad_words_ids": [t for w in self.bad_words_ids or [] for t in w]}
        for name, values in ids.items():
            for v in values:
                if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < vocab):
                    raise InvalidOptionError(f"{name} must hold token ids in [0, {vocab}), got {v!r}")

    def _validate(self, kind: str) -> None:
        def positive(name: str) -> None:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise InvalidOptionError(f"{name} must be a positive integer, got {v!r}")

        for name in ("num_beams", "max_length", "n_docs", "num_return_sequences"):
            positive(name)
        for name in ("fast_decoding", "reference_compatible", "do_deduplication"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidOptionError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("min_length", "no_repeat_ngram_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise InvalidOptionError(f"{name} must be a non-negative integer, got {v!r}")
        if self.min_length > self.max_length:
            raise InvalidOptionError(f"min_length ({self.min_length}) must not exceed max_length ({self.max_length})")
        if kind == "token" and self.num_return_sequences > self.num_beams:
            raise InvalidOptionError(f"num_return_sequences ({self.num_return_sequences}) must be <= num_beams "
                             f"({self.num_beams})")
        if (not isinstance(self.repetition_penalty, (int, float)) or isinstance(self.repetition_penalty, bool)
                or self.repetition_penalty <= 0):
            raise InvalidOptionError(f"repetition_penalty must be a positive float, got {self.repetition_penalty!r}")
        if not isinstance(self.length_penalty, (int, float)) or isinstance(self.length_penalty, bool):
            raise InvalidOptionError(f"length_penalty must be a number, got {self.length_penalty!r}")
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            raise InvalidOptionError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if self.bad_words_ids is not None and (
            not isinstance(self.bad_words_ids, list)
            or not all(isinstance(w, list) and w and all(isinstance(t, int) and t >= 0 for t in w)
                       for w in self.bad_words_ids)
        ):
            raise InvalidOptionError(f"bad_words_ids must be a list of non-empty lists of token ids, got {self.bad_words_ids!r}")
