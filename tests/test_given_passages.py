"""Answering without a knowledge index: passages given by the caller (RagPipeline.generate_from_passages,
rag-generate --passages FILE), and rag-serve refusing an export it could not answer from."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import ROOT, build_checkpoint
from rag_runtime.cli import main as generate_main
from support import assert_not_degenerate, reference_tokens, special_ids

CORPUS = [json.loads(line) for line in (ROOT / "scripts" / "data" / "corpus.jsonl").read_text().splitlines()]


def _reference_contexts(ref, questions: list[str], given: list[list[dict]]):
    """Contexts as transformers' retriever builds them for these passages (RagRetriever.postprocess_docs
    with the questions decoded from their ids, as RagRetriever.__call__ does)."""
    enc = ref.encode(questions)
    strings = ref.retriever.question_encoder_tokenizer.batch_decode(enc.input_ids, skip_special_tokens=True)
    docs = [{"title": [p["title"] for p in ps], "text": [p["text"] for p in ps]} for ps in given]
    return ref.retriever.postprocess_docs(docs, strings, getattr(ref.model.generator.config, "prefix", None),
                                          len(given[0]), return_tensors="pt")


@pytest.mark.parametrize("kind", ["token", "sequence"])
def test_generate_from_passages_matches_transformers(bundles, questions, kind):
    import torch

    bundle = bundles[(kind, "bart")]
    ref, pipe = bundle.reference, bundle.pipeline
    qs = [questions[4], questions[11]]
    # RAG-Sequence's rescoring forward takes contexts only for the configured n_docs (5).
    given = [CORPUS[30:35], CORPUS[200:205]]
    scores = np.random.default_rng(7).standard_normal((2, 5)).astype(np.float32)
    params = dict(num_beams=3, max_length=12, num_return_sequences=2, no_repeat_ngram_size=2)
    ctx_ids, ctx_mask = _reference_contexts(ref, qs, given)
    with torch.no_grad():
        expected = ref.model.generate(context_input_ids=ctx_ids, context_attention_mask=ctx_mask,
                                      doc_scores=torch.as_tensor(scores), n_docs=5, **params).numpy()
    got = pipe.generate_from_passages(qs, given, doc_scores=scores, **params)
    eos, pad = special_ids(pipe)
    assert_not_degenerate([expected], eos | {pad})
    rows = expected.reshape(2, 2, -1)
    for result, question, ps, want in zip(got, qs, given, rows, strict=True):
        assert result.question == question
        assert [a.token_ids for a in result.answers] == [reference_tokens(r, eos, pad) for r in want]
        assert [(d.id, d.pid, d.title) for d in result.docs] == [(j, p["id"], p["title"]) for j, p in enumerate(ps)]


def test_given_passages_are_checked(bundles):
    pipe = bundles[("token", "bart")].pipeline
    from rag_runtime import InvalidOptionError

    with pytest.raises(InvalidOptionError, match="same number of passages"):
        pipe.generate_from_passages(["a", "b"], [CORPUS[:2], CORPUS[:3]])
    with pytest.raises(InvalidOptionError, match="2 passage lists for 1 questions"):
        pipe.generate_from_passages(["a"], [CORPUS[:2], CORPUS[:2]])
    with pytest.raises(InvalidOptionError, match="n_docs=3 but 2 passages"):
        pipe.generate_from_passages(["a"], [CORPUS[:2]], n_docs=3)
    with pytest.raises(InvalidOptionError, match=r"doc_scores has shape \(1, 3\)"):
        pipe.generate_from_passages(["a"], [CORPUS[:2]], doc_scores=np.zeros((1, 3)))
    assert pipe.generate_from_passages([], []) == []


@pytest.fixture(scope="module")
def index_less(work_dir, tmp_path_factory):
    from rag_export import export

    return export(str(build_checkpoint(work_dir, "token", "bart")), tmp_path_factory.mktemp("noindex") / "export",
                  include_index=False, validate=False)


def test_rag_generate_answers_an_index_less_export_from_a_passage_file(index_less, bundles, tmp_path, capsys):
    rows = CORPUS[60:64]
    path = tmp_path / "passages.tsv"
    path.write_text("id\ttext\ttitle\n" + "".join(f"{r['id']}\t{r['text']}\t{r['title']}\n" for r in rows))
    assert generate_main([str(index_less), "who discovered polonium?", "--json", "--num-beams", "2",
                          "--max-length", "10"]) == 2
    assert "--passages FILE" in capsys.readouterr().err
    assert generate_main([str(index_less), "who discovered polonium?", "what is pi", "--passages", str(path),
                          "--json", "--num-beams", "2", "--max-length", "10"]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = bundles[("token", "bart")].pipeline.generate_from_passages(
        ["who discovered polonium?", "what is pi"], [rows, rows], num_beams=2, max_length=10)
    assert out == [r.to_dict() for r in expected]
    assert [d["pid"] for d in out[0]["docs"]] == [r["id"] for r in rows]


def test_rag_generate_passage_file_errors(index_less, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    many = tmp_path / "many.jsonl"
    many.write_text("".join(json.dumps(r) + "\n" for r in CORPUS[:101]))
    (tmp_path / "few.tsv").write_text("title\ttext\nA\tone\nB\ttwo\nC\tthree\n")
    for path, message in ((tmp_path / "missing.jsonl", "does not exist"), (empty, "has no passages"),
                          (many, "has 101 passages")):
        assert generate_main([str(index_less), "q", "--passages", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("rag-generate: error: ") and message in err and "Traceback" not in err
    assert generate_main([str(index_less), "q", "--passages", str(many.with_name("few.tsv")), "--n-docs", "2"]) == 2
    assert "n_docs=2 but 3 passages per question" in capsys.readouterr().err


def test_rag_serve_refuses_an_export_without_index_before_starting(index_less, bundles, capsys):
    from rag_runtime import IndexUnavailableError
    from rag_runtime.pipeline import RagPipeline
    from rag_runtime.serve import create_app
    from rag_runtime.serve.cli import main as serve_main

    assert serve_main([str(index_less), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "rag-serve: error:" in err and "has no knowledge index" in err and "rag-index attach" in err
    assert "Uvicorn running" not in err and "Started server" not in err
    with pytest.raises(IndexUnavailableError, match="no knowledge index"):
        create_app(RagPipeline.load(index_less))
