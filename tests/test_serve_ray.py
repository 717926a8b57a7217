"""rag-serve on Ray Serve: a local Ray started and shut down here, 2 replicas of the tiny export."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from rag_runtime.serve.limits import ServeLimits
from rag_runtime.serve.ray_app import APP_NAME, build_application
from rag_testing.serve_process import free_port

pytestmark = pytest.mark.ray


def _replicas(ray) -> set[str]:
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("SERVE_REPLICA::")}


def _running(serve) -> int:
    app = serve.status().applications.get(APP_NAME)
    if app is None:
        return 0
    return sum(d.replica_states.get("RUNNING", 0) for d in app.deployments.values())


@pytest.fixture(scope="module")
def ray_serve(bundles):
    import ray  # a missing ray must fail the test, not skip it
    from ray import serve

    export = bundles[("token", "bart")].export
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_application(str(export), ServeLimits(max_wait_ms=20), threads=1, replicas=2, replica_cpus=0.5)
        serve.run(app, name=APP_NAME, route_prefix="/")
        yield ray, serve, f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _ask(url: str, question: str) -> httpx.Response:
    return httpx.post(url + "/v1/generate", json={"question": question, "num_beams": 2}, timeout=60)


def _same(pipe, question: str, resp: httpx.Response) -> bool:
    """The served answer is generate()'s alone: texts, tokens and passages exactly, scores within 1e-4 (a
    question decoded beside others sums in another order)."""
    r = pipe.generate([question], num_beams=2)[0]
    got = resp.json()["results"][0]
    scores = [a["score"] for a in got["answers"]] + [d["score"] for d in got["docs"]]
    want = [a.score for a in r.answers] + [d.score for d in r.docs]
    return ([(a["text"], a["token_ids"]) for a in got["answers"]] == [(a.text, a.token_ids) for a in r.answers]
            and [d["id"] for d in got["docs"]] == [d.id for d in r.docs]
            and all(abs(x - y) <= 1e-4 * max(1.0, abs(y)) for x, y in zip(scores, want, strict=True)))


def test_two_replicas_answer_identically_and_survive_a_killed_replica(ray_serve, bundles, questions):
    ray, serve, url = ray_serve
    pipe = bundles[("token", "bart")].pipeline
    assert _running(serve) == 2 and httpx.get(url + "/health/ready").status_code == 200

    asked = questions[:16]
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda q: _ask(url, q), asked))
    assert [r.status_code for r in responses] == [200] * len(asked)
    assert all(_same(pipe, q, r) for q, r in zip(asked, responses, strict=True))

    before = _replicas(ray)
    assert len(before) == 2
    victim = sorted(before)[0]
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    # Every request sent after the kill is answered by the surviving replica (or the new one).
    after_kill = [_ask(url, q) for q in questions[:8]]
    assert [r.status_code for r in after_kill] == [200] * 8, [r.text for r in after_kill if r.status_code != 200]
    assert all(_same(pipe, q, r) for q, r in zip(questions[:8], after_kill, strict=True))

    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (_running(serve) == 2 and victim not in _replicas(ray)
                                                and len(_replicas(ray)) == 2):
        time.sleep(0.5)
    now = _replicas(ray)
    assert victim not in now and len(now) == 2 and _running(serve) == 2, (before, now, serve.status())
    assert _ask(url, questions[0]).status_code == 200
