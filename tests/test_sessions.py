"""Sessions get the providers and options they were asked for, or say why not: a CUDA session that
onnxruntime quietly runs on the CPU is refused with the library that failed to load; fp32 on CUDA runs with
TF32 off unless asked; a timer records what every graph was granted."""

from __future__ import annotations

from pathlib import Path

import onnxruntime
import pytest

from rag_runtime import MissingDependencyError, RagPipeline, StageTimer
from rag_runtime import constants as C
from rag_runtime.sessions import (
    CUDA,
    create_session,
    cuda_library_problem,
    cuda_provider_options,
    providers_for,
    session_report,
)

needs_cpu_build = pytest.mark.skipif(CUDA in onnxruntime.get_available_providers(),
                                     reason="simulates onnxruntime's CPU build; this one has CUDA")


@pytest.fixture
def cuda_listed(monkeypatch):
    """onnxruntime's trap, on a CPU build: the CUDA provider is listed, and a session asked for it gets the CPU."""
    listed = [CUDA, *onnxruntime.get_available_providers()]
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: listed)


@needs_cpu_build
def test_a_cuda_session_that_runs_on_the_cpu_is_refused(bundles, cuda_listed):
    export = bundles[("token", "bart")].export
    with pytest.raises(MissingDependencyError) as info:
        create_session(export / "generator_decoder.onnx", "cuda")
    message = str(info.value)
    assert "\n" not in message
    assert f"did not grant {CUDA} for generator_decoder.onnx" in message
    assert "(it would run on CPUExecutionProvider)" in message
    assert "libonnxruntime_providers_cuda.so" in message and "rag-export[gpu]" in message
    with pytest.raises(MissingDependencyError, match="did not grant"):
        RagPipeline.load(export, device="cuda")


def _elf_needing(tmp_path: Path, missing: str) -> Path:
    """A copy of a real shared library of onnxruntime's whose first-loaded dependency is renamed to
    ``missing`` (same length, so the ELF stays valid): loading it fails exactly as a missing CUDA library
    makes the CUDA provider fail."""
    capi = Path(onnxruntime.__file__).parent / "capi"
    source = capi / "libonnxruntime_providers_shared.so"
    data = source.read_bytes()
    needed = b"libgcc_s.so.1"
    assert data.count(needed) == 1 and len(missing) == len(needed)
    target = tmp_path / "libonnxruntime_providers_cuda.so"
    target.write_bytes(data.replace(needed, missing.encode()))
    return target


def test_the_library_that_fails_to_load_is_named(tmp_path):
    library = _elf_needing(tmp_path, "libcublas.so9")
    problem = cuda_library_problem(library)
    assert problem.startswith("libcublas.so9 (needed by libonnxruntime_providers_cuda.so) cannot be loaded")
    assert "LD_LIBRARY_PATH" in problem and "\n" not in problem
    assert "no CUDA provider library" in cuda_library_problem(tmp_path / "absent.so")


def test_cuda_options_default_to_exact_fp32(cuda_listed):
    (name, options), cpu = providers_for("cuda")
    assert name == CUDA and cpu == "CPUExecutionProvider"
    assert options["use_tf32"] == "0"  # torch's default for fp32 matmuls: parity needs the same
    assert cuda_provider_options({"use_tf32": True})["use_tf32"] == "1"
    assert cuda_provider_options({"use_tf32": 1, "gpu_mem_limit": 2**30}) == {
        **cuda_provider_options(), "use_tf32": "1", "gpu_mem_limit": str(2**30)}
    for bad in ({"use_tf32": 0.5}, {"use_tf32": None}, {1: "0"}):
        with pytest.raises(ValueError, match="provider option"):
            cuda_provider_options(bad)


def test_provider_options_are_refused_for_the_cpu(bundles):
    with pytest.raises(ValueError, match="device='cpu' takes none"):
        RagPipeline.load(bundles[("token", "bart")].export, provider_options={"use_tf32": 1})
    with pytest.raises(ValueError, match="device must be one of cpu, cuda"):
        providers_for("tpu")


def test_the_timer_records_what_every_graph_was_granted(bundles):
    timer = StageTimer()
    pipe = RagPipeline.load(bundles[("token", "bart")].export, timer=timer)
    assert set(timer.session_reports) == set(pipe.manifest.graphs) - {C.CONTEXT_ENCODER}
    for report in timer.session_reports.values():
        assert report["providers"] == ["CPUExecutionProvider"]
        assert "placement" not in report  # recorded on CUDA only


def test_placement_counts_nodes_per_provider(bundles):
    export = bundles[("token", "bart")].export
    opts = onnxruntime.SessionOptions()
    opts.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    session = onnxruntime.InferenceSession(str(export / "generator_decoder.onnx"), opts,
                                           providers=["CPUExecutionProvider"])
    placement = session_report(session)["placement"]
    assert placement["memcpy_nodes"] == 0 and set(placement["nodes"]) == {"CPUExecutionProvider"}
    assert "MatMul" in placement["cpu_op_types"] and placement["nodes"]["CPUExecutionProvider"] > 10


@pytest.mark.cuda
def test_cuda_sessions_are_granted_with_tf32_off_unless_asked(work_dir):
    """Runs where onnxruntime-gpu is (the device run calls it); its export needs neither faiss nor datasets."""
    from benchmarks.device import prepare

    export = prepare("tiny", ["fp32"], work_dir)[1]["fp32"]
    for asked, expected in ((None, "0"), ({"use_tf32": 1}, "1")):
        timer = StageTimer()
        RagPipeline.load(export, device="cuda", timer=timer, provider_options=asked)
        for graph, report in timer.session_reports.items():
            assert report["providers"][0] == CUDA, graph
            assert report["provider_options"][CUDA]["use_tf32"] == expected, graph
            assert "placement" in report, graph

