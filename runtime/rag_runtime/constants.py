"""Names shared by the exporter and the runtime: the artifact directory's files and every graph's IO.

The exporter writes these into ``manifest.json`` and the runtime reads them back from there; neither
side retypes a name.
"""

# 2: decoder takes beam_idx; rag_token_head graph. 3: cross K/V and the KV cache travel per layer.
# 4: the decoder takes rows of different lengths (positions, a slot cache, any beams per passage).
FORMAT_VERSION = 4

MANIFEST_FILE = "manifest.json"

# Graphs, as the manifest's ``graphs`` keys name them.
QUESTION_ENCODER = "question_encoder"
GENERATOR_ENCODER = "generator_encoder"
GENERATOR_DECODER = "generator_decoder"
RAG_TOKEN_HEAD = "rag_token_head"
SEQUENCE_SCORER = "sequence_scorer"
BEAM_STEP = "beam_step"  # RAG-Sequence: one beam-search step per passage (absent in exports before it)
CONTEXT_ENCODER = "context_encoder"

# Tokenizers, as the manifest's ``tokenizers`` keys name them.
QUESTION_TOKENIZER = "question_encoder"
GENERATOR_TOKENIZER = "generator"
CONTEXT_TOKENIZER = "context_encoder"
QUESTION_ENCODER_FILE = "question_encoder.onnx"
GENERATOR_ENCODER_FILE = "generator_encoder.onnx"
GENERATOR_DECODER_FILE = "generator_decoder.onnx"
CONTEXT_ENCODER_FILE = "context_encoder.onnx"
RAG_TOKEN_HEAD_FILE = "rag_token_head.onnx"
SEQUENCE_SCORER_FILE = "sequence_scorer.onnx"
BEAM_STEP_FILE = "beam_step.onnx"
QUESTION_TOKENIZER_FILE = "tokenizers/question_encoder.json"
GENERATOR_TOKENIZER_FILE = "tokenizers/generator.json"
CONTEXT_TOKENIZER_FILE = "tokenizers/context_encoder.json"

INDEX_DIR = "index"
INDEX_FAISS_FILE = "index.faiss"
INDEX_EMBEDDINGS_FILE = "embeddings.npy"
INDEX_PASSAGES_FILE = "passages.jsonl"
INDEX_OFFSETS_FILE = "passages.offsets.npy"
INDEX_META_FILE = "index.json"

# Graph IO.
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
QUESTION_EMBEDDING = "question_embedding"
PASSAGE_EMBEDDING = "passage_embedding"
ENCODER_HIDDEN_STATES = "encoder_hidden_states"
# Per decoder layer (``cross_keys.0``, ``cross_keys.1``, ...: see :func:`per_layer`), so that no graph
# slices a layer out of a stacked tensor (a copy per layer and step in onnxruntime).
CROSS_KEYS = "cross_keys"
CROSS_VALUES = "cross_values"
DECODER_INPUT_IDS = "decoder_input_ids"
ENCODER_ATTENTION_MASK = "encoder_attention_mask"
# Rows of different lengths and questions: each row's cached length, the row of the last call's cache it
# continues, and the map of decoder rows onto encoder rows (query slots) for beam-folded cross-attention.
POSITIONS = "positions"
BEAM_IDX = "beam_idx"
CROSS_QUERY_ROWS = "cross_query_rows"
DECODER_SLOTS = "decoder_slots"
PAST_KEYS = "past_keys"
PAST_VALUES = "past_values"
LOGITS = "logits"
# The past gathered by beam_idx (the runtime's next slot buffer), and the new tokens' keys and values.
PRESENT_KEYS = "present_keys"
PRESENT_VALUES = "present_values"
NEW_KEYS = "new_keys"
NEW_VALUES = "new_values"
PER_LAYER = (CROSS_KEYS, CROSS_VALUES, PAST_KEYS, PAST_VALUES, PRESENT_KEYS, PRESENT_VALUES, NEW_KEYS, NEW_VALUES)

# RAG-Token head (marginalization + beam candidates).
DOC_LOGPRIOR = "doc_logprior"
BEAM_SCORES = "beam_scores"
BANNED = "banned"
TOP_K = "top_k"
TOP_SCORES = "top_scores"
TOP_IDS = "top_ids"

# RAG-Sequence scorer (teacher-forced log-probabilities of given labels).
LABELS = "labels"
LABEL_LOGPROBS = "label_logprobs"
LOGPROB_SUMS = "logprob_sums"


def per_layer(layers: int, *names: str) -> list[str]:
    """The graph IO names the exporter gives per-layer tensors: ``name.0`` ... ``name.{layers - 1}`` for each
    name in turn (the runtime reads them from the manifest: :meth:`rag_runtime.graph_io.GraphIO.per_layer`)."""
    return [f"{name}.{i}" for name in names for i in range(layers)]
