"""rag-index: build from passage files, import transformers knowledge bases, attach, search; bad input."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT
from support import assert_not_degenerate, reference_tokens, special_ids

CORPUS = ROOT / "scripts" / "data" / "corpus.jsonl"


def rag_index(*args) -> int:
    from rag_runtime.index_cli import main

    return main([str(a) for a in args])


def rag_export_index(*args) -> int:
    from rag_export.index_cli import main

    return main([str(a) for a in args])


def one_line_error(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("rag-index: error: "), err
    for f in fragments:
        assert f in err, err
    return err


@pytest.fixture(scope="module")
def token_bart(bundles):
    return bundles[("token", "bart")]


@pytest.fixture(scope="module")
def built(token_bart, tmp_path_factory) -> Path:
    """The bundled corpus embedded by the export's context encoder into an exact index."""
    out = tmp_path_factory.mktemp("built") / "flat"
    assert rag_index("build", CORPUS, out, "--context-encoder", token_bart.export, "--index-type", "flat",
                     "--batch-size", "50") == 0
    return out


def _checkpoint_kb(bundle):
    import datasets

    return datasets.load_from_disk(str(bundle.checkpoint / "knowledge" / "passages"))


def test_build_embeds_like_pytorch(token_bart, built):
    """The ONNX context encoder reproduces the PyTorch DPR embeddings stored in the checkpoint."""
    from rag_runtime.knowledge import IndexMeta, KnowledgeIndex

    kb = _checkpoint_kb(token_bart)
    meta = IndexMeta.load(built)
    assert (meta.count, meta.dim, meta.factory, meta.embeddings) == (len(kb), 64, "Flat", "float32")
    emb = np.load(built / "embeddings.npy")
    np.testing.assert_allclose(emb, np.asarray(kb["embeddings"], dtype=np.float32), atol=1e-4)
    index = KnowledgeIndex(built)
    rows = [json.loads(line) for line in CORPUS.read_text().splitlines()]
    for doc_id in (0, 17, len(rows) - 1):
        p = index.passage(doc_id)
        assert (p["id"], p["title"], p["text"]) == (rows[doc_id]["id"], rows[doc_id]["title"], rows[doc_id]["text"])
        assert p["text"] == kb[doc_id]["text"]


def test_search_is_exact_inner_product(built):
    from rag_runtime.knowledge import KnowledgeIndex

    index = KnowledgeIndex(built)
    emb = np.load(built / "embeddings.npy")
    queries = emb[[3, 50, 200]] + np.random.default_rng(0).standard_normal((3, emb.shape[1])).astype(np.float32)
    ids, scores = index.search(queries, 5)
    brute = queries @ emb.T
    np.testing.assert_array_equal(ids, np.argsort(-brute, axis=1, kind="stable")[:, :5])
    np.testing.assert_allclose(scores, np.take_along_axis(brute, ids, 1), rtol=1e-5)


def test_import_attach_answers_like_transformers(token_bart, tmp_path, questions, capsys):
    """A knowledge base saved by transformers' tooling, imported and attached to an index-less export,
    answers token-identically to transformers."""
    from rag_export import export
    from rag_runtime import RagPipeline

    exp = export(str(token_bart.checkpoint), tmp_path / "export", include_index=False)
    kb = token_bart.checkpoint / "knowledge"
    assert rag_export_index("import", kb / "passages", kb / "passages.faiss", tmp_path / "imported") == 0
    assert rag_index("attach", exp, tmp_path / "imported") == 0
    assert "does not record its context encoder" in capsys.readouterr().err
    pipe = RagPipeline.load(exp)
    qs = [questions[1], questions[5], questions[9]]
    params = dict(num_beams=3, max_length=12, n_docs=4)
    ref = token_bart.reference.generate(qs, **params)
    got = pipe.generate(qs, **params)
    eos, pad = special_ids(pipe)
    assert_not_degenerate([r.sequences for r in ref], eos | {pad})
    for r, g in zip(ref, got, strict=True):
        assert [d.id for d in g.docs] == r.doc_ids.tolist()
        np.testing.assert_allclose([d.score for d in g.docs], r.doc_scores, rtol=1e-4, atol=1e-5)
        assert [a.token_ids for a in g.answers] == [reference_tokens(row, eos, pad) for row in r.sequences]


