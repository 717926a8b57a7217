"""rag-export: graphs, manifest, validation, and every failure mode of bad input."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import COMBOS, build_checkpoint, build_export
from rag_export import ExportError, ValidationError, export
from rag_export.cli import main as export_main
from rag_export.validate import DECODER_LOGITS
from rag_runtime import ArtifactError
from rag_runtime import constants as C
from rag_runtime.files import sha256_file


@pytest.mark.parametrize(("kind", "generator"), COMBOS, ids=[f"{k}-{g}" for k, g in COMBOS])
def test_export_layout_and_manifest(bundles, kind, generator):
    out = bundles[(kind, generator)].export
    manifest = json.loads((out / C.MANIFEST_FILE).read_text())
    assert manifest["kind"] == kind and manifest["generator_type"] == generator
    expected = {"question_encoder", "generator_encoder", "generator_decoder", "context_encoder"}
    assert set(manifest["graphs"]) == expected | ({"rag_token_head"} if kind == "token"
                                                 else {"sequence_scorer", "beam_step"})
    for rel, digest in manifest["files"].items():
        assert sha256_file(out / rel) == digest, rel
    for name, graph in manifest["graphs"].items():
        assert manifest["files"][graph["file"]] == graph["sha256"]
        session = ort.InferenceSession(str(out / graph["file"]), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == [i["name"] for i in graph["inputs"]], name
        assert [o.name for o in session.get_outputs()] == [o["name"] for o in graph["outputs"]], name
    decoder = onnx.load(str(out / C.GENERATOR_DECODER_FILE), load_external_data=False)
    assert not any(n.op_type in ("If", "Loop") for n in decoder.graph.node), "decoder must be one branch-free graph"
    for key in ("n_docs", "title_sep", "doc_sep", "max_combined_length", "do_deduplication", "prefix"):
        assert key in manifest["rag"]
    for key in ("num_beams", "max_length", "min_length", "no_repeat_ngram_size", "length_penalty",
                "early_stopping", "decoder_start_token_id", "eos_token_id", "pad_token_id"):
        assert manifest["generation_defaults"][key] is not None, key
    assert manifest["index"]["count"] == 320
    logits = manifest["validation"]["generator_decoder"][DECODER_LOGITS]
    assert logits["max_abs_diff"] < 1e-3 and logits["max_abs_diff"] <= logits["tolerance"]
    decisions = logits["decisions"]
    # 4 rows (2 contexts x 2 beams) over 5 steps, and the row that joins at the third step over 3.
    assert decisions["rows_agreeing"] == decisions["rows"] == 4 * 5 + 3 and decisions["top_k"] == 4
    for graph, outputs in manifest["validation"].items():
        for output, figures in outputs.items():
            assert figures["max_abs_diff"] <= figures["tolerance"], (graph, output, figures)
    head = C.RAG_TOKEN_HEAD if kind == "token" else C.BEAM_STEP
    assert manifest["validation"][head][C.TOP_SCORES]["max_abs_diff"] < 1e-3


@pytest.mark.parametrize(("kind", "generator"), COMBOS[:2], ids=[f"{k}-{g}" for k, g in COMBOS[:2]])
def test_typed_manifest_reads_every_field_back(bundles, kind, generator, tmp_path):
    """The typed Manifest is the whole contract: loading and saving it loses and invents nothing."""
    from rag_runtime import Manifest

    out = bundles[(kind, generator)].export
    raw = json.loads((out / C.MANIFEST_FILE).read_text())
    manifest = Manifest.load(out)
    assert manifest.to_dict() == raw
    manifest.save(tmp_path)
    assert json.loads((tmp_path / C.MANIFEST_FILE).read_text()) == raw
    layers = manifest.decoder.layers
    present = C.per_layer(layers, C.PRESENT_KEYS, C.PRESENT_VALUES)
    assert {manifest.graph(C.GENERATOR_DECODER).dtype(name) for name in present} == {manifest.decoder.kv_dtype}
    assert manifest.decoder.kv_dtype == "float32"
    broken = {k: v for k, v in raw.items() if k != "graphs"}
    (tmp_path / C.MANIFEST_FILE).write_text(json.dumps(broken))
    with pytest.raises(ArtifactError, match="corrupted: manifest lacks graphs"):
        Manifest.load(tmp_path, verify=False)


def test_generation_defaults_are_what_transformers_uses(bundles):
    """The manifest's defaults reproduce a parameterless reference call (checked token by token in the
    parity grid's `defaults` case); here: the values themselves come from the loaded model."""
    for (kind, _), bundle in bundles.items():
        defaults = json.loads((bundle.export / C.MANIFEST_FILE).read_text())["generation_defaults"]
        model = bundle.reference.model
        gc = model.generation_config if kind == "token" else model.generator.generation_config
        assert defaults["no_repeat_ngram_size"] == (gc.no_repeat_ngram_size or 0)
        if kind == "token":
            assert defaults["num_beams"] == gc.num_beams
        else:
            assert defaults["num_beams"] == (getattr(model.config, "num_beams", None) or 1)


