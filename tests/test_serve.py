"""rag-serve: a real server process on a free 127.0.0.1 port, real HTTP, answers compared with RagPipeline."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from rag_runtime.options import OPTIONS
from rag_runtime.serve.batcher import Batcher, BatchFailed
from rag_runtime.serve.limits import ServeLimits
from rag_runtime.serve.metrics import ServeMetrics
from rag_testing.serve_process import ServerProcess, metric

# Long enough (about a second on one core) for requests to pile up behind it.
# At the service's default caps, long enough (about 1.8 s on the tiny model here; 120 tokens over 10 passages
# took 0.36 s once the runtime got faster) that requests sent 0.3-0.7 s after it still find it computing.
SLOW = {"num_beams": 8, "min_length": 256, "max_length": 256, "n_docs": 20}


@pytest.fixture(scope="module")
def bundle(bundles):
    return bundles[("token", "bart")]


@pytest.fixture(scope="module")
def server(bundle):
    with ServerProcess(bundle.export, "--max-wait-ms", "50") as s:
        yield s


def _post(url: str, body, path: str = "/v1/generate", **kwargs) -> httpx.Response:
    if isinstance(body, (bytes, str)):
        return httpx.post(url + path, content=body, timeout=60, **kwargs)
    return httpx.post(url + path, json=body, timeout=60, **kwargs)


def _expected(pipe, question: str, params: dict) -> dict:
    r = pipe.generate([question], **params)[0]
    return {"question": question,
            "answers": [{"text": a.text, "token_ids": a.token_ids, "score": a.score} for a in r.answers],
            "docs": [{"id": d.id, "title": d.title, "text": d.text, "score": d.score, "pid": d.pid} for d in r.docs]}


def _assert_answers(results: list[dict], expected: list[dict]) -> None:
    """Served results equal generate() alone: texts, token ids and passages exactly, scores within 1e-4
    (a question decoded beside others sums in another order: the last float digits may move)."""
    def scores(rs, key):
        return [x["score"] for r in rs for x in r[key]]

    def without_scores(rs):
        return [{**r, **{key: [{k: v for k, v in x.items() if k != "score"} for x in r[key]]
                         for key in ("answers", "docs")}} for r in rs]

    assert without_scores(results) == without_scores(expected)
    for key in ("answers", "docs"):
        np.testing.assert_allclose(scores(results, key), scores(expected, key), rtol=1e-4, atol=1e-5)


def test_ready_only_after_warmup(server):
    seen = [s for s in server.startup if s is not None]
    assert seen[0] == 503 and seen[-1] == 200, server.startup
    assert httpx.get(server.url + "/health/live").json() == {"status": "live"}


def test_concurrent_answers_equal_generate_alone(server, bundle, questions):
    grid = [{}, {"num_beams": 2}, {"num_beams": 3, "num_return_sequences": 2, "n_docs": 3}]
    jobs = [(q, grid[i % len(grid)]) for i, q in enumerate(questions[:12])]
    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda job: _post(server.url, {"question": job[0], **job[1]}), jobs))
    for (q, params), resp in zip(jobs, responses, strict=True):
        assert resp.status_code == 200, resp.text
        _assert_answers(resp.json()["results"], [_expected(bundle.pipeline, q, params)])
    assert max(float(r.headers["x-batch-size"]) for r in responses) > 1  # concurrent requests decoded together

    many = _post(server.url, {"questions": questions[:3], "num_beams": 2})
    _assert_answers(many.json()["results"], [_expected(bundle.pipeline, q, {"num_beams": 2}) for q in questions[:3]])


def test_retrieve(server, bundle, questions):
    resp = _post(server.url, {"questions": questions[:2], "n_docs": 3}, "/v1/retrieve")
    assert resp.status_code == 200
    expected = bundle.pipeline.retrieve(questions[:2], n_docs=3)
    for result, q, docs in zip(resp.json()["results"], questions[:2], expected, strict=True):
        assert result["question"] == q
        assert [(d["id"], d["pid"], d["title"], d["score"]) for d in result["docs"]] == [
            (d.id, d.pid, d.title, d.score) for d in docs]
        assert all(d["pid"] is not None for d in result["docs"])  # the passage's own id survives HTTP


def test_info(server, bundle):
    info = httpx.get(server.url + "/info").json()
    assert list(info["options"]) == list(OPTIONS)
    assert info["options"]["num_beams"]["cap"] == {"limit": "max_num_beams", "value": 8}
    assert info["options"]["num_beams"]["default"] == bundle.pipeline.options().num_beams
    assert info["options"]["seed"] == {"type": "integer", "default": None, "help": OPTIONS["seed"].help, "cap": None}
    assert (info["kind"], info["generator"], info["device"]) == ("token", "bart", "cpu")
    size = info["index"]["size"]
    assert isinstance(size, int) and max(d.id for d in bundle.pipeline.retrieve(["a"], n_docs=5)[0]) < size
    assert info["limits"]["max_batch_size"] == 8 and info["limits"]["max_wait_ms"] == 50
    engine = info["scheduler"]
    assert engine["kind"] == "engine" and engine["max_rows"] >= 1 and engine["bytes_per_row"] > 0
    assert engine["cache_bytes_per_row"] < engine["bytes_per_row"]


BAD = [
    (b"", 422, "empty_body", None),
    (b"{not json", 422, "invalid_json", None),
    (b"[1, 2]", 422, "invalid_json", None),
    ({"num_beams": 2}, 422, "missing_field", "questions"),
    ({"questions": []}, 422, "invalid_type", "questions"),
    ({"questions": ["a", 3]}, 422, "invalid_type", "questions[1]"),
    ({"question": "a", "num_beamz": 2}, 422, "unknown_field", "num_beamz"),
    ({"question": "a", "num_beams": "4"}, 422, "invalid_type", "num_beams"),
    ({"question": "a", "num_beams": 0}, 422, "invalid_value", "num_beams"),
    ({"question": "a", "min_length": 9, "max_length": 5}, 422, "invalid_value", "min_length"),
    ({"question": "a", "early_stopping": "sometimes"}, 422, "invalid_type", "early_stopping"),
    ({"question": "a", "num_beams": 64}, 422, "limit_exceeded", "num_beams"),
    ({"question": "a", "max_new_tokens": 300}, 422, "limit_exceeded", "max_new_tokens"),
    ({"question": "a", "num_beam_groups": 2}, 422, "unsupported_option", "num_beam_groups"),
    ({"question": "a", "timeout_s": -1}, 422, "invalid_value", "timeout_s"),
    ({"question": "x" * 2001}, 422, "limit_exceeded", "question"),
    ({"questions": ["a"] * 33}, 413, "too_many_questions", "questions"),
    (b'{"question": "' + b"x" * (1 << 20) + b'"}', 413, "body_too_large", None),
]


@pytest.mark.parametrize("body,status,kind,field", BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input(server, body, status, kind, field):
    resp = _post(server.url, body)
    assert resp.status_code == status, resp.text
    assert "\n" not in resp.text and "Traceback" not in resp.text
    data = resp.json()
    assert data["type"] == kind and data["error"]
    assert data.get("field") == field
    if field:
        assert field.split("[")[0] in data["error"]
    assert "Traceback" not in server.log()


# A value of the wrong JSON type for each option type (a new type must add one here).
WRONG_TYPE = {"integer": "3", "number": "x", "boolean": "yes", 'boolean or "never"': "sometimes",
              "token id": 1.5, "token ids": [1, "x"], "token id sequences": [[]]}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_422_names_the_field_of_every_option(server, name):
    """Each declared option is part of the HTTP schema: a wrong type, then (where the option is bounded) a
    value out of range, is refused with 422 naming that field."""
    opt = OPTIONS[name]
    bad = [(WRONG_TYPE[opt.type.name], "invalid_type")]
    low = opt.above if opt.above is not None else None if opt.minimum is None else opt.minimum - 1
    if low is not None:
        bad.append((int(low) if opt.type.name == "integer" else low, "invalid_value"))
    if opt.maximum is not None:
        bad.append((opt.maximum + 1, "invalid_value"))
    for value, kind in bad:
        resp = _post(server.url, {"question": "a", name: value})
        assert resp.status_code == 422, (value, resp.text)
        assert (resp.json()["type"], resp.json()["field"]) == (kind, name), (value, resp.json())
        assert name in resp.json()["error"]


def test_new_generation_options_over_http_equal_generate(server, bundle, questions):
    params = {"max_new_tokens": 7, "min_new_tokens": 4, "decoder_start_token_id": 5, "num_beams": 2,
              "do_sample": True, "seed": 9, "top_k": 20, "top_p": 0.9, "suppress_tokens": [40]}
    resp = _post(server.url, {"question": questions[6], **params})
    assert resp.status_code == 200, resp.text
    _assert_answers(resp.json()["results"], [_expected(bundle.pipeline, questions[6], params)])
    answer = resp.json()["results"][0]["answers"][0]["token_ids"]
    assert answer[0] == 5 and 40 not in answer and len(answer) <= 8


def test_metrics_reflect_traffic(server, questions):
    before = httpx.get(server.url + "/metrics").text
    for q in questions[:3]:
        assert _post(server.url, {"question": q}).status_code == 200
    assert _post(server.url, {"question": "a", "bogus": 1}).status_code == 422
    after = httpx.get(server.url + "/metrics").text

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("rag_requests_total", endpoint="/v1/generate", status="200") == 3
    assert delta("rag_requests_total", endpoint="/v1/generate", status="422") == 1
    assert delta("rag_queue_duration_seconds_count") == 3
    assert delta("rag_batch_size_sum", operation="generate") == 3
    assert 1 <= delta("rag_inference_duration_seconds_count", operation="generate") <= 3
    assert metric(after, "rag_queue_depth") == 0


def test_overload_rejects_with_429_and_loses_nothing(bundle):
    with ServerProcess(bundle.export, "--max-queue", "2", "--max-batch-size", "1", "--max-wait-ms", "0") as s:
        with ThreadPoolExecutor(10) as pool:
            responses = list(pool.map(lambda i: _post(s.url, {"question": f"question {i}", **SLOW}), range(10)))
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 429} and codes.count(200) >= 1 and codes.count(429) >= 1, codes
        assert all(r.headers.get("retry-after") for r in responses if r.status_code == 429)
        text = httpx.get(s.url + "/metrics").text
        assert metric(text, "rag_rejected_total", reason="queue_full") == codes.count(429)
        assert metric(text, "rag_batch_size_count", operation="generate") == codes.count(200)


def test_deadline_gives_504_without_compute(bundle):
    with ServerProcess(bundle.export, "--max-batch-size", "1", "--max-wait-ms", "0") as s, ThreadPoolExecutor(2) as pool:
        slow = pool.submit(_post, s.url, {"question": "slow", **SLOW})
        time.sleep(0.3)  # the slow request is computing; the next one can only wait
        late = _post(s.url, {"question": "late", "timeout_s": 0.2})
        assert late.status_code == 504 and late.json()["type"] == "deadline_exceeded"
        assert slow.result().status_code == 200
        text = httpx.get(s.url + "/metrics").text
        assert metric(text, "rag_cancelled_total", reason="deadline") == 1
        assert metric(text, "rag_batch_size_count", operation="generate") == 1  # the late one never ran


def test_client_gone_while_queued_is_dropped_and_counted(bundle):
    with ServerProcess(bundle.export, "--max-batch-size", "1", "--max-wait-ms", "0") as s, ThreadPoolExecutor(1) as pool:
        slow = pool.submit(_post, s.url, {"question": "slow", **SLOW})
        time.sleep(0.3)
        body = json.dumps({"question": "gone"}).encode()
        with socket.create_connection(("127.0.0.1", s.port)) as sock:
            sock.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            time.sleep(0.2)  # queued behind the slow request when the client leaves
        assert slow.result().status_code == 200
        time.sleep(0.2)
        text = httpx.get(s.url + "/metrics").text
        assert metric(text, "rag_cancelled_total", reason="disconnect") == 1
        assert metric(text, "rag_batch_size_count", operation="generate") == 1  # never computed


def test_auth(bundle):
    with ServerProcess(bundle.export, "--api-key-env", "RAG_TEST_KEY", env={"RAG_TEST_KEY": "s3cret"}) as s:
        assert httpx.get(s.url + "/health/live").status_code == 200
        assert httpx.get(s.url + "/health/ready").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            assert httpx.get(s.url + "/info", headers=headers).status_code == 401
            assert httpx.get(s.url + "/metrics", headers=headers).status_code == 401
            assert _post(s.url, {"question": "a"}, headers=headers).status_code == 401
        ok = {"Authorization": "Bearer s3cret"}
        assert httpx.get(s.url + "/info", headers=ok).status_code == 200
        assert _post(s.url, {"question": "a"}, headers=ok).status_code == 200


def test_sigterm_drains_and_exits_0(bundle):
    s = ServerProcess(bundle.export, "--max-batch-size", "1", "--max-wait-ms", "0")
    with s, ThreadPoolExecutor(3) as pool:
        pending = [pool.submit(_post, s.url, {"question": f"q{i}", **SLOW}) for i in range(3)]
        deadline = time.monotonic() + 10
        while metric(httpx.get(s.url + "/metrics").text, "rag_queue_depth") < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        s.terminate()
        time.sleep(0.1)
        assert httpx.get(s.url + "/health/ready").status_code == 503
        refused = _post(s.url, {"question": "too late"})
        assert refused.status_code == 503 and refused.json()["type"] == "draining"
        assert [f.result().status_code for f in pending] == [200, 200, 200]
        assert s.proc.wait(30) == 0


# -- the batcher alone, with a fake slow pipeline -----------------------------------------------------------


def _run_batcher(limits: ServeLimits, requests: list[tuple[float, list[str], dict]], fail: bool = False):
    calls = []

    def run_batch(op, questions, params):
        calls.append((list(questions), params))
        time.sleep(0.05)
        if fail:
            raise RuntimeError("boom")
        return [f"{q}|{params}" for q in questions]

    async def main():
        batcher = Batcher(run_batch, limits, ServeMetrics())
        batcher.start()
        jobs = []
        for delay, questions, params in requests:
            await asyncio.sleep(delay)
            jobs.append(batcher.submit("generate", questions, params, 10))
        results = await asyncio.gather(*(j.future for j in jobs), return_exceptions=True)
        await batcher.stop()
        batcher.jobs = jobs
        return results, batcher

    results, batcher = asyncio.run(main())
    return calls, results, batcher


def test_batcher_groups_equal_parameters():
    reqs = [(0, ["a"], {"num_beams": 2}), (0, ["b"], {"num_beams": 4}), (0, ["c"], {"num_beams": 2}),
            (0, ["d", "e"], {"num_beams": 4})]
    calls, results, _ = _run_batcher(ServeLimits(max_batch_size=8, max_wait_ms=30), reqs)
    assert calls == [(["a", "c"], {"num_beams": 2}), (["b", "d", "e"], {"num_beams": 4})]
    assert results == [["a|{'num_beams': 2}"], ["b|{'num_beams': 4}"], ["c|{'num_beams': 2}"],
                       ["d|{'num_beams': 4}", "e|{'num_beams': 4}"]]


def test_batcher_max_batch_size_and_max_wait():
    calls, _, _ = _run_batcher(ServeLimits(max_batch_size=2, max_wait_ms=1000), [(0, [q], {}) for q in "abcde"])
    assert [c[0] for c in calls] == [["a", "b"], ["c", "d"], ["e"]]
    # A lone question waits max_wait_ms for company, then runs alone; a late one gets its own batch.
    calls, _, batcher = _run_batcher(ServeLimits(max_batch_size=8, max_wait_ms=100),
                                     [(0, ["a"], {}), (0.3, ["b"], {})])
    assert [c[0] for c in calls] == [["a"], ["b"]]
    assert [0.1 <= job.queue_s < 0.2 for job in batcher.jobs] == [True, True]


def test_batcher_failure_fails_only_that_batch():
    calls, results, batcher = _run_batcher(ServeLimits(max_batch_size=1, max_wait_ms=0),
                                           [(0, ["a"], {}), (0, ["b"], {})], fail=True)
    assert all(isinstance(r, BatchFailed) for r in results) and len(calls) == 2
    assert batcher.consecutive_failures == 2


def test_batcher_stop_answers_what_is_still_queued():
    """Stopping (a drain that timed out, a failed start) fails queued jobs instead of leaving them hanging."""
    from rag_runtime.serve.batcher import ShuttingDown

    async def main():
        def run_batch(op, questions, params):
            time.sleep(0.3)
            return list(questions)

        batcher = Batcher(run_batch, ServeLimits(max_batch_size=1, max_wait_ms=0), ServeMetrics())
        batcher.start()
        jobs = [batcher.submit("generate", [q], {}, 10) for q in "abc"]
        await asyncio.sleep(0.1)  # "a" is computing, "b" and "c" wait
        await batcher.stop()
        return await asyncio.gather(*(j.future for j in jobs), return_exceptions=True), batcher

    results, batcher = asyncio.run(main())
    # The batch in flight ("a") and the queued ones are all answered with ShuttingDown, none left waiting.
    assert all(isinstance(r, ShuttingDown) for r in results), results
    assert batcher.queued_questions == 0


class _FailingOn:
    """The real pipeline, except that preparing a question ``trigger`` raises (an inference fault)."""

    def __init__(self, pipe, trigger: str):
        self._pipe, self._trigger = pipe, trigger

    def prepare(self, questions, opts):
        if self._trigger in questions:
            raise RuntimeError("simulated inference failure")
        return self._pipe.prepare(questions, opts)

    def __getattr__(self, name):
        return getattr(self._pipe, name)


def test_inference_fault_fails_that_batch_and_repeated_faults_make_it_unready(bundle, caplog):
    """A real uvicorn server over real HTTP, in this process so a fault can be planted in the pipeline."""
    import threading

    import uvicorn

    from rag_runtime import RagPipeline
    from rag_runtime.serve import create_app
    from rag_testing.serve_process import free_port

    def load():  # a loader: the app takes a RagPipeline or a callable returning one
        return _FailingOn(RagPipeline.load(bundle.export, threads=1), "explode")

    app = create_app(load, ServeLimits(max_wait_ms=1, failures_until_unready=2), load_in_background=False)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.get(url + "/health/ready").status_code == 200

        failed = _post(url, {"question": "explode"})
        assert failed.status_code == 500 and failed.json()["type"] == "inference_failed", failed.text
        assert "Traceback" not in failed.text and "simulated" not in failed.text  # the reason stays in the log
        assert any("simulated inference failure" in r.getMessage() for r in caplog.records)
        assert httpx.get(url + "/health/ready").status_code == 200  # one failure: still ready

        ok = _post(url, {"question": "who wrote hamlet?"})
        assert ok.status_code == 200 and ok.json()["results"][0]["answers"]  # the service keeps serving
        assert [_post(url, {"question": "explode"}).status_code for _ in range(2)] == [500, 500]
        ready = httpx.get(url + "/health/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "failing"
        assert metric(httpx.get(url + "/metrics").text, "rag_failed_batches_total") == 3
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_a_question_past_its_deadline_leaves_the_running_decode(bundle, questions):
    """The engine: a request whose deadline passes while it decodes gets 504, and its question leaves the
    decode at the next step (it does not compute to the end); a request sent after it is answered."""
    with ServerProcess(bundle.export) as s:
        before = httpx.get(s.url + "/metrics").text
        late = _post(s.url, {"question": "slow", **SLOW, "timeout_s": 0.4})
        assert late.status_code == 504 and late.json()["type"] == "deadline_exceeded", late.text
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = httpx.get(s.url + "/metrics").text
            if metric(text, "rag_engine_leaves_total", reason="cancelled") == 1:
                break
            time.sleep(0.05)
        assert metric(text, "rag_engine_leaves_total", reason="cancelled") == 1
        assert metric(text, "rag_cancelled_total", reason="deadline") == 1
        steps = metric(text, "rag_decoder_rows_count") - metric(before, "rag_decoder_rows_count")
        assert 0 < steps < SLOW["max_length"] - 1, f"{steps} steps: it decoded to the end"
        ok = _post(s.url, {"question": questions[0], "num_beams": 2})
        _assert_answers(ok.json()["results"], [_expected(bundle.pipeline, questions[0], {"num_beams": 2})])
        assert metric(httpx.get(s.url + "/metrics").text, "rag_active_questions") == 0


def test_staggered_requests_with_different_parameters_share_the_decode(bundle, questions):
    """Requests with different parameters, sent one after another while a long one decodes, join its running
    decode, and each answer equals generate() on that question alone."""
    grid = [{"num_beams": 1, "n_docs": 3}, {"num_beams": 3, "num_return_sequences": 2, "no_repeat_ngram_size": 2},
            {"num_beams": 2, "n_docs": 2}, {"do_sample": True, "seed": 3, "num_beams": 2},
            {"max_new_tokens": 6, "num_beams": 3}, {"num_beams": 4, "max_length": 12, "min_length": 9}]
    jobs = [(questions[9], {"num_beams": 4, "min_length": 200, "max_length": 200})]
    jobs += [(questions[10 + i], grid[i % len(grid)]) for i in range(10)]
    with ServerProcess(bundle.export) as s, ThreadPoolExecutor(len(jobs)) as pool:
        def send(i):
            time.sleep(0.1 + 0.05 * i if i else 0)
            return _post(s.url, {"question": jobs[i][0], **jobs[i][1]})

        responses = list(pool.map(send, range(len(jobs))))
        text = httpx.get(s.url + "/metrics").text
    for (q, params), resp in zip(jobs, responses, strict=True):
        assert resp.status_code == 200, resp.text
        _assert_answers(resp.json()["results"], [_expected(bundle.pipeline, q, params)])
    assert metric(text, "rag_engine_joins_total") == len(jobs)
    # Each later request decoded beside the long one (mean questions per step of its decode).
    assert all(float(r.headers["x-batch-size"]) >= 2 for r in responses[1:]), [r.headers["x-batch-size"]
                                                                              for r in responses]


def test_caps_apply_to_the_exports_defaults_too(bundle):
    """A request that sends nothing still gets the export's default max_length: the cap bounds that too."""
    default = bundle.pipeline.options().max_length
    with ServerProcess(bundle.export, "--max-length", str(default - 1)) as s:
        resp = _post(s.url, {"question": "who wrote hamlet?"})
        assert resp.status_code == 422, resp.text
        assert resp.json()["type"] == "limit_exceeded" and "max_length" in resp.json()["error"]
        ok = _post(s.url, {"question": "who wrote hamlet?", "max_length": default - 1})
        assert ok.status_code == 200 and ok.json()["results"][0]["answers"]