def test_attach_checks_dimension_encoder_and_existing(token_bart, built, tmp_path, capsys):
    from rag_runtime.knowledge import BuildOptions, build_index

    exp = tmp_path / "export"
    shutil.copytree(token_bart.export, exp)
    assert rag_index("attach", exp, built) == 2  # the export already has its own index
    one_line_error(capsys, "already has an index", "--force")
    assert rag_index("attach", exp, built, "--force", "--copy") == 0
    manifest = json.loads((exp / "manifest.json").read_text())
    assert manifest["index"]["dir"] == "index" and manifest["index"]["count"] == 320

    class Narrow:
        dim = 32
        identity = {"source": "narrow", "sha256": "0" * 64, "dim": 32}

        def embed(self, titles, texts):
            return np.ones((len(texts), 32), dtype=np.float32)

    build_index(CORPUS, tmp_path / "narrow", Narrow(), BuildOptions(index_type="flat"))
    assert rag_index("attach", exp, tmp_path / "narrow", "--force") == 2
    one_line_error(capsys, "32-dimensional", "produces 64")

    class Other(Narrow):
        dim = 64
        identity = {"source": "another encoder", "sha256": "1" * 64, "dim": 64}

        def embed(self, titles, texts):
            return np.ones((len(texts), 64), dtype=np.float32)

    build_index(CORPUS, tmp_path / "other", Other(), BuildOptions(index_type="flat"))
    assert rag_index("attach", exp, tmp_path / "other") == 2
    one_line_error(capsys, "another encoder", "rebuild it")


# Random-weight DPR embeddings score passages within a narrow band, which 4-bit PQ barely separates:
# 0.15 is ten times chance (5/320) for IVF-PQ; reranking every candidate must be exact.
@pytest.mark.parametrize(("index_type", "min_recall"), [("hnsw", 0.9), ("ivfpq", 0.15)])
def test_approximate_indexes_recall(token_bart, built, tmp_path, index_type, min_recall):
    from rag_runtime.knowledge import KnowledgeIndex

    out = tmp_path / index_type
    assert rag_index("build", CORPUS, out, "--context-encoder", token_bart.export, "--index-type", index_type) == 0
    exact = KnowledgeIndex(built)
    approx = KnowledgeIndex(out)
    assert approx.meta.factory.startswith("HNSW" if index_type == "hnsw" else "IVF")
    assert (approx.meta.mips_phi is not None) == (index_type == "hnsw")  # HNSW searches augmented L2
    queries = np.load(built / "embeddings.npy")[::7] * 1.5
    want, _ = exact.search(queries, 5)
    got, scores = approx.search(queries, 5)
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(got, want, strict=True)])
    assert recall >= min_recall, recall
    emb = np.load(built / "embeddings.npy")
    np.testing.assert_allclose(scores, np.einsum("bd,bnd->bn", queries, emb[got]), rtol=1e-5)
    got, _ = KnowledgeIndex(out, rerank=64).search(queries, 5)  # 320 candidates: all of them
    np.testing.assert_array_equal(got, want)


def test_shards_fp16_and_no_embeddings(token_bart, built, tmp_path):
    from rag_runtime.knowledge import KnowledgeIndex

    enc = ["--context-encoder", token_bart.export, "--index-type", "flat"]
    assert rag_index("build", CORPUS, tmp_path / "sharded", *enc, "--shards", "3") == 0
    assert rag_index("build", CORPUS, tmp_path / "half", *enc, "--embeddings-dtype", "float16") == 0
    assert rag_index("build", CORPUS, tmp_path / "bare", *enc, "--no-embeddings") == 0
    queries = np.load(built / "embeddings.npy")[[1, 99, 250]]
    want_ids, want_scores = KnowledgeIndex(built).search(queries, 6)
    sharded = KnowledgeIndex(tmp_path / "sharded")
    assert sharded.meta.shards == ["index.0.faiss", "index.1.faiss", "index.2.faiss"]
    ids, scores = sharded.search(queries, 6)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5)
    ids, scores = KnowledgeIndex(tmp_path / "half").search(queries, 6)
    assert np.load(tmp_path / "half" / "embeddings.npy").dtype == np.float16
    np.testing.assert_allclose(scores, want_scores, rtol=2e-3, atol=2e-3)
    bare = KnowledgeIndex(tmp_path / "bare")
    assert not (tmp_path / "bare" / "embeddings.npy").exists()
    ids, scores = bare.search(queries, 6)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5)


