"""rag_runtime: import hygiene, API contract, bad input, CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from rag_runtime import ArtifactError, RagPipeline, StageTimer
from rag_runtime import constants as C
from rag_runtime.cli import main as generate_main


def test_runtime_answers_without_torch_transformers_or_datasets(bundles, questions):
    export = bundles[("token", "bart")].export
    script = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers", "datasets"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        from rag_runtime import RagPipeline
        r = RagPipeline.load({str(export)!r}).generate([{questions[0]!r}], num_beams=2, max_length=8)[0]
        assert r.answers[0].token_ids and len(r.docs) == 5
        assert not any(m.split(".")[0] in ("torch", "transformers", "datasets") for m in sys.modules)
        print("ok", r.answers[0].token_ids)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok [")


def test_empty_inputs(bundles):
    pipe = bundles[("token", "bart")].pipeline
    assert pipe.generate([]) == []
    assert pipe.retrieve([]) == []


def test_empty_question_answers_like_the_reference(bundles):
    bundle = bundles[("token", "bart")]
    params = dict(num_beams=2, max_length=10)
    ref = bundle.reference.generate([""], **params)[0]
    got = bundle.pipeline.generate([""], **params)[0]
    assert got.answers[0].token_ids == [t for t in ref.sequences[0].tolist() if t != bundle.pipeline.manifest.generation_defaults.pad_token_id]


def test_overlong_question_is_truncated(bundles, caplog):
    pipe = bundles[("token", "t5")].pipeline
    long_q = "who wrote the play " * 200
    with caplog.at_level("WARNING"):
        r = pipe.generate([long_q], num_beams=1, max_length=5)[0]
    assert "truncated" in caplog.text
    assert r.answers[0].token_ids


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    (dict(beams=2), TypeError, "unexpected keyword argument 'beams'"),
    (dict(num_beams=0), ValueError, "num_beams must be an integer >= 1, got 0"),
    (dict(num_beams=2, num_return_sequences=3), ValueError, "num_return_sequences"),
    (dict(max_length=5, min_length=9), ValueError, "min_length"),
    (dict(early_stopping="sometimes"), ValueError, "early_stopping"),
    (dict(n_docs=-1), ValueError, "n_docs"),
    (dict(bad_words_ids=[[]]), ValueError, "bad_words_ids"),
    (dict(repetition_penalty=0.0), ValueError, "repetition_penalty"),
    (dict(repetition_penalty=True), ValueError, "repetition_penalty"),
    (dict(early_stopping=1), ValueError, "early_stopping"),
    (dict(bad_words_ids=[[10**6]]), ValueError, r"bad_words_ids must hold token ids in \[0, \d+\)"),
    (dict(forced_bos_token_id=10**6), ValueError, "forced_bos_token_id must hold token ids"),
    (dict(forced_eos_token_id=-5), ValueError, "forced_eos_token_id must hold non-negative token ids"),
    (dict(n_docs=500), ValueError, "the knowledge index has 320"),
    (dict(max_length=5000), ValueError, "max_length 5000 exceeds the generator's 1024 decoder positions"),
])
def test_invalid_generation_parameters(bundles, kwargs, error, match):
    with pytest.raises(error, match=match):
        bundles[("token", "bart")].pipeline.generate(["a question"], **kwargs)


def test_n_docs_beyond_the_index(bundles):
    with pytest.raises(ValueError, match="exceeds the 320 passages"):
        bundles[("token", "bart")].pipeline.retrieve(["q"], n_docs=400)


def test_corrupted_export_is_refused_at_load(bundles, tmp_path):
    src = bundles[("sequence", "bart")].export
    dst = tmp_path / "export"
    shutil.copytree(src, dst)
    with open(dst / C.GENERATOR_DECODER_FILE, "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02")
    with pytest.raises(ArtifactError, match="generator_decoder.onnx does not match its sha256"):
        RagPipeline.load(dst)


def test_missing_file_and_missing_manifest(bundles, tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        RagPipeline.load(tmp_path / "nope")
    with pytest.raises(ArtifactError, match="no manifest.json"):
        RagPipeline.load(tmp_path)
    dst = tmp_path / "export"
    shutil.copytree(bundles[("token", "t5")].export, dst)
    (dst / C.GENERATOR_TOKENIZER_FILE).unlink()
    with pytest.raises(ArtifactError, match="generator.json is missing"):
        RagPipeline.load(dst)


def test_cuda_without_cuda_provider_names_the_package(bundles):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine has a CUDA provider")  # the CPU-only CI always runs this test
    with pytest.raises(ValueError, match="onnxruntime-gpu"):
        RagPipeline.load(bundles[("token", "bart")].export, device="cuda")


def test_generate_from_context_validates_shapes(bundles):
    pipe = bundles[("token", "bart")].pipeline
    with pytest.raises(ValueError, match="expected batch"):
        pipe.generate_from_context(np.ones((3, 4), np.int64), np.ones((3, 4), np.int64), np.zeros((1, 2), np.float32))


def test_rag_sequence_fast_decoding_is_an_approximation_that_runs(bundles, questions):
    """Fast decoding ranks the same candidates by other scores: each of its answers is one of the
    candidates thorough decoding generates (all of them returned, deduplication off so none merge)."""
    pipe = bundles[("sequence", "bart")].pipeline
    params = dict(num_beams=2, max_length=8, n_docs=5, do_deduplication=False)
    everything = pipe.generate(questions[:2], **params, num_return_sequences=10)
    fast = pipe.generate(questions[:2], **params, num_return_sequences=3, fast_decoding=True)
    for t, f in zip(everything, fast, strict=True):
        candidates = {tuple(a.token_ids) for a in t.answers}
        assert len(t.answers) == 10 and len(candidates) > 1
        assert len(f.answers) == 3
        assert all(tuple(a.token_ids) in candidates for a in f.answers), (f.answers, candidates)
        assert [a.score for a in f.answers] == sorted((a.score for a in f.answers), reverse=True)
        assert [d.id for d in f.docs] == [d.id for d in t.docs]


def test_rag_generate_cli_json(bundles, questions, capsys):
    export = bundles[("token", "t5")].export
    assert generate_main([str(export), questions[0], questions[1], "--json", "--num-beams", "2",
                          "--max-length", "8"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert first["question"] == questions[0] and len(first["docs"]) == 5 and first["answers"][0]["token_ids"]


def test_rag_generate_cli_bad_input(bundles, capsys):
    assert generate_main([str(bundles[("token", "t5")].export), "q", "--num-beams", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rag-generate: error: num_beams") and "Traceback" not in err


@pytest.mark.parametrize("generator", ["bart", "t5"])
@pytest.mark.parametrize(("params", "fused_steps"), [
    (dict(num_beams=3, max_length=12, min_length=6, no_repeat_ngram_size=2), True),  # bans travel as indices
    (dict(num_beams=2, max_length=10, bad_words_ids=[[7], [9, 11]]), True),
    (dict(num_beams=2, max_length=10, repetition_penalty=1.5), False),  # rewrites whole rows: host path
], ids=["bans", "bad_words", "repetition"])
def test_fused_rag_token_head_matches_the_host_path(bundles, questions, generator, params, fused_steps):
    export = bundles[("token", generator)].export
    timer = StageTimer()
    fused, host = RagPipeline.load(export, timer=timer), RagPipeline.load(export, fused_head=False)
    got, want = fused.generate(questions[:3], **params), host.generate(questions[:3], **params)
    assert (timer.counts["onnxruntime/rag_token_head"] > 0) == fused_steps
    for g, w in zip(got, want, strict=True):
        assert [a.token_ids for a in g.answers] == [a.token_ids for a in w.answers]
        np.testing.assert_allclose([a.score for a in g.answers], [a.score for a in w.answers], rtol=1e-5)
    assert len({tuple(a.token_ids) for r in got for a in r.answers}) > 1, "degenerate answers prove nothing"


@pytest.mark.parametrize("generator", ["bart", "t5"])
@pytest.mark.parametrize(("params", "fused_steps"), [
    (dict(num_beams=3, max_length=12, min_length=6, no_repeat_ngram_size=2, num_return_sequences=2), True),
    (dict(num_beams=2, max_length=10, repetition_penalty=1.5), False),  # rewrites whole rows: host path
], ids=["bans", "repetition"])
def test_rag_sequence_beam_step_matches_the_host_path(bundles, questions, generator, params, fused_steps):
    """RAG-Sequence's per-passage beam search ranks candidates in the exported beam step (log-softmax,
    bans, top-k on the device) exactly as the host path does from the step's logits."""
    export = bundles[("sequence", generator)].export
    timer = StageTimer()
    fused, host = RagPipeline.load(export, timer=timer), RagPipeline.load(export, fused_head=False)
    got, want = fused.generate(questions[:3], **params), host.generate(questions[:3], **params)
    assert (timer.counts["onnxruntime/beam_step"] > 0) == fused_steps
    for g, w in zip(got, want, strict=True):
        assert [a.token_ids for a in g.answers] == [a.token_ids for a in w.answers]
        np.testing.assert_allclose([a.score for a in g.answers], [a.score for a in w.answers], rtol=1e-5, atol=1e-5)
    assert len({tuple(a.token_ids) for r in got for a in r.answers}) > 1, "degenerate answers prove nothing"


