"""The export directory's contract: a typed ``manifest.json``.

The exporter builds a :class:`Manifest` and saves it; the runtime, the index tools and the service load
it. Nobody else reads manifest keys. The JSON layout is the dataclasses' fields, nested as they nest.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import constants as C
from .errors import ArtifactError
from .files import atomic_write_text, sha256_file


@dataclass
class TensorSpec:
    """A graph input or output: name, element type and a symbolic name (or size) per axis."""

    name: str
    dtype: str
    shape: list[str]


@dataclass
class GraphFile:
    """One ONNX graph of the export."""

    file: str
    sha256: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def dtype(self, name: str) -> str:
        """Element type of the input or output ``name``."""
        for spec in (*self.inputs, *self.outputs):
            if spec.name == name:
                return spec.dtype
        raise KeyError(name)


@dataclass
class DecoderDims:
    """What the runtime needs to build an empty self-attention cache, and the logits' width."""

    layers: int
    heads: int
    head_dim: int
    d_model: int
    vocab: int
    kv_dtype: str = "float32"
    max_positions: int | None = None  # the decoder's position table; None: unbounded (T5's relative buckets)


@dataclass
class TokenizerFile:
    """A ``tokenizer.json`` plus the transformers-side settings that change encoding or decoding."""

    file: str
    clean_up_tokenization_spaces: bool = False
    pad_token_id: int | None = None
    model_max_length: int = 512
    model: str | None = None


@dataclass
class RagSettings:
    """The RagConfig fields that matter at run time, and the generator ids rescoring uses."""

    n_docs: int
    title_sep: str
    doc_sep: str
    max_combined_length: int
    do_deduplication: bool
    exclude_bos_score: bool
    label_smoothing: float | None
    retrieval_vector_size: int
    index_name: str | None
    dataset: str | None
    prefix: str | None
    rescoring_bos_token_id: int | None
    generator_pad_token_id: int | None


@dataclass
class GenerationDefaults:
    """What ``generate()`` uses when a caller passes nothing, resolved once at export by the installed
    transformers (4.x and 5.x derive them differently from old checkpoints)."""

    num_beams: int
    max_length: int
    min_length: int
    no_repeat_ngram_size: int
    length_penalty: float
    early_stopping: bool | str
    forced_bos_token_id: int | None
    forced_eos_token_id: int | None
    repetition_penalty: float
    bad_words_ids: list[list[int]] | None
    num_return_sequences: int
    decoder_start_token_id: int
    eos_token_id: list[int] | None
    pad_token_id: int | None
    bos_token_id: int | None
    # Recorded since the option schema; older manifests take transformers' GenerationConfig defaults.
    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    suppress_tokens: list[int] | None = None
    begin_suppress_tokens: list[int] | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float = 1.0


@dataclass
class IndexRef:
    """The knowledge index the export retrieves from (``dir`` relative to the export, or absolute)."""

    dir: str
    count: int
    dim: int
    factory: str
    encoder: dict | None = None


@dataclass
class Manifest:
    """``manifest.json``. An export made for index building alone (a context encoder) has only the
    first fields; a full RAG export has all of them.

    Attributes:
        format_version: Layout version; the runtime reads exactly :data:`constants.FORMAT_VERSION`.
        source: The checkpoint (hub id or path) it was exported from.
        graphs: Every graph by name (``constants.QUESTION_ENCODER``, ...).
        tokenizers: Every tokenizer by name (``constants.QUESTION_TOKENIZER``, ...).
        files: sha256 of every file of the export except the knowledge index (which checks itself).
        kind: ``"token"`` or ``"sequence"``.
        generator_type: The generator family (``"bart"``, ``"t5"``).
        precision: ``fp32``, ``fp16`` or ``int8``.
        validation: Export-time figures per graph (differences against PyTorch, drift of reduced precision).
    """

    format_version: int
    source: str
    graphs: dict[str, GraphFile]
    tokenizers: dict[str, TokenizerFile]
    files: dict[str, str] = field(default_factory=dict)
    context_encoder_source: str | None = None
    opset: int | None = None
    versions: dict[str, str] = field(default_factory=dict)
    validation: dict[str, dict] = field(default_factory=dict)
    kind: str | None = None
    generator_type: str | None = None
    precision: str = "fp32"
    optimized: bool = False
    decoder: DecoderDims | None = None
    question_embedding_dim: int | None = None
    rag: RagSettings | None = None
    generation_defaults: GenerationDefaults | None = None
    index: IndexRef | None = None

    def graph(self, name: str) -> GraphFile:
        """The graph ``name``, or an :class:`ArtifactError` saying the export lacks it."""
        if name not in self.graphs:
            raise ArtifactError(f"the export has no {name} graph (it has: {', '.join(self.graphs)})")
        return self.graphs[name]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, export_dir: str | Path) -> None:
        """Write ``manifest.json`` atomically."""
        atomic_write_text(Path(export_dir) / C.MANIFEST_FILE, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, export_dir: str | Path, verify: bool = True) -> Manifest:
        """Read ``manifest.json``; with ``verify``, check every listed file exists and matches its sha256.

        Raises:
            ArtifactError: Missing directory or manifest, corrupted JSON, another format version, or
                (with ``verify``) a missing or altered file.
        """
        root = Path(export_dir)
        path = root / C.MANIFEST_FILE
        if not root.is_dir():
            raise ArtifactError(f"export directory {root} does not exist")
        if not path.is_file():
            raise ArtifactError(f"{root} has no {C.MANIFEST_FILE}: not a rag-export output (run rag-export first)")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ArtifactError(f"{path} is corrupted: {e}") from e
        version = raw.get("format_version") if isinstance(raw, dict) else None
        if version != C.FORMAT_VERSION:
            raise ArtifactError(f"{path} has format version {version}; this runtime reads {C.FORMAT_VERSION} "
                                "(re-export with the matching rag-export)")
        try:
            manifest = _build(cls, raw, "manifest")
        except (TypeError, ValueError, AttributeError) as e:
            raise ArtifactError(f"{path} is corrupted: {e}") from e
        if verify:
            manifest.verify(root)
        return manifest

    def verify(self, root: Path) -> None:
        """Check every listed file exists and matches its sha256."""
        for rel, digest in self.files.items():
            f = root / rel
            if not f.is_file():
                raise ArtifactError(f"{f} is missing (listed in the manifest); re-export or restore it")
            if sha256_file(f) != digest:
                raise ArtifactError(f"{f} does not match its sha256 in the manifest: corrupted or replaced; "
                                    "re-export it")


def _build(tp: Any, value: Any, where: str) -> Any:
    """``value`` (parsed JSON) as type ``tp``: dataclasses, optionals, lists and dicts of them."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _build(inner[0], value, where) if len(inner) == 1 else value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise TypeError(f"{where} should be an object, got {type(value).__name__}")
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp)}
        missing = [n for n, f in fields.items() if n not in value and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ValueError(f"{where} lacks {', '.join(missing)}")
        return tp(**{n: _build(hints[n], value[n], f"{where}.{n}") for n in fields if n in value})
    if origin is list and args and dataclasses.is_dataclass(args[0]):
        return [_build(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict and len(args) == 2 and dataclasses.is_dataclass(args[1]):
        return {k: _build(args[1], v, f"{where}.{k}") for k, v in value.items()}
    return value