def test_interrupted_build_resumes_to_the_same_index(token_bart, built, tmp_path, caplog):
    from rag_runtime.knowledge import BuildOptions, ContextEncoder, build_index

    caplog.set_level(logging.INFO, logger="rag_runtime")
    encoder = ContextEncoder(token_bart.export)
    out = tmp_path / "resumed"
    options = BuildOptions(index_type="flat", batch_size=50)
    assert build_index(CORPUS, out, encoder, options, stop_after=120) is None
    assert not out.exists() and (tmp_path / ".resumed.partial" / "build-state.json").is_file()
    build_index(CORPUS, out, encoder, options)
    assert "resuming an interrupted build after 150 of 320" in caplog.text
    assert not (tmp_path / ".resumed.partial").exists()
    for name in ("passages.jsonl", "passages.offsets.npy"):
        assert (out / name).read_bytes() == (built / name).read_bytes()
    np.testing.assert_array_equal(np.load(out / "embeddings.npy"), np.load(built / "embeddings.npy"))


def _write_formats(tmp_path: Path, rows: list[dict]) -> list[Path]:
    paths = []
    for fmt, delim in (("tsv", "\t"), ("csv", ",")):
        p = tmp_path / f"passages.{fmt}"
        with open(p, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=["id", "text", "title"], delimiter=delim)
            w.writeheader()
            w.writerows(rows)
        paths.append(p)
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "passages.parquet"
    pq.write_table(pa.Table.from_pylist(rows), p)
    return paths + [p]


def test_tsv_csv_parquet_read_like_jsonl(tmp_path):
    from rag_runtime.knowledge import PassageReader

    rows = [json.loads(line) for line in CORPUS.read_text().splitlines()][:40]
    rows[3]["text"] = 'quoted "text", with\ttab, comma\nand newline'
    want = [(r["id"], r["title"], r["text"]) for r in rows]
    for path in _write_formats(tmp_path, rows):
        reader = PassageReader(path)
        assert reader.scan() == 40, path
        assert [(p.pid, p.title, p.text) for p in reader] == want, path


@pytest.mark.parametrize(("line", "problem"), [
    ('{"id": "x1", "title": "T", "text": ', "not valid JSON"),
    ('{"id": "x1", "title": "T", "text": "   "}', "empty text"),
    ('{"id": "x1", "title": "T"}', "no text field"),
    ('{"id": "p0001", "title": "T", "text": "again"}', "duplicate passage id 'p0001' (first at line 1)"),
])
def test_bad_rows_fail_or_skip(token_bart, tmp_path, capsys, line, problem):
    lines = CORPUS.read_text().splitlines()[:30]
    lines.insert(10, line)
    src = tmp_path / "bad.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "idx"
    assert rag_index("build", src, out, "--context-encoder", token_bart.export) == 2
    one_line_error(capsys, f"{src}:11: {problem}", "--skip-bad-rows")
    assert not out.exists() and not (tmp_path / ".idx.partial").exists()
    assert rag_index("build", src, out, "--context-encoder", token_bart.export, "--skip-bad-rows") == 0
    assert "skipping 1 malformed row(s)" in capsys.readouterr().err
    assert json.loads((out / "index.json").read_text())["count"] == 30