def test_decoder_validation_failure_names_output_and_leaves_nothing(work_dir, tmp_path):
    ckpt = build_checkpoint(work_dir, "token", "bart")
    out = tmp_path / "out"
    with pytest.raises(ValidationError, match=r"differs from PyTorch by .*x its tolerance") as err:
        export(str(ckpt), out, atol=0.0, rtol=0.0, strict=True, include_index=False)
    assert err.value.graph and err.value.output and "--atol/--rtol" in str(err.value)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [], "a failed export must not leave temp directories"


def test_refuses_non_empty_output_unless_force(work_dir, tmp_path, capsys):
    ckpt = build_checkpoint(work_dir, "token", "t5")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert export_main([str(ckpt), str(out)]) == 2
    assert "not empty" in capsys.readouterr().err and (out / "keep.txt").exists()
    assert export_main([str(ckpt), str(out), "--force", "--no-validate"]) == 0
    assert not (out / "keep.txt").exists() and (out / C.MANIFEST_FILE).exists()
    assert oct(out.stat().st_mode & 0o777) != oct(0o700)


def test_every_written_file_follows_the_umask(work_dir, tmp_path):
    """manifest.json and index.json go through a temporary file and a rename: like every other file of the
    export they must follow the umask (a private 0600 file cannot be read by a service running as another
    user)."""
    ckpt = build_checkpoint(work_dir, "token", "bart")
    old = os.umask(0o027)
    try:
        out = export(str(ckpt), tmp_path / "out", validate=False)
    finally:
        os.umask(old)
    written = [out, *out.rglob("*")]
    assert {C.MANIFEST_FILE, C.INDEX_META_FILE} <= {p.name for p in written}
    modes = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in written}
    assert modes == {name: oct(0o750 if (tmp_path / name).is_dir() else 0o640) for name in modes}


def _error(argv: list[str], capsys) -> str:
    assert export_main(argv) == 2
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]
    assert last.startswith("rag-export: error:") and "Traceback" not in err
    return last


def test_nonexistent_path(tmp_path, capsys):
    err = _error([str(tmp_path / "missing"), str(tmp_path / "out")], capsys)
    assert "no such checkpoint directory" in err
    assert not (tmp_path / "out").exists()


