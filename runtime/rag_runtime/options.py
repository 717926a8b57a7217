"""Generation options: one declaration per option.

Each field of :class:`GenerationOptions` is declared once, with its type, bounds, where its default comes
from, the server cap that bounds it and its help text. From those declarations come the dataclass and its
validation (errors name the option), the ``rag-generate`` flags, the HTTP schema and caps of ``rag-serve``,
what ``/info`` lists, and the split into what the logits processors, the sampler and the search read.
Adding an option is one declaration here plus the decoding logic that reads it.

transformers' generation parameters that this runtime does not implement are listed in
:data:`UNSUPPORTED` with the reason, and refused by name; every other unknown name is a typo.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import InvalidOptionError, UnknownOptionError, UnsupportedOptionError

if TYPE_CHECKING:
    from .artifact import GenerationDefaults, RagSettings


def _integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class ValueType:
    """The kind of value an option takes, as a JSON body, a Python call and the command line give it.

    Attributes:
        name: How ``/info`` and the README name it (``"integer"``).
        phrase: How an error names it (``"an integer"``).
        fits: Whether a value is of this type.
        canonical: The value as the options hold it (lists become tuples, so options are hashable).
    """

    name: str
    phrase: str
    fits: Callable[[Any], bool]
    canonical: Callable[[Any], Any] = lambda v: v


def _ids(v) -> bool:
    return isinstance(v, (list, tuple)) and all(map(_integer, v))


INTEGER = ValueType("integer", "an integer", _integer)
NUMBER = ValueType("number", "a number", _number, float)
BOOLEAN = ValueType("boolean", "true or false", lambda v: isinstance(v, bool))
EARLY_STOPPING = ValueType("boolean or \"never\"", "true, false or \"never\"",
                           lambda v: isinstance(v, bool) or v == "never")
TOKEN_ID = ValueType("token id", "a token id", _integer)
TOKEN_IDS = ValueType("token ids", "a list of token ids", _ids, tuple)
TOKEN_SEQUENCES = ValueType("token id sequences", "a list of non-empty lists of token ids",
                            lambda v: isinstance(v, (list, tuple)) and all(_ids(w) and len(w) for w in v),
                            lambda v: tuple(tuple(w) for w in v))
TOKEN_TYPES = (TOKEN_ID, TOKEN_IDS, TOKEN_SEQUENCES)


@dataclass(frozen=True)
class Option:
    """The declaration of one generation option.

    Attributes:
        name: transformers' parameter name (the field of :class:`GenerationOptions`).
        type: The value's type.
        help: One line for the CLI, ``/info`` and the docstring.
        minimum: Smallest accepted value (inclusive), for numbers.
        above: Values must be strictly greater than this, for numbers.
        maximum: Largest accepted value (inclusive), for numbers.
        default: The value when neither the caller nor the export gives one.
        export: Where the export records the checkpoint's default: a field of the manifest's
            ``generation_defaults`` (``"num_beams"``) or of its ``rag`` settings (``"rag.n_docs"``).
        cap: The ``rag-serve`` limit (a ``ServeLimits`` field) that bounds the resolved value.
        sets: Another option this one overrides when given: ``max_new_tokens`` sets ``max_length`` to
            ``1 + max_new_tokens`` (the start token), as transformers' ``generate`` does.
        use: Which part of decoding reads it: ``processor`` (logits processors, ``ProcessorSettings``),
            ``sampler``, ``search``, ``rag`` (retrieval, RAG-Sequence decoding), ``decode`` (the decoder's
            start), ``none`` (read through the option it ``sets``, or accepted and changing nothing).
    """

    name: str
    type: ValueType
    help: str
    minimum: float | None = None
    above: float | None = None
    maximum: float | None = None
    default: Any = None
    export: str | None = None
    cap: str | None = None
    sets: str | None = None
    use: str = "processor"

    def check(self, value: Any) -> Any:
        """``value`` in canonical form, or an :class:`InvalidOptionError` naming this option."""
        if not self.type.fits(value):
            raise InvalidOptionError(f"{self.name} must be {self.type.phrase}, got {value!r}", self.name,
                                     "invalid_type")
        value = self.type.canonical(value)
        if self.type in (INTEGER, NUMBER):
            low = (self.minimum is None or value >= self.minimum) and (self.above is None or value > self.above)
            if not low or (self.maximum is not None and value > self.maximum):
                raise InvalidOptionError(f"{self.name} must be {self.bounds()}, got {value!r}", self.name)
        elif self.type in TOKEN_TYPES and any(t < 0 for t in _token_ids(value)):
            raise InvalidOptionError(f"{self.name} must hold non-negative token ids, got {value!r}", self.name)
        return value

    def bounds(self) -> str:
        """The accepted values in words (``"an integer >= 1"``)."""
        parts = [f"{sign} {_fmt(v)}" for sign, v in ((">", self.above), (">=", self.minimum), ("<=", self.maximum))
                 if v is not None]
        return " ".join([self.type.phrase, " and ".join(parts)]).strip()


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _token_ids(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [t for v in value for t in ((v,) if isinstance(v, int) else v)]


def _option(type: ValueType, help: str, **kwargs) -> Any:
    """A :class:`GenerationOptions` field declared by an :class:`Option` (its name is the field's)."""
    return field(default=None, metadata={"option": dict(type=type, help=help, **kwargs)})


@dataclass(frozen=True)
class GenerationOptions:
    """Parameters of ``RagPipeline.generate``, resolved: every field holds the value decoding uses.

    Build one with :meth:`resolve`; the attributes are documented by their declarations (:data:`OPTIONS`).
    """

    # The search.
    num_beams: int = _option(INTEGER, "beams (1 = greedy or multinomial sampling)", minimum=1,
                             export="num_beams", cap="max_num_beams", use="search")
    num_return_sequences: int = _option(
        INTEGER, "answers returned per question (RAG-Token: at most num_beams; RAG-Sequence: at most "
        "n_docs x num_beams)", minimum=1, export="num_return_sequences", cap="max_num_beams", use="search")
    length_penalty: float = _option(NUMBER, "exponent of the length normalization of finished beams",
                                    export="length_penalty", use="search")
    early_stopping: bool | str = _option(EARLY_STOPPING, "beam stopping rule: true, false or never",
                                         export="early_stopping", use="search")
    # Lengths (the start token counts in max_length and min_length).
    max_length: int = _option(INTEGER, "maximum answer length in tokens, decoder start token included",
                              minimum=1, export="max_length", cap="max_length")
    max_new_tokens: int | None = _option(INTEGER, "tokens generated after the start token; overrides max_length "
                                         "(max_length = 1 + max_new_tokens)", minimum=1, export="max_new_tokens",
                                         sets="max_length", use="none")
    min_length: int = _option(INTEGER, "EOS is blocked while the answer, start token included, is shorter",
                              minimum=0, export="min_length", cap="max_length")
    min_new_tokens: int | None = _option(INTEGER, "EOS is blocked before this many generated tokens; overrides "
                                         "min_length (min_length = 1 + min_new_tokens)", minimum=0,
                                         export="min_new_tokens", sets="min_length", use="none")
    decoder_start_token_id: int = _option(TOKEN_ID, "token every answer starts with",
                                          export="decoder_start_token_id", use="decode")
    # Logits processors, applied in transformers' order.
    repetition_penalty: float = _option(NUMBER, "penalty on tokens already generated (1.0 = off)", above=0,
                                        export="repetition_penalty")
    no_repeat_ngram_size: int = _option(INTEGER, "no n-gram of this size is generated twice (0 = off)", minimum=0,
                                        export="no_repeat_ngram_size")
    bad_words_ids: tuple | None = _option(TOKEN_SEQUENCES, "token sequences that are never generated",
                                          export="bad_words_ids")
    forced_bos_token_id: int | None = _option(TOKEN_ID, "token forced as the first generated one",
                                              export="forced_bos_token_id")
    forced_eos_token_id: int | None = _option(TOKEN_ID, "token forced at max_length - 1",
                                              export="forced_eos_token_id")
    suppress_tokens: tuple | None = _option(TOKEN_IDS, "tokens never generated", export="suppress_tokens")
    begin_suppress_tokens: tuple | None = _option(TOKEN_IDS, "tokens not generated first",
                                                  export="begin_suppress_tokens")
    # Sampling (multinomial with num_beams 1, beam sampling above).
    do_sample: bool = _option(BOOLEAN, "sample tokens instead of taking the best ones", export="do_sample",
                              use="sampler")
    temperature: float = _option(NUMBER, "divides the scores before sampling", above=0, export="temperature",
                                 use="sampler")
    top_k: int = _option(INTEGER, "sample among this many best tokens (0 = all)", minimum=0, export="top_k",
                         use="sampler")
    top_p: float = _option(NUMBER, "sample among the fewest best tokens whose probability reaches this",
                           minimum=0, maximum=1, export="top_p", use="sampler")
    seed: int | None = _option(INTEGER, "seed of a question's sampling (the same seed gives the same answer; "
                               "unset: fresh randomness)", minimum=0, use="sampler")
    # RAG.
    n_docs: int = _option(INTEGER, "passages retrieved and marginalized over per question", minimum=1,
                          export="rag.n_docs", cap="max_n_docs", use="rag")
    do_deduplication: bool = _option(BOOLEAN, "RAG-Sequence: drop repeated candidates before rescoring",
                                     export="rag.do_deduplication", use="rag")
    fast_decoding: bool = _option(BOOLEAN, "RAG-Sequence: rescore a candidate only with the passages that "
                                  "produced it (an approximation, not token-identical)", default=False, use="rag")
    reference_compatible: bool = _option(
        BOOLEAN, "RAG-Sequence: generate candidates from contexts padded to max_combined_length, unmasked, and "
        "rescore with the configured n_docs, as transformers does (false: masked, the requested n_docs)",
        default=True, use="rag")
    use_cache: bool = _option(BOOLEAN, "accepted for transformers compatibility: the runtime always decodes with "
                              "its KV cache (same answers)", default=True, use="none")

    @classmethod
    def resolve(cls, kwargs: dict, defaults: GenerationDefaults, rag: RagSettings, kind: str, *,
                vocab: int | None = None, max_positions: int | None = None) -> GenerationOptions:
        """``kwargs`` (transformers' names) over the export's defaults, validated.

        Raises:
            UnknownOptionError: A name no option has (a ``TypeError``), with the closest names.
            UnsupportedOptionError: A transformers parameter this runtime does not implement.
            InvalidOptionError: A value of the wrong type or out of range; ``field`` names the option.
        """
        given = {name: OPTIONS[_known(name)].check(value) for name, value in kwargs.items() if value is not None}
        values = {name: given[name] if name in given else _default(opt, defaults, rag)
                  for name, opt in OPTIONS.items()}
        # transformers' generate: a count of new tokens takes precedence over the total length.
        for opt in OPTIONS.values():
            if opt.sets and values[opt.name] is not None:
                values[opt.sets] = 1 + values[opt.name]
        opts = cls(**values)
        opts._check_together(kind, given, vocab, max_positions)
        return opts

    def settings(self, use: str) -> dict[str, Any]:
        """The options one part of decoding reads (``use`` as declared), by name."""
        return {name: getattr(self, name) for name, opt in OPTIONS.items() if opt.use == use}

    def _check_together(self, kind: str, given: dict, vocab: int | None, max_positions: int | None) -> None:
        def fail(message: str, *names: str) -> None:
            # Name the option the caller set (the other one may be the export's default).
            raise InvalidOptionError(message, next((n for n in names if n in given), names[0]))

        length = source_of("max_length", given)
        if self.min_length > self.max_length:
            fail(f"min_length ({self.min_length}) must not exceed max_length ({self.max_length})",
                 source_of("min_length", given), length)
        if kind == "token" and self.num_return_sequences > self.num_beams:
            fail(f"num_return_sequences ({self.num_return_sequences}) must be <= num_beams ({self.num_beams})",
                 "num_return_sequences", "num_beams")
        if kind == "sequence" and self.num_return_sequences > self.n_docs * self.num_beams:
            fail(f"num_return_sequences ({self.num_return_sequences}) must be <= n_docs * num_beams "
                 f"({self.n_docs * self.num_beams})", "num_return_sequences", "num_beams", "n_docs")
        if max_positions is not None and self.max_length > max_positions:
            fail(f"max_length {self.max_length} exceeds the generator's {max_positions} decoder positions; use "
                 f"max_length <= {max_positions}", length)
        if vocab is not None:
            for name, opt in OPTIONS.items():
                bad = [t for t in _token_ids(getattr(self, name)) if t >= vocab] if opt.type in TOKEN_TYPES else []
                if bad:
                    fail(f"{name} must hold token ids in [0, {vocab}), got {bad[0]!r}", name)


def source_of(name: str, given) -> str:
    """The option a caller set that decides ``name``'s resolved value (``max_new_tokens`` for
    ``max_length`` when it was given), else ``name`` itself."""
    return next((o.name for o in OPTIONS.values() if o.sets == name and o.name in given), name)


def _declared() -> dict[str, Option]:
    return {f.name: Option(name=f.name, **f.metadata["option"]) for f in dataclasses.fields(GenerationOptions)}


OPTIONS: dict[str, Option] = _declared()
"""Every generation option by name, in declaration order."""


def _docstring() -> str:
    lines = [GenerationOptions.__doc__.rstrip(), "", "    Attributes:"]
    lines += [f"        {o.name}: {o.help[0].upper()}{o.help[1:]}." for o in OPTIONS.values()]
    return "\n".join(lines) + "\n"


GenerationOptions.__doc__ = _docstring()


def _default(opt: Option, defaults: GenerationDefaults, rag: RagSettings) -> Any:
    if opt.export is None:
        return opt.default
    source, name = (rag, opt.export[4:]) if opt.export.startswith("rag.") else (defaults, opt.export)
    value = getattr(source, name, None)
    return opt.type.canonical(value) if value is not None else opt.default


# transformers' GenerationConfig parameters that the runtime refuses, with the reason (README's table).
_MODES = "a decoding mode transformers' RAG generate refuses too (it allows greedy, sampling and beam search)"
_OUTPUTS = "the runtime returns answers with their scores and passages; per-step outputs are not exposed"
_TORCH = "a PyTorch execution setting with no meaning for the exported graphs"
_EXPORT = "fixed at export from the checkpoint (re-export with another generation config to change it)"
UNSUPPORTED: dict[str, str] = {
    **dict.fromkeys(("num_beam_groups", "diversity_penalty"), f"group beam search: {_MODES}"),
    "penalty_alpha": f"contrastive search: {_MODES}",
    **dict.fromkeys(("constraints", "force_words_ids"), f"constrained beam search: {_MODES}"),
    "dola_layers": f"DoLa decoding: {_MODES}",
    **dict.fromkeys(("assistant_confidence_threshold", "assistant_early_exit", "assistant_lookbehind",
                     "num_assistant_tokens", "num_assistant_tokens_schedule", "prompt_lookup_num_tokens",
                     "max_matching_ngram_size", "target_lookbehind", "is_assistant", "use_mtp",
                     "speculation_type", "assistant_ensemble_weight"), f"assisted generation: {_MODES}"),
    **dict.fromkeys(("output_scores", "output_logits", "output_attentions", "output_hidden_states",
                     "return_dict_in_generate"), _OUTPUTS),
    **dict.fromkeys(("cache_implementation", "cache_config", "compile_config", "disable_compile", "low_memory",
                     "prefill_chunk_size", "max_cache_len", "continuous_batching_config"), _TORCH),
    **dict.fromkeys(("eos_token_id", "pad_token_id", "bos_token_id"), _EXPORT),
    "max_time": "a wall-clock limit: rag-serve bounds a request with timeout_s instead",
    "stop_strings": "needs the tokenizer inside generate; RAG's generate passes none and fails on it",
    "token_healing": "needs the tokenizer inside generate; not implemented",
    "guidance_scale": "classifier-free guidance needs an unconditional prompt; not implemented",
    "watermarking_config": "watermarking is not implemented",
    **dict.fromkeys(("encoder_repetition_penalty", "encoder_no_repeat_ngram_size"),
                    "reads the encoder input ids, which RAG-Token's generate passes with passage rows where the "
                    "processor expects beam rows; not implemented"),
    **dict.fromkeys(("sequence_bias", "exponential_decay_length_penalty", "remove_invalid_values",
                     "renormalize_logits", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "top_h"),
                    "not implemented yet"),
}


def _known(name: str) -> str:
    if name in OPTIONS:
        return name
    if name in UNSUPPORTED:
        raise UnsupportedOptionError(f"{name} is not supported by rag_runtime: {UNSUPPORTED[name]}", name)
    close = difflib.get_close_matches(name, OPTIONS, n=3)
    hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
    raise UnknownOptionError(f"generate() got an unexpected keyword argument {name!r}; {hint}accepted are: "
                             f"{', '.join(OPTIONS)}", name)


__all__ = ["OPTIONS", "UNSUPPORTED", "GenerationOptions", "Option", "ValueType", "source_of"]