@pytest.mark.parametrize("generator", ["bart", "t5"])
def test_sequence_scorer_matches_the_host_path(bundles, questions, generator):
    """RAG-Sequence rescoring through the exported scorer (label log-probs read off the device) ranks
    and scores like the host path that brings the logits back (exports made before the scorer)."""
    timer = StageTimer()
    pipe = RagPipeline.load(bundles[("sequence", generator)].export, timer=timer)
    host = RagPipeline.load(bundles[("sequence", generator)].export, sequence_scorer=False)
    params = dict(num_beams=3, max_length=10, num_return_sequences=3, n_docs=4)
    got, want = pipe.generate(questions[:3], **params), host.generate(questions[:3], **params)
    assert timer.counts["onnxruntime/sequence_scorer"] > 0
    for g, w in zip(got, want, strict=True):
        assert [a.token_ids for a in g.answers] == [a.token_ids for a in w.answers]
        np.testing.assert_allclose([a.score for a in g.answers], [a.score for a in w.answers], rtol=1e-5, atol=1e-5)
    assert len({tuple(a.token_ids) for r in got for a in r.answers}) > 1, "degenerate answers prove nothing"


@pytest.mark.parametrize(("graph", "file", "host_stage"), [
    (C.SEQUENCE_SCORER, C.SEQUENCE_SCORER_FILE, "rescore"),  # rescores on the host
    (C.BEAM_STEP, C.BEAM_STEP_FILE, "onnxruntime/generator_decoder"),  # steps on the host
], ids=["scorer", "beam_step"])
def test_export_made_before_a_sequence_graph_still_answers(bundles, questions, tmp_path, graph, file, host_stage):
    """A RAG-Sequence export without one of its later graphs (as exported before it existed) loads and
    does that work on the host, with the same answers."""
    src = bundles[("sequence", "bart")].export
    old = tmp_path / "old"
    shutil.copytree(src, old)
    manifest = json.loads((old / C.MANIFEST_FILE).read_text())
    del manifest["graphs"][graph]
    del manifest["files"][file]
    (old / file).unlink()
    (old / C.MANIFEST_FILE).write_text(json.dumps(manifest))
    timer = StageTimer()
    pipe = RagPipeline.load(old, timer=timer)
    params = dict(num_beams=2, max_length=9, num_return_sequences=2)
    got, want = pipe.generate(questions[:2], **params), RagPipeline.load(src).generate(questions[:2], **params)
    assert f"onnxruntime/{graph}" not in timer.counts and timer.counts[host_stage] > 0
    assert [[a.token_ids for a in r.answers] for r in got] == [[a.token_ids for a in r.answers] for r in want]