def test_unknown_hub_id_offline(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    err = _error(["no-such-org/no-such-rag-model", str(tmp_path / "out")], capsys)
    assert "no-such-org/no-such-rag-model is not in the Hugging Face cache" in err and "HF_HUB_OFFLINE=1" in err


def test_not_a_rag_checkpoint(tmp_path, capsys):
    from transformers import BartConfig, BartForConditionalGeneration

    d = tmp_path / "bart"
    BartForConditionalGeneration(BartConfig(vocab_size=50, d_model=16, encoder_layers=1, decoder_layers=1,
                                            encoder_attention_heads=2, decoder_attention_heads=2,
                                            encoder_ffn_dim=16, decoder_ffn_dim=16)).save_pretrained(d)
    err = _error([str(d), str(tmp_path / "out")], capsys)
    assert "not a RAG generation checkpoint (found BartForConditionalGeneration)" in err


def _copy(work_dir: Path, tmp_path: Path) -> Path:
    src = build_checkpoint(work_dir, "token", "bart")
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def test_unsupported_generator(work_dir, tmp_path, capsys):
    ckpt = _copy(work_dir, tmp_path)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["generator"]["model_type"] = "prophetnet"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    err = _error([str(ckpt), str(tmp_path / "out")], capsys)
    assert "unsupported generator 'prophetnet'; supported are: bart, t5, mbart, marian, pegasus" in err


def test_missing_weights(work_dir, tmp_path, capsys):
    ckpt = _copy(work_dir, tmp_path)
    (ckpt / "model.safetensors").unlink()
    err = _error([str(ckpt), str(tmp_path / "out")], capsys)
    assert "weights" in err
    assert not (tmp_path / "out").exists()


def test_missing_tokenizer(work_dir, tmp_path, capsys):
    ckpt = _copy(work_dir, tmp_path)
    shutil.rmtree(ckpt / "generator_tokenizer")
    err = _error([str(ckpt), str(tmp_path / "out")], capsys)
    assert "tokenizer" in err


def test_missing_knowledge_base(work_dir, tmp_path, capsys):
    ckpt = _copy(work_dir, tmp_path)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["index_path"] = str(tmp_path / "gone.faiss")
    (ckpt / "config.json").write_text(json.dumps(cfg))
    err = _error([str(ckpt), str(tmp_path / "out"), "--no-validate"], capsys)
    assert "index_path does not exist" in err and "--no-index" in err
    assert not (tmp_path / "out").exists()


def test_export_without_index_then_runtime_still_serves_contexts(work_dir, tmp_path):
    from rag_runtime import IndexUnavailableError, RagPipeline

    ckpt = build_checkpoint(work_dir, "token", "bart")
    out = export(str(ckpt), tmp_path / "noindex", include_index=False, validate=False)
    pipe = RagPipeline.load(out)
    with pytest.raises(IndexUnavailableError, match="no knowledge index"):
        pipe.generate(["who wrote hamlet?"])
    with pytest.raises(IndexUnavailableError, match="rag-index attach"):
        pipe.retrieve(["who wrote hamlet?"])
    ids = np.array([[0, 100, 200, 2], [0, 300, 2, 1]], dtype=np.int64)
    mask = (ids != 1).astype(np.int64)
    rows = pipe.generate_from_context(ids, mask, np.array([[1.0, 0.5]], dtype=np.float32), num_beams=2, max_length=6)
    assert rows.shape[0] == 1 and rows[0, 0] == pipe.manifest.generation_defaults.decoder_start_token_id


def test_int8_export_records_drift_and_serves(work_dir, tmp_path, questions):
    from rag_runtime import RagPipeline

    ckpt = build_checkpoint(work_dir, "token", "bart")
    out = export(str(ckpt), tmp_path / "int8", quantize="int8", context_encoder=str(ckpt / "context_encoder"))
    manifest = json.loads((out / C.MANIFEST_FILE).read_text())
    assert manifest["precision"] == "int8"
    drift = manifest["validation"]["int8_drift"]
    # Quantized: measured for every converted graph, never claimed identical; the question and context
    # encoders stay fp32, so retrieval is the fp32 export's.
    assert set(drift) == {"generator_encoder", "generator_decoder"}
    for name in (C.QUESTION_ENCODER_FILE, C.CONTEXT_ENCODER_FILE):
        assert not {"DynamicQuantizeLinear", "MatMulInteger"} & {n.op_type for n in onnx.load(str(out / name)).graph.node}
    fp32 = build_export(work_dir, "token", "bart")
    fp32_size = (fp32 / C.GENERATOR_DECODER_FILE).stat().st_size
    assert (out / C.GENERATOR_DECODER_FILE).stat().st_size < fp32_size
    ops = {n.op_type for n in onnx.load(str(out / C.GENERATOR_DECODER_FILE)).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops
    int8, reference = RagPipeline.load(out), RagPipeline.load(fp32)
    result = int8.generate(questions[:2], num_beams=2, max_length=8)
    assert all(r.answers[0].token_ids for r in result)
    assert [[d.id for d in r.docs] for r in result] == [[d.id for d in docs] for docs in reference.retrieve(questions[:2])]


def test_int8_export_quantizes_the_retrieval_encoders_when_asked(work_dir, tmp_path):
    ckpt = build_checkpoint(work_dir, "token", "bart")
    out = export(str(ckpt), tmp_path / "int8", quantize="int8", quantize_retrieval=True,
                 context_encoder=str(ckpt / "context_encoder"))
    drift = json.loads((out / C.MANIFEST_FILE).read_text())["validation"]["int8_drift"]
    assert set(drift) == {"question_encoder", "generator_encoder", "generator_decoder", "context_encoder"}
    assert drift["question_encoder"]["question_embedding"]["max_abs_diff"] > 0
    assert drift["context_encoder"]["passage_embedding"]["max_abs_diff"] > 0
    with pytest.raises(ExportError, match="--quantize-retrieval goes with --quantize int8"):
        export(str(ckpt), tmp_path / "q", quantize_retrieval=True)


@pytest.mark.parametrize("generator", ["bart", "t5"])
def test_fp16_export_keeps_sensitive_ops_in_fp32_records_drift_and_serves(work_dir, tmp_path, questions,
                                                                           generator):
    from rag_runtime import RagPipeline

    ckpt = build_checkpoint(work_dir, "token", generator)
    out = export(str(ckpt), tmp_path / "fp16", precision="fp16")
    manifest = json.loads((out / C.MANIFEST_FILE).read_text())
    assert manifest["precision"] == "fp16" and manifest["decoder"]["kv_dtype"] == "float16"
    drift = manifest["validation"]["fp16_drift"]
    logits = drift["generator_decoder"][DECODER_LOGITS]
    assert 0 < logits["max_abs_diff"] < 0.1  # measured, never claimed identical
    assert logits["decisions"]["rows"] == 4 * 5 + 3  # how often fp16 keeps the top-k tokens: reported, not enforced
    io = {i["name"]: i["dtype"] for i in manifest["graphs"]["generator_decoder"]["inputs"]
          + manifest["graphs"]["generator_decoder"]["outputs"]}
    per_layer = [io[f"{name}.{i}"] for name in (C.PAST_KEYS, C.PRESENT_KEYS, C.CROSS_KEYS, C.CROSS_VALUES)
                 for i in range(manifest["decoder"]["layers"])]
    assert set(per_layer) == {"float16"} and io[C.LOGITS] == "float32"

    model = onnx.load(str(out / C.GENERATOR_DECODER_FILE))
    fp16 = onnx.TensorProto.FLOAT16
    assert any(t.data_type == fp16 for t in model.graph.initializer)
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    sensitive = [n for n in model.graph.node if n.op_type in ("Softmax", "LayerNormalization", "ReduceMean")]
    assert sensitive and all(types.get(n.output[0], onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT
                             for n in sensitive)
    head = onnx.load(str(out / C.RAG_TOKEN_HEAD_FILE))
    assert head.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT

    fp32 = RagPipeline.load(build_export(work_dir, "token", generator)).generate(questions[:4], num_beams=3,
                                                                                max_length=10)
    half = RagPipeline.load(out).generate(questions[:4], num_beams=3, max_length=10)
    assert all(r.answers[0].token_ids for r in half)
    drift = max(abs(a.answers[0].score - b.answers[0].score) for a, b in zip(fp32, half, strict=True))
    assert drift < 0.25, f"fp16 answer scores drift by {drift} from fp32"  # a broken cast or mask: >> 1


def test_precision_arguments(work_dir, tmp_path):
    ckpt = str(build_checkpoint(work_dir, "token", "bart"))
    with pytest.raises(ExportError, match="supported are: fp32, fp16"):
        export(ckpt, tmp_path / "p", precision="bf16")
    with pytest.raises(ExportError, match="drop --precision fp16"):
        export(ckpt, tmp_path / "p", precision="fp16", quantize="int8")
    assert not (tmp_path / "p").exists()


def test_unsupported_quantization(work_dir, tmp_path):
    with pytest.raises(ExportError, match="supported are: int8"):
        export(str(build_checkpoint(work_dir, "token", "bart")), tmp_path / "q", quantize="int4")


def test_trace_refuses_a_module_that_ignores_an_input(tmp_path):
    """The tracer would drop the unread input and give its name to the next one: the export must refuse."""
    import torch

    from rag_export.graphs import GraphSpec
    from rag_export.tracing import trace

    class IgnoresFirst(torch.nn.Module):
        def forward(self, a, b, c):
            return b + c

    spec = GraphSpec(name="probe", file="probe.onnx", inputs={"a": ["n"], "b": ["n"], "c": ["n"]}, outputs={"y": ["n"]})
    with pytest.raises(ExportError, match=r"probe graph does not have the IO its spec declares .*: its module ignores"):
        trace(IgnoresFirst(), spec, (torch.ones(2), torch.ones(2), torch.ones(2)), tmp_path, 17)


def test_graphs_with_external_data_export_optimize_convert_validate_and_load(bundles, work_dir, tmp_path, questions):
    """A graph beyond protobuf's 2 GiB keeps its weights in NAME.onnx.data: forced here with a 64 KiB
    threshold. Traced, fused, validated, converted to fp16 and int8, hashed and loaded like any other."""
    from rag_runtime import RagPipeline
    from support import reference_tokens, special_ids

    ckpt = build_checkpoint(work_dir, "token", "bart")
    threshold = 1 << 16
    out = export(str(ckpt), tmp_path / "fp32", external_data_threshold=threshold, include_index=True)
    manifest = json.loads((out / C.MANIFEST_FILE).read_text())
    for graph in ("question_encoder", "generator_encoder", "generator_decoder"):
        file = manifest["graphs"][graph]["file"]
        weights = onnx.load(str(out / file), load_external_data=False).graph.initializer
        assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in weights), graph
        assert (out / file).stat().st_size < (out / f"{file}.data").stat().st_size, graph
        assert manifest["files"][f"{file}.data"] == sha256_file(out / f"{file}.data")
    assert not (out / "rag_token_head.onnx.data").exists()  # no weights: nothing to move out
    assert not list(out.glob(".*.tmp")), "scratch directories must not be left behind"
    qs, params = questions[:3], dict(num_beams=3, max_length=12)
    ref = bundles[("token", "bart")].reference.generate(qs, **params)
    pipe = RagPipeline.load(out)
    eos, pad = special_ids(pipe)
    for g, r in zip(pipe.generate(qs, **params), ref, strict=True):
        assert [a.token_ids for a in g.answers] == [reference_tokens(row, eos, pad) for row in r.sequences]

    for name, options in (("optimized", dict(optimize=True)), ("fp16", dict(precision="fp16")),
                          ("int8", dict(quantize="int8"))):
        reduced = export(str(ckpt), tmp_path / name, external_data_threshold=threshold, include_index=False,
                         **options)
        assert (reduced / "generator_decoder.onnx.data").is_file(), name
        figures = json.loads((reduced / C.MANIFEST_FILE).read_text())["validation"]
        assert "generator_decoder" in figures and (name == "optimized" or f"{name}_drift" in figures)
        ids = np.array([[0, 100, 200, 2], [0, 300, 2, 1]], dtype=np.int64)
        rows = RagPipeline.load(reduced).generate_from_context(ids, (ids != 1).astype(np.int64),
                                                               np.array([[1.0, 0.5]], np.float32), max_length=6)
        assert rows.shape[0] == 1, name

    data = out / "generator_decoder.onnx.data"
    data.write_bytes(data.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ArtifactError, match=r"generator_decoder.onnx.data does not match its sha256"):
        RagPipeline.load(out)
