"""From the hub, as a user gets it: a checkpoint laid out like facebook/rag-token-nq (2020 config, pytorch_model.bin,
slow tokenizer files, the wiki_dpr index in its RagConfig) in a Hugging Face cache, exported through the CLI
with no network and no HF_HUB_OFFLINE; wiki_dpr's index built from a stand-in of its released passages and
embeddings; answers against transformers. Then every way the hub can fail, each with its own message."""

from __future__ import annotations

import http.server
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, build_checkpoint
from hub_layout import cache_repo, write_hub_dpr_context_encoder, write_hub_rag
from rag_export import ExportError
from support import assert_not_degenerate, reference_tokens, special_ids

HUB_ID, CTX_ID = "facebook/rag-token-nq", "facebook/dpr-ctx_encoder-single-nq-base"
REVISION = "4d1f2c3b" * 5
CORPUS = [json.loads(line) for line in (ROOT / "scripts" / "data" / "corpus.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def hub_home(work_dir, tmp_path_factory) -> Path:
    """An HF_HOME whose hub cache holds the two repositories, as `hf download` leaves them."""
    ckpt = build_checkpoint(work_dir, "token", "bart")
    root = tmp_path_factory.mktemp("hub")
    cache_repo(write_hub_rag(ckpt, root / "rag-token-nq"), root / "home" / "hub", HUB_ID, REVISION)
    cache_repo(write_hub_dpr_context_encoder(ckpt / "context_encoder", root / "ctx"), root / "home" / "hub", CTX_ID)
    return root / "home"


def _snapshot(home: Path, repo_id: str) -> Path:
    repo = home / "hub" / f"models--{repo_id.replace('/', '--')}"
    return repo / "snapshots" / (repo / "refs" / "main").read_text()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rag_export(args: list, home: Path, endpoint: str, **env) -> tuple[subprocess.CompletedProcess, float]:
    """rag-export in a fresh process, environment as a user's without network: the test suite's own
    HF_HUB_OFFLINE and HF_* settings removed."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    clean.update(HF_HOME=str(home), HF_ENDPOINT=endpoint, NO_PROXY="127.0.0.1,localhost", **env)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "rag_export", *map(str, args)], env=clean, capture_output=True,
                          text=True, timeout=900)
    return proc, time.monotonic() - t0


def _wiki_dpr_standin(home: Path, out: Path, shards: int = 2) -> Path:
    """The bundled corpus in wiki_dpr's layout (id as a 1-based string, text, title, embeddings), split into
    Parquet shards, the embeddings made by PyTorch's DPR context encoder from the cache (title and text as
    a pair, as DPR embeds passages)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoTokenizer, DPRContextEncoder

    encoder_dir = _snapshot(home, CTX_ID)
    model, tok = DPRContextEncoder.from_pretrained(encoder_dir).eval(), AutoTokenizer.from_pretrained(encoder_dir)
    with torch.no_grad():
        enc = tok([r["title"] for r in CORPUS], [r["text"] for r in CORPUS], truncation=True, padding=True,
                  return_tensors="pt")
        emb = model(enc.input_ids, attention_mask=enc.attention_mask).pooler_output.numpy().astype(np.float32)
    out.mkdir(parents=True)
    bounds = np.linspace(0, len(CORPUS), shards + 1).astype(int)
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        table = pa.table({"id": [str(j + 1) for j in range(lo, hi)], "text": [r["text"] for r in CORPUS[lo:hi]],
                          "title": [r["title"] for r in CORPUS[lo:hi]],
                          "embeddings": pa.array(list(emb[lo:hi]), type=pa.list_(pa.float32()))})
        pq.write_table(table, out / f"train-{i:05d}-of-{shards:05d}.parquet")
    return out


def _reference(home: Path, standin: Path):
    """transformers' RagTokenForGeneration from the cached snapshot, retrieving from the stand-in with
    a RagRetriever over the same passages and embeddings (exact inner-product search)."""
    import datasets
    import faiss
    from transformers import RagConfig, RagRetriever, RagTokenizer
    from transformers.models.rag.retrieval_rag import CustomHFIndex

    from rag_testing.reference import Reference

    snapshot = str(_snapshot(home, HUB_ID))
    ds = datasets.Dataset.from_parquet(sorted(str(p) for p in standin.iterdir()))
    ds.add_faiss_index("embeddings", custom_index=faiss.IndexFlatIP(len(ds[0]["embeddings"])))
    tok = RagTokenizer.from_pretrained(snapshot)
    config = RagConfig.from_pretrained(snapshot)
    retriever = RagRetriever(config, tok.question_encoder, tok.generator,
                             index=CustomHFIndex(config.retrieval_vector_size, ds))
    return Reference(snapshot, retriever=retriever)


def test_export_from_the_hub_cache_without_network_answers_like_transformers(hub_home, tmp_path, questions, capsys):
    from rag_runtime.cli import main as generate_main
    from rag_runtime.index_cli import main as index_main

    out = tmp_path / "rag-token-nq"
    port = _closed_port()
    proc, seconds = _rag_export([HUB_ID, out, "--context-encoder", CTX_ID], hub_home, f"http://127.0.0.1:{port}")
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr.splitlines()
    # Each model: one line saying the hub is unreachable and the cache is used; no retries, nothing twice.
    unreachable = [line for line in err if f"127.0.0.1:{port}" in line]
    assert len(unreachable) == 2 and all(line.startswith("rag-export: the hub (") for line in unreachable), err
    assert [HUB_ID in unreachable[0], CTX_ID in unreachable[1]] == [True, True]
    assert not any("Retrying" in line for line in err), err
    assert seconds < 240, f"took {seconds:.0f} s"
    assert any(line.startswith("rag-export: missing: a knowledge index") and "'wiki_dpr'" in line for line in err)
    assert f"rag-export:   2. rag-index attach {out} {out.parent / (out.name + '-index')}" in err
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["source"], manifest["context_encoder_source"], manifest["index"]) == (HUB_ID, CTX_ID, None)

    standin = _wiki_dpr_standin(hub_home, tmp_path / "wiki_dpr" / "psgs_w100.nq.exact")
    kb = tmp_path / "kb"
    assert index_main(["build", str(standin), str(kb), "--embeddings-column", "embeddings", "--context-encoder",
                       str(out), "--index-type", "flat"]) == 0
    assert "largest difference" in capsys.readouterr().err
    assert index_main(["attach", str(out), str(kb)]) == 0

    qs = [questions[5], questions[0], questions[13]]
    params = dict(num_beams=3, max_length=12, n_docs=4, num_return_sequences=2)
    capsys.readouterr()
    assert generate_main([str(out), *qs, "--json", "--num-beams", "3", "--max-length", "12", "--n-docs", "4",
                          "--num-return-sequences", "2"]) == 0
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    ref = _reference(hub_home, standin)
    expected = ref.generate(qs, **params)
    from rag_runtime import RagPipeline

    eos, pad = special_ids(RagPipeline.load(out))
    assert_not_degenerate([r.sequences for r in expected], eos | {pad})
    for g, r in zip(got, expected, strict=True):
        assert [d["id"] for d in g["docs"]] == r.doc_ids.tolist()
        assert [d["pid"] for d in g["docs"]] == [str(i + 1) for i in r.doc_ids.tolist()]  # wiki_dpr's own ids
        np.testing.assert_allclose([d["score"] for d in g["docs"]], r.doc_scores, rtol=1e-4, atol=1e-5)
        assert [a["token_ids"] for a in g["answers"]] == [reference_tokens(row, eos, pad) for row in r.sequences]
        np.testing.assert_allclose([a["score"] for a in g["answers"]], r.scores, rtol=1e-4, atol=1e-5)