def test_non_string_question_is_a_type_error(bundles):
    with pytest.raises(TypeError, match="questions must be strings, got int"):
        bundles[("token", "bart")].pipeline.generate([3])


def test_a_format_3_export_is_refused_with_re_export(bundles, tmp_path):
    """Format 4's decoder takes rows of different lengths; a format-3 export cannot serve the engine."""
    dst = tmp_path / "old"
    shutil.copytree(bundles[("token", "bart")].export, dst)
    manifest = json.loads((dst / C.MANIFEST_FILE).read_text())
    manifest["format_version"] = 3
    (dst / C.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"format version 3; this runtime reads 4 \(re-export"):
        RagPipeline.load(dst)


@pytest.mark.parametrize(("graph", "edit", "match"), [
    (C.GENERATOR_DECODER, ("inputs", "past_keys.1", "past_keys_1"), "the generator_decoder graph lacks past_keys.1 "),
    (C.QUESTION_ENCODER, ("outputs", C.QUESTION_EMBEDDING, "pooled"), "the question_encoder graph lacks question_embedding "),
    (C.RAG_TOKEN_HEAD, ("outputs", C.TOP_IDS, None), "the rag_token_head graph lacks top_ids "),
    (C.GENERATOR_ENCODER, ("outputs", "cross_keys.1", "cross_keys.2"), "the generator_encoder graph lacks cross_keys.1 "),
    (C.GENERATOR_ENCODER, ("outputs", "cross_values.1", ["cross_values.1", "cross_values.2"]),
     "the generator_encoder graph declares cross_values for 3 layers, the decoder has 2"),
], ids=["decoder-input", "question-encoder-output", "head-output", "layer-renamed", "extra-layer"])
def test_graph_io_is_bound_by_the_names_the_manifest_declares(bundles, tmp_path, graph, edit, match):
    """The runtime reads every graph's IO names from the manifest: one it binds and the manifest lacks is
    refused on load, in one line naming the graph and the name."""
    dst = tmp_path / "export"
    shutil.copytree(bundles[("token", "bart")].export, dst)
    manifest = json.loads((dst / C.MANIFEST_FILE).read_text())
    side, name, new = edit
    tensors = manifest["graphs"][graph][side]
    at = next(i for i, t in enumerate(tensors) if t["name"] == name)
    replacement = [] if new is None else [dict(tensors[at], name=n) for n in ([new] if isinstance(new, str) else new)]
    tensors[at : at + 1] = replacement
    (dst / C.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=match) as e:
        RagPipeline.load(dst)
    assert "\n" not in str(e.value) and str(e.value).endswith("re-export with this rag-export")