def test_input_errors_are_one_line(token_bart, built, tmp_path, capsys):
    enc = ["--context-encoder", token_bart.export]
    (tmp_path / "p.xml").write_text("<x/>")
    assert rag_index("build", tmp_path / "p.xml", tmp_path / "o", *enc) == 2
    one_line_error(capsys, "unknown passage format '.xml'")
    assert rag_index("build", tmp_path / "missing.jsonl", tmp_path / "o", *enc) == 2
    one_line_error(capsys, "does not exist")
    assert rag_index("build", CORPUS, built, *enc) == 2
    one_line_error(capsys, "not empty", "--force")
    assert rag_index("build", CORPUS, tmp_path / "o", "--context-encoder", built) == 2
    one_line_error(capsys, "not a rag-export directory")  # an index directory is not an encoder
    assert rag_export_index("context-encoder", built, tmp_path / "enc") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("rag-export-index: error: cannot load DPR context encoder"), err
    assert not (tmp_path / "enc").exists() and not list(tmp_path.glob(".enc.*"))
    assert rag_index("build", CORPUS, tmp_path / "o", *enc, "--index-type", "Bogus,Thing") == 2
    one_line_error(capsys, "faiss cannot build index type 'Bogus,Thing'")


def test_missing_or_truncated_index_files(built, tmp_path, capsys, token_bart):
    from rag_runtime.errors import ArtifactError
    from rag_runtime.knowledge import KnowledgeIndex

    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    with open(copy / "embeddings.npy", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ArtifactError, match=r"embeddings.npy has 1000 bytes, \d+ expected: truncated"):
        KnowledgeIndex(copy)
    (copy / "index.faiss").unlink()
    with pytest.raises(ArtifactError, match="index.faiss is missing"):
        KnowledgeIndex(copy)
    assert rag_index("search", copy, "who wrote hamlet?", "--export", token_bart.export) == 2
    one_line_error(capsys, "is missing")


def test_search_cli(token_bart, built, capsys):
    assert rag_index("search", built, "who painted the starry night", "--export", token_bart.export, "-k", "3",
                     "--json") == 0
    out = json.loads(capsys.readouterr().out.strip())
    assert out["question"] == "who painted the starry night" and len(out["docs"]) == 3
    assert out["docs"][0]["score"] >= out["docs"][1]["score"] >= out["docs"][2]["score"]
    assert all(d["pid"].startswith("p") and d["text"] for d in out["docs"])


def test_build_from_a_dpr_checkpoint_exported_by_the_exporter(token_bart, built, tmp_path, capsys):
    """A bare DPR context encoder checkpoint: rag-index refuses it with the command that exports it, and
    the index built from that export equals the one built from the full export's encoder."""
    checkpoint = token_bart.checkpoint / "context_encoder"
    assert rag_index("build", CORPUS, tmp_path / "kb", "--context-encoder", checkpoint) == 2
    one_line_error(capsys, "not a rag-export directory", "rag-export-index context-encoder")
    encoder = tmp_path / "encoder"
    assert rag_export_index("context-encoder", checkpoint, encoder) == 0
    assert "exporting context_encoder" in capsys.readouterr().err
    out = tmp_path / "from-checkpoint"
    assert rag_index("build", CORPUS, out, "--context-encoder", encoder, "--index-type", "flat") == 0
    np.testing.assert_allclose(np.load(out / "embeddings.npy"), np.load(built / "embeddings.npy"), atol=1e-5)
    meta = json.loads((out / "index.json").read_text())
    assert meta["encoder"]["source"] == str(checkpoint)


def test_hnsw_without_embeddings_scores_inner_products(token_bart, built, tmp_path):
    """Augmented-L2 distances are turned back into inner products when no embeddings are stored."""
    from rag_runtime.knowledge import KnowledgeIndex

    out = tmp_path / "hnsw-bare"
    assert rag_index("build", CORPUS, out, "--context-encoder", token_bart.export, "--index-type", "hnsw",
                     "--no-embeddings") == 0
    emb = np.load(built / "embeddings.npy")
    queries = emb[[5, 60, 300]] * 2.0
    ids, scores = KnowledgeIndex(out).search(queries, 4)
    np.testing.assert_allclose(scores, np.einsum("bd,bnd->bn", queries, emb[ids]), rtol=1e-4, atol=1e-4)
    assert (np.diff(scores, axis=1) <= 1e-5).all()


def _embedded_corpus(token_bart, vectors=None) -> list[dict]:
    """The bundled corpus with its PyTorch DPR embeddings (the checkpoint's knowledge base), as a released
    corpus carries them."""
    kb = _checkpoint_kb(token_bart)
    rows = [json.loads(line) for line in CORPUS.read_text().splitlines()]
    emb = np.asarray(kb["embeddings"], dtype=np.float32) if vectors is None else vectors
    return [{**r, "embeddings": e} for r, e in zip(rows, emb, strict=True)]