def test_offline_flag_loads_from_the_cache_without_asking(hub_home, tmp_path):
    """HF_HUB_OFFLINE=1 and a hub endpoint that would hang: nothing is asked, the cache is used."""
    with _hanging_server() as endpoint:
        proc, _ = _rag_export([HUB_ID, tmp_path / "out", "--no-validate"], hub_home, endpoint, HF_HUB_OFFLINE="1")
    assert proc.returncode == 0, proc.stderr
    assert "not reachable" not in proc.stderr
    assert f"1. rag-export-index context-encoder {CTX_ID} {tmp_path / 'out-context-encoder'}" in proc.stderr


# -- what each failure says (in process: huggingface_hub's settings patched) ---------------------------------


class _FakeHub(http.server.ThreadingHTTPServer):
    """Answers model-info requests as the hub does: 200 for ``existing``, gated ones refused, else 404."""

    def __init__(self, existing=(), gated=()):
        self.existing, self.gated = set(existing), set(gated)
        super().__init__(("127.0.0.1", 0), _FakeHubHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _FakeHubHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        repo = self.path.split("?")[0].removeprefix("/api/models/")
        status, code = ((200, None) if repo in self.server.existing else (403, "GatedRepo") if repo in self.server.gated
                        else (404, "RepoNotFound"))
        body = json.dumps({"id": repo} if status == 200 else {"error": "no"}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class _hanging_server:
    """A port that accepts connections and never answers."""

    def __enter__(self) -> str:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def __exit__(self, *exc):
        self.sock.close()


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """huggingface_hub's settings, patched: online, an empty cache, a 1 s metadata timeout."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 1)
    return constants


def _message(source: str) -> str:
    from rag_export.hub import resolve

    with pytest.raises(ExportError) as e:
        resolve(source)
    return str(e.value)


def test_offline_with_nothing_cached(hub, monkeypatch):
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    message = _message(HUB_ID)
    assert "not in the Hugging Face cache" in message and hub.HF_HUB_CACHE in message
    assert "HF_HUB_OFFLINE=1 forbids downloading" in message and "models--facebook--rag-token-nq" in message


def test_no_network_with_nothing_cached(hub, monkeypatch):
    monkeypatch.setattr(hub, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    message = _message(HUB_ID)
    assert message.startswith(f"cannot download {HUB_ID}: the hub (http://127.0.0.1:") and "not reachable" in message
    assert "not in the Hugging Face cache" in message and "set HF_HUB_OFFLINE=1" in message
    assert "hf download facebook/rag-token-nq" in message


def test_misspelt_missing_gated_and_invalid_ids(hub, monkeypatch):
    fake = _FakeHub(existing=[HUB_ID], gated=["org/gated-rag"])
    monkeypatch.setattr(hub, "ENDPOINT", fake.url)
    try:
        misspelt = _message("facebook/rag-tokn-nq")
        missing = _message("someone/my-own-rag")
        gated = _message("org/gated-rag")
    finally:
        fake.shutdown()
    assert "facebook/rag-tokn-nq does not exist on the hub" in misspelt and "did you mean facebook/rag-token-nq?" in misspelt
    assert "someone/my-own-rag does not exist on the hub" in missing and "did you mean" not in missing
    assert "private" in missing and "hf auth login" in missing
    assert "org/gated-rag is gated" in gated and f"{fake.url}/org/gated-rag" in gated
    invalid = _message("facebook/rag token nq")
    assert "is neither a directory nor a valid hub model id" in invalid


def test_a_hanging_hub_is_bounded_by_the_metadata_timeout(hub, hub_home, monkeypatch):
    from rag_export.hub import resolve

    with _hanging_server() as endpoint:
        monkeypatch.setattr(hub, "ENDPOINT", endpoint)
        t0 = time.monotonic()
        message = _message(HUB_ID)
        assert "no answer within 1 s (HF_HUB_ETAG_TIMEOUT)" in message and time.monotonic() - t0 < 10
        monkeypatch.setattr(hub, "HF_HUB_CACHE", str(hub_home / "hub"))
        t0 = time.monotonic()
        where = resolve(HUB_ID)
        assert time.monotonic() - t0 < 10
    assert (where.origin, Path(where.location)) == ("cache", _snapshot(hub_home, HUB_ID))


def test_hub_warnings_are_printed_once(capsys):
    from rag_export.hub import adopt_library_logging
    from rag_runtime.commands import setup_logging

    libraries = [logging.getLogger(name) for name in ("huggingface_hub", "transformers")]
    saved = [(lib, list(lib.handlers), lib.propagate) for lib in libraries]
    try:
        setup_logging("rag-export")
        adopt_library_logging()
        logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
        logging.getLogger("transformers.modeling_utils").error("a transformers error")
        assert capsys.readouterr().err.splitlines() == ["rag-export: Retrying in 1s [Retry 1/5].",
                                                        "rag-export: a transformers error"]
    finally:
        for lib, handlers, propagate in saved:
            lib.handlers[:] = handlers
            lib.propagate = propagate


def test_the_last_lines_follow_the_checkpoint(bundles):
    """What the export ends with, per RagConfig: the index it lacks and the commands, with its directory."""
    from types import SimpleNamespace

    from rag_export.summary import export_summary
    from rag_runtime import Manifest

    out = bundles[("token", "bart")].export
    manifest = Manifest.load(out, verify=False)
    assert export_summary(out, manifest, None)[1] == f'next: rag-generate {out} "your question"   then: rag-serve {out}'
    manifest.index = None

    def lines(**fields) -> str:
        cfg = SimpleNamespace(**{"index_name": "compressed", "dataset": "wiki_dpr", "use_dummy_dataset": False,
                                 "passages_path": None, "index_path": None, **fields})
        return "\n".join(export_summary(out, manifest, cfg))

    given = manifest.context_encoder_source
    text = lines()  # exported with a context encoder that is not wiki_dpr's
    assert "21M Wikipedia passages" in text and "--embeddings-column" not in text
    assert f"rag-index build PASSAGES {out.parent / (out.name + '-index')} --context-encoder {out}" in text
    assert f"made with {CTX_ID}, not {given}" in text
    assert "small dummy sample" in lines(use_dummy_dataset=True) and "21M" not in lines(use_dummy_dataset=True)
    manifest.context_encoder_source = None
    text = lines()
    assert f"1. rag-export-index context-encoder {CTX_ID} {out.parent / (out.name + '-context-encoder')}" in text
    assert f"--embeddings-column embeddings --context-encoder {out.parent / (out.name + '-context-encoder')}" in text
    text = lines(index_name="custom", passages_path="/kb/passages", index_path="/kb/passages.faiss")
    assert "left out (--no-index)" in text and "rag-export-index import /kb/passages /kb/passages.faiss" in text
