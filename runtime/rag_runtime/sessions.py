"""onnxruntime sessions: the execution providers a device gets, their options, and a check that onnxruntime
granted them.

``onnxruntime.get_available_providers()`` lists ``CUDAExecutionProvider`` whenever the installed build has
it, even when the provider's libraries (CUDA runtime, cuBLAS, cuDNN) cannot be loaded; a session asked for
CUDA then runs on the CPU with only a warning in onnxruntime's own log. Every CUDA session made here is
checked against the providers onnxruntime actually granted, and a refusal names the library that failed.

The CUDA provider runs fp32 MatMuls in TF32 unless told otherwise, while PyTorch does not: sessions here
get ``use_tf32=0`` by default, so fp32 on the GPU is as exact as the reference it is compared with.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

from .errors import ArtifactError, InvalidOptionError, MissingDependencyError, require

logger = logging.getLogger(__name__)

DEVICES = ("cpu", "cuda")
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
# Options every CUDA session gets unless the caller overrides them (onnxruntime's own names and spellings).
CUDA_DEFAULTS = {"device_id": "0", "use_tf32": "0"}
CUDA_PROVIDER_LIBRARY = "libonnxruntime_providers_cuda.so"
# Loaded by the CUDA provider only when it runs (dlopen), so a link check of the provider misses it.
CUDNN_LIBRARY = "libcudnn.so.9"
_PLACEMENT = "session.record_ep_graph_assignment_info"
_LIBRARY_FIX = ("put the CUDA 13 and cuDNN 9 libraries on LD_LIBRARY_PATH (the lib folders of the nvidia-* "
                "wheels under site-packages/nvidia/, e.g. torch's) or import torch before onnxruntime")


def _ort():
    return require("onnxruntime", "cpu", "rag_runtime (or the 'gpu' extra, for CUDA)")


def cuda_provider_options(options: Mapping[str, str | int | bool] | None = None) -> dict[str, str]:
    """The CUDA execution provider options a session gets: :data:`CUDA_DEFAULTS` with ``options`` over them
    (onnxruntime's option names; values as strings, booleans as ``"1"``/``"0"``).

    Raises:
        InvalidOptionError: A name that is not a string, or a value that is not a string, int or bool.
    """
    merged = dict(CUDA_DEFAULTS)
    for name, value in (options or {}).items():
        if not isinstance(name, str) or not isinstance(value, str | int | bool):
            raise InvalidOptionError(f"provider option {name!r}={value!r}: names are strings and values strings, "
                                     "ints or bools (onnxruntime's CUDA provider options, e.g. {'use_tf32': 1})")
        merged[name] = str(int(value)) if isinstance(value, bool) else str(value)
    return merged


def providers_for(device: str, provider_options: Mapping[str, str | int | bool] | None = None) -> list:
    """The ``providers`` argument of an onnxruntime session on ``device``: CUDA (with its options) before
    the CPU for ``"cuda"``, the CPU alone for ``"cpu"``.

    Raises:
        InvalidOptionError: Unknown device; ``"cuda"`` with an onnxruntime build that has no CUDA provider;
            provider options for the CPU (they are the CUDA provider's).
    """
    if device not in DEVICES:
        raise InvalidOptionError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cpu":
        if provider_options:
            raise InvalidOptionError(f"provider_options {dict(provider_options)} are CUDA execution provider "
                                     "options; device='cpu' takes none")
        return [CPU]
    available = _ort().get_available_providers()
    if CUDA not in available:
        raise InvalidOptionError(
            "device='cuda' needs onnxruntime-gpu, but this onnxruntime has only "
            f"{', '.join(available)}: pip uninstall onnxruntime && pip install 'rag-export[gpu]'"
        )
    return [(CUDA, cuda_provider_options(provider_options)), CPU]


def create_session(path: Path, device: str, threads: int | None = None, spinning: bool = True,
                   provider_options: Mapping[str, str | int | bool] | None = None, profile: str | None = None):
    """An onnxruntime session on ``device``. ``spinning=False`` for sessions that run between the calls
    of another: their idle pool threads would otherwise spin on the cores the next call needs.
    ``provider_options`` go to the CUDA provider over :data:`CUDA_DEFAULTS`. ``profile``: a file prefix
    for onnxruntime's per-node profile of every call (off by default).

    Raises:
        ArtifactError: onnxruntime cannot load the graph.
        InvalidOptionError: See :func:`providers_for`.
        MissingDependencyError: CUDA was asked for and onnxruntime did not grant it (names the library).
    """
    ort = _ort()
    providers = providers_for(device, provider_options)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or os.cpu_count() or 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile is not None:
        opts.enable_profiling, opts.profile_file_prefix = True, profile
    if device == "cuda":  # which node runs where: nodes left on the CPU cost a copy each way per call
        opts.add_session_config_entry(_PLACEMENT, "1")
    try:
        session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types for unreadable models
        raise ArtifactError(f"onnxruntime cannot load {path}: {str(e).splitlines()[0]}") from e
    if device == "cuda":
        require_granted(session, Path(path).name)
        report = session_report(session)
        logger.info("%s on %s: %s", Path(path).name, ", ".join(report["providers"]), report.get("placement"))
    return session


def require_granted(session, graph: str) -> None:
    """Raise unless onnxruntime granted ``session`` the CUDA provider it was asked for.

    Raises:
        MissingDependencyError: One line: the providers granted instead and why (see
            :func:`cuda_library_problem`).
    """
    granted = list(session.get_providers())
    if CUDA in granted:
        return
    raise MissingDependencyError(f"device='cuda': onnxruntime did not grant {CUDA} for {graph} (it would run on "
                                 f"{', '.join(granted) or 'nothing'}): {cuda_library_problem()}")


def cuda_library_problem(provider_library: Path | None = None) -> str:
    """Why onnxruntime's CUDA provider cannot run here, in one line, naming the library that fails to load:
    the provider library itself (``provider_library``, default the installed onnxruntime's) and the cuDNN it
    loads at run time. Loads them into this process, as onnxruntime would."""
    if provider_library is None:
        provider_library = Path(_ort().__file__).parent / "capi" / CUDA_PROVIDER_LIBRARY
    if not Path(provider_library).exists():
        return (f"this onnxruntime has no CUDA provider library ({provider_library}): "
                "pip uninstall onnxruntime && pip install 'rag-export[gpu]'")
    for library, needed_by in ((str(provider_library), None), (CUDNN_LIBRARY, "onnxruntime's CUDA provider")):
        try:
            ctypes.CDLL(library)
        except OSError as e:
            reason = str(e).splitlines()[0]
            missing = re.match(r"(\S+): cannot open shared object file", reason)
            if missing:
                return (f"{missing.group(1)} (needed by {needed_by or Path(library).name}) cannot be loaded: "
                        f"{_LIBRARY_FIX}")
            return f"{Path(library).name} cannot be loaded: {reason}"
    return ("the CUDA provider's libraries load, yet onnxruntime refused CUDA: no GPU visible or a driver too old "
            "for CUDA 13 (check nvidia-smi and CUDA_VISIBLE_DEVICES)")


def session_report(session) -> dict:
    """What onnxruntime made of a session: the providers granted, their options, and (for sessions made
    with placement recording, i.e. on CUDA) how many nodes each provider runs, how many copy nodes
    (``Memcpy*``) sit between them and which op types were left on the CPU."""
    providers = list(session.get_providers())
    options = session.get_provider_options()
    report: dict = {"providers": providers, "provider_options": {p: dict(options.get(p, {})) for p in providers}}
    try:
        subgraphs = session.get_provider_graph_assignment_info()
    except Exception:  # onnxruntime's own error type when placement was not recorded; older builds lack it
        return report
    if not subgraphs:
        return report
    nodes: Counter = Counter()
    memcpy = 0
    cpu_ops: set[str] = set()
    for subgraph in subgraphs:
        for node in subgraph.get_nodes():
            nodes[subgraph.ep_name] += 1
            memcpy += node.op_type.startswith("Memcpy")
            if subgraph.ep_name == CPU:
                cpu_ops.add(node.op_type)
    report["placement"] = {"nodes": dict(nodes), "memcpy_nodes": memcpy, "cpu_op_types": sorted(cpu_ops)}
    return report


__all__ = ["CUDA_DEFAULTS", "DEVICES", "create_session", "cuda_library_problem", "cuda_provider_options",
           "providers_for", "require_granted", "session_report"]