def test_build_from_stored_embeddings_in_arrow_and_jsonl(token_bart, built, tmp_path, capsys):
    """A corpus that carries its embeddings (wiki_dpr's layout) is indexed without embedding it again: a
    datasets save_to_disk copy (Arrow) checked against the context encoder, and JSONL without a check."""
    import datasets

    rows = _embedded_corpus(token_bart)
    copy = tmp_path / "saved"
    datasets.Dataset.from_list([{k: (v.tolist() if k == "embeddings" else v) for k, v in r.items()} for r in rows]
                               ).save_to_disk(str(copy), max_shard_size="40KB")
    assert len(list(copy.glob("*.arrow"))) > 1  # read in name order across the shards
    out = tmp_path / "from-arrow"
    assert rag_index("build", copy, out, "--embeddings-column", "embeddings", "--context-encoder", token_bart.export,
                     "--index-type", "flat") == 0
    assert "largest difference" in capsys.readouterr().err
    stored = np.stack([r["embeddings"] for r in rows])
    np.testing.assert_array_equal(np.load(out / "embeddings.npy"), stored)
    np.testing.assert_allclose(stored, np.load(built / "embeddings.npy"), atol=1e-4)  # what the encoder makes
    meta = json.loads((out / "index.json").read_text())
    assert meta["count"] == len(rows) and meta["encoder"] == json.loads((built / "index.json").read_text())["encoder"]

    jsonl = tmp_path / "embedded.jsonl"
    jsonl.write_text("".join(json.dumps({**r, "embeddings": r["embeddings"].tolist()}) + "\n" for r in rows[:50]))
    bare = tmp_path / "from-jsonl"
    assert rag_index("build", jsonl, bare, "--embeddings-column", "embeddings") == 0
    assert json.loads((bare / "index.json").read_text())["encoder"] is None
    np.testing.assert_array_equal(np.load(bare / "embeddings.npy"), stored[:50])


def test_stored_embeddings_are_checked(token_bart, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    enc = ["--context-encoder", token_bart.export]
    rows = _embedded_corpus(token_bart)
    # Rows shifted by one against their passages: what pairing files of another corpus or encoder looks like.
    shifted = _embedded_corpus(token_bart, np.roll(np.stack([r["embeddings"] for r in rows]), 1, axis=0))
    path = tmp_path / "shifted.parquet"
    pq.write_table(pa.Table.from_pylist([{**r, "embeddings": r["embeddings"].tolist()} for r in shifted]), path)
    assert rag_index("build", path, tmp_path / "o", "--embeddings-column", "embeddings", *enc) == 2
    one_line_error(capsys, "the stored embeddings do not come from the context encoder", "of its magnitude")
    assert rag_index("build", path, tmp_path / "o", "--embeddings-column", "vectors", *enc) == 2
    one_line_error(capsys, "no 'vectors' column")

    ragged = tmp_path / "ragged.jsonl"
    lines = [json.dumps({**r, "embeddings": r["embeddings"].tolist()}) for r in rows[:10]]
    lines[6] = json.dumps({**rows[6], "embeddings": rows[6]["embeddings"][:-1].tolist()})
    ragged.write_text("\n".join(lines) + "\n")
    assert rag_index("build", ragged, tmp_path / "o", "--embeddings-column", "embeddings") == 2
    one_line_error(capsys, f"{ragged}:7: 'embeddings' has 63 values, the first row has 64")
    assert not (tmp_path / "o").exists()

    tsv = tmp_path / "p.tsv"
    tsv.write_text("id\ttext\ttitle\n1\tsome text\tT\n")
    assert rag_index("build", tsv, tmp_path / "o", "--embeddings-column", "embeddings") == 2
    one_line_error(capsys, "stored embeddings are read from JSONL, Parquet or Arrow files, not TSV")
    assert rag_index("build", tsv, tmp_path / "o") == 2
    one_line_error(capsys, "needs --context-encoder EXPORT_DIR", "--embeddings-column")
