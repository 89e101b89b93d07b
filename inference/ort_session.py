"""One place that creates onnxruntime sessions, so thread settings mean the same everywhere."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import ModelError

# onnxruntime type strings of tensor inputs/outputs -> numpy dtypes.
ORT_NUMPY_TYPES: dict[str, type] = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16,
    "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


def make_session(path: str | Path, threads: int | None = None, inter_op_threads: int | None = None):
    """An InferenceSession on the CPU provider.

    threads: intra-op threads (one operator split over cores); None lets onnxruntime use
    every core. inter_op_threads: operators run in parallel; only helps graphs with
    independent branches, so it defaults to 1 (sequential execution) to avoid
    oversubscribing the cores that the query engine also uses.
    """
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = int(threads)
    if inter_op_threads and int(inter_op_threads) > 1:
        options.execution_mode = ort.ExecutionMode.ORT_PARALLEL
        options.inter_op_num_threads = int(inter_op_threads)
    else:
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.inter_op_num_threads = 1
    # onnxruntime's workers spin for about 40 ms after each run, waiting for the next one. A
    # server runs a model per query (a search's query text): the spinning took a core from that
    # query's own work and from everyone else's. They still spin within a run, where handing
    # each operator to the other cores quickly matters, and sleep when it ends.
    options.add_session_config_entry("session.force_spinning_stop", "1")
    # Warnings about shape merging are noise for users; errors still surface as exceptions.
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own pybind exception types
        raise ModelError(f"onnxruntime cannot load {path}: {e}") from None


def numpy_type(ort_type: str, what: str) -> type:
    try:
        return ORT_NUMPY_TYPES[ort_type]
    except KeyError:
        raise ModelError(f"{what} has type {ort_type}, which is not supported") from None
