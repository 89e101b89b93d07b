"""Build an ONNX graph of a BERT encoder straight from its safetensors weights.

Why not export with torch: torch is a multi-gigabyte dependency that would be used once per
model, and it is not installable offline in every environment flightdeck targets. A BERT
encoder is a short, fixed list of standard ONNX ops, so writing it with `onnx.helper` keeps
the runtime to onnxruntime + tokenizers and the build to a few seconds.

The graph takes input_ids, attention_mask and token_type_ids (int64, [batch, sequence],
both dynamic) and returns last_hidden_state [batch, sequence, hidden]. Pooling and
normalisation are left to the caller (see embedder.py) so that models built here and
ONNX files exported elsewhere go through exactly the same code.

Builds are cached on disk, keyed by a hash of the weights and config plus BUILDER_VERSION,
and written atomically so concurrent processes never see a half-written file.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import ModelError
from .st_dir import SentenceTransformerDir

log = logging.getLogger(__name__)

# Bump whenever the graph this module emits changes: old cache entries are then ignored.
BUILDER_VERSION = 1
# 17 is the first opset with LayerNormalization as a standard op (one fused kernel in
# onnxruntime instead of seven elementwise ops).
OPSET = 17
QUANTIZATIONS = ("none", "int8")
# The FFN down-projection (1536 -> 384) reads GELU outputs whose per-tensor int8 range is
# too coarse: quantizing it alone cost the reference cases ~0.01 of cosine. Its MatMul keeps
# this name suffix and float32 weights in the int8 variant.
FP32_ONLY = "ffn_out"
# SmoothQuant's migration strength: 0.5 splits the outlier range evenly between the
# activation and the weights (measured best of 0.5 / 0.65 / 0.8 on held-out texts).
SMOOTH_ALPHA = 0.5


# --------------------------------------------------------------------------- progress

class _Progress:
    """A tqdm bar on a terminal, plain log lines otherwise (servers, CI logs)."""

    def __init__(self, total: int, desc: str):
        self._bar = None
        self._desc, self._total, self._done = desc, total, 0
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm
                self._bar = tqdm(total=total, desc=desc, unit="step", leave=False)
            except ImportError:  # tqdm is optional: progress is a nicety
                pass

    def step(self, what: str) -> None:
        self._done += 1
        if self._bar is not None:
            self._bar.set_postfix_str(what, refresh=False)
            self._bar.update(1)
        else:
            log.info("%s: %s (%d/%d)", self._desc, what, self._done, self._total)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# --------------------------------------------------------------------------- graph

class _GraphBuilder:
    """Collects nodes and initializers; names are generated so each layer stays readable."""

    def __init__(self) -> None:
        from onnx import helper, numpy_helper
        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes: list = []
        self.initializers: list = []
        self._n = 0

    def const(self, name: str, array: np.ndarray):
        self.initializers.append(self.numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str, **attrs) -> str:
        self._n += 1
        out = f"{name}"
        self.nodes.append(self.helper.make_node(op_type, inputs, [out], name=f"{op_type}_{self._n}_{name}", **attrs))
        return out

    def linear(self, x: str, weight: np.ndarray, bias: np.ndarray, name: str) -> str:
        # torch Linear stores [out, in]; MatMul wants [in, out]. Keeping MatMul + Add (not
        # Gemm) is what onnxruntime's dynamic quantizer and its fusions recognise for 3-D input.
        w = self.const(f"{name}.weight", weight.T.astype(np.float32))
        b = self.const(f"{name}.bias", bias.astype(np.float32))
        return self.op("Add", [self.op("MatMul", [x, w], f"{name}.matmul"), b], f"{name}.out")

    def layer_norm(self, x: str, weight: np.ndarray, bias: np.ndarray, eps: float, name: str) -> str:
        w = self.const(f"{name}.weight", weight.astype(np.float32))
        b = self.const(f"{name}.bias", bias.astype(np.float32))
        return self.op("LayerNormalization", [x, w, b], f"{name}.out", axis=-1, epsilon=eps)


def _weights(st: SentenceTransformerDir) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file
    try:
        tensors = load_file(str(st.weights))
    except Exception as e:  # safetensors raises its own error types
        raise ModelError(f"cannot read weights {st.weights}: {e}") from None
    # Checkpoints saved from BertModel have bare names; ones saved from a task model
    # (BertForMaskedLM, ...) prefix them with "bert.". Accept both.
    if not any(k.startswith("embeddings.") for k in tensors):
        tensors = {k[len("bert."):]: v for k, v in tensors.items() if k.startswith("bert.")}
    return tensors


def build_bert_graph(st: SentenceTransformerDir, progress: _Progress | None = None,
                     smooth: dict[str, np.ndarray] | None = None):
    """The encoder as an `onnx.ModelProto` (kept in memory; see `export_onnx` for the cache).

    smooth: per-channel absolute maxima of the matmul inputs, keyed by tensor name in the
    plain graph (see `_calibrate`). When given, the graph is rewritten for int8 (see
    `_smooth_scale`); in float32 it computes the same function either way.
    """
    from onnx import TensorProto, checker, helper

    cfg = st.config
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    layers, eps = int(cfg["num_hidden_layers"]), float(cfg.get("layer_norm_eps", 1e-12))
    if hidden % heads:
        raise ModelError(f"{st.path}: hidden_size {hidden} is not divisible by {heads} heads")
    if cfg.get("hidden_act", "gelu") != "gelu":
        raise ModelError(f"{st.path}: hidden_act {cfg.get('hidden_act')!r} is not supported (only gelu)")
    head_dim = hidden // heads
    w = _weights(st)

    def get(name: str) -> np.ndarray:
        try:
            return w[name]
        except KeyError:
            raise ModelError(f"{st.weights}: tensor {name!r} is missing; not a BERT checkpoint?") from None

    g = _GraphBuilder()
    if progress:
        progress.step("weights loaded")

    # Embeddings: word + position + token type, then LayerNorm.
    word = g.op("Gather", [g.const("word_embeddings", get("embeddings.word_embeddings.weight")),
                           "input_ids"], "emb.word")
    # Positions 0..seq-1 are a prefix of the position table, so slice it rather than
    # Gather(Range(...)): onnxruntime 1.32's extended optimizer rewrites Gather(Range) with a
    # scalar length into a Slice that then fails at run time ("Starts must be a 1-D array").
    seq_len = g.op("Shape", ["input_ids"], "emb.seq_len", start=1, end=2)
    pos = g.op("Slice", [g.const("position_embeddings", get("embeddings.position_embeddings.weight")),
                         g.const("const.zero_1d", np.array([0], np.int64)), seq_len,
                         g.const("const.axis0_1d", np.array([0], np.int64))], "emb.pos")
    typ = g.op("Gather", [g.const("token_type_embeddings", get("embeddings.token_type_embeddings.weight")),
                          "token_type_ids"], "emb.type")
    x = g.op("Add", [g.op("Add", [word, pos], "emb.word_pos"), typ], "emb.sum")
    x = g.layer_norm(x, get("embeddings.LayerNorm.weight"), get("embeddings.LayerNorm.bias"), eps, "emb.ln")

    # Additive attention bias [batch, 1, 1, seq]: 0 where attended, float32-min on padding,
    # the same constant transformers uses, so padded keys get exactly zero weight.
    mask = g.op("Cast", ["attention_mask"], "mask.float", to=TensorProto.FLOAT)
    mask = g.op("Unsqueeze", [mask, g.const("const.axes_1_2", np.array([1, 2], np.int64))], "mask.4d")
    inverted = g.op("Sub", [g.const("const.one_f32", np.array(1.0, np.float32)), mask], "mask.inverted")
    bias = g.op("Mul", [inverted, g.const("const.f32_min", np.array(np.finfo(np.float32).min, np.float32))],
                "mask.bias")

    split_heads = g.const("const.split_heads", np.array([0, 0, heads, head_dim], np.int64))
    merge_heads = g.const("const.merge_heads", np.array([0, 0, hidden], np.int64))
    sqrt2 = g.const("const.sqrt2", np.array(math.sqrt(2.0), np.float32))
    half = g.const("const.half", np.array(0.5, np.float32))
    # Folding 1/sqrt(head_dim) into the query projection saves a Mul per layer; for
    # head_dim 32 or 64 the factor is a power of two, so the result is bit-identical.
    scale = 1.0 / math.sqrt(head_dim)

    for i in range(layers):
        p = f"encoder.layer.{i}."
        n = f"l{i}"
        wq, bq = get(p + "attention.self.query.weight") * scale, get(p + "attention.self.query.bias") * scale
        wk, bk = get(p + "attention.self.key.weight"), get(p + "attention.self.key.bias")
        wv, bv = get(p + "attention.self.value.weight"), get(p + "attention.self.value.bias")
        wo, bo = get(p + "attention.output.dense.weight"), get(p + "attention.output.dense.bias")
        wi, bi = get(p + "intermediate.dense.weight"), get(p + "intermediate.dense.bias")
        if smooth is not None:
            # q, k and v read the same tensor: one scale, one Mul, shared.
            s = _smooth_scale(smooth[x], wq, wk, wv)
            x_in = g.op("Mul", [x, g.const(f"{n}.qkv.smooth", (1 / s).astype(np.float32))], f"{n}.qkv.smoothed")
            wq, wk, wv = wq * s, wk * s, wv * s
            # The attention output projection reads ctx = softmax(..) @ v, which is linear in
            # v's output channels: the scale folds into v's weights and costs no extra op.
            s_ctx = _smooth_scale(smooth[f"{n}.ctx.merged"], wo)
            wv, bv, wo = wv / s_ctx[:, None], bv / s_ctx, wo * s_ctx
        else:
            x_in = x
        q = g.linear(x_in, wq, bq, f"{n}.q")
        k = g.linear(x_in, wk, bk, f"{n}.k")
        v = g.linear(x_in, wv, bv, f"{n}.v")
        q = g.op("Transpose", [g.op("Reshape", [q, split_heads], f"{n}.q.heads")], f"{n}.q.t", perm=[0, 2, 1, 3])
        k = g.op("Transpose", [g.op("Reshape", [k, split_heads], f"{n}.k.heads")], f"{n}.k.t", perm=[0, 2, 3, 1])
        v = g.op("Transpose", [g.op("Reshape", [v, split_heads], f"{n}.v.heads")], f"{n}.v.t", perm=[0, 2, 1, 3])
        scores = g.op("Add", [g.op("MatMul", [q, k], f"{n}.scores"), bias], f"{n}.scores.masked")
        probs = g.op("Softmax", [scores], f"{n}.probs", axis=-1)
        ctx = g.op("Transpose", [g.op("MatMul", [probs, v], f"{n}.ctx")], f"{n}.ctx.t", perm=[0, 2, 1, 3])
        ctx = g.op("Reshape", [ctx, merge_heads], f"{n}.ctx.merged")
        attn = g.linear(ctx, wo, bo, f"{n}.attn_out")
        x = g.layer_norm(g.op("Add", [attn, x], f"{n}.attn_res"), get(p + "attention.output.LayerNorm.weight"),
                         get(p + "attention.output.LayerNorm.bias"), eps, f"{n}.attn_ln")
        x_in = x
        if smooth is not None:
            # The LayerNorm output also feeds the residual, so the scale cannot go into
            # its gamma/beta: an explicit Mul on the matmul branch only.
            s = _smooth_scale(smooth[x], wi)
            x_in = g.op("Mul", [x, g.const(f"{n}.ffn_in.smooth", (1 / s).astype(np.float32))], f"{n}.ffn_in.smoothed")
            wi = wi * s
        h = g.linear(x_in, wi, bi, f"{n}.ffn_in")
        # Exact (erf) GELU as BERT defines it; onnxruntime fuses this pattern into one kernel.
        erf = g.op("Erf", [g.op("Div", [h, sqrt2], f"{n}.gelu.div")], f"{n}.gelu.erf")
        gelu = g.op("Mul", [g.op("Mul", [h, g.op("Add", [erf, "const.one_f32"], f"{n}.gelu.add")],
                                 f"{n}.gelu.mul"), half], f"{n}.gelu")
        h = g.linear(gelu, get(p + "output.dense.weight"), get(p + "output.dense.bias"), f"{n}.{FP32_ONLY}")
        x = g.layer_norm(g.op("Add", [h, x], f"{n}.ffn_res"), get(p + "output.LayerNorm.weight"),
                         get(p + "output.LayerNorm.bias"), eps, f"{n}.ffn_ln")
        if progress:
            progress.step(f"layer {i + 1}/{layers}")

    g.nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"], name="output"))
    dims = ["batch", "sequence"]
    inputs = [helper.make_tensor_value_info(name, TensorProto.INT64, dims)
              for name in ("input_ids", "attention_mask", "token_type_ids")]
    outputs = [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, [*dims, hidden])]
    graph = helper.make_graph(g.nodes, f"{st.label}-encoder", inputs, outputs, g.initializers)
    opset = helper.make_opsetid("", OPSET)
    model = helper.make_model(graph, opset_imports=[opset], producer_name="flightdeck.inference.bert_onnx",
                              producer_version=str(BUILDER_VERSION))
    # The lowest IR version for this opset, so older onnxruntime builds load the file too.
    model.ir_version = helper.find_min_ir_version_for([opset])
    # Recorded for people inspecting a cached file; the embedder reads the model dir itself.
    helper.set_model_props(model, {"source": st.label, "pooling": st.pooling,
                                   "normalize": str(st.normalize).lower(),
                                   "max_seq_length": str(st.max_seq_length)})
    checker.check_model(model)
    return model


# --------------------------------------------------------------------------- cache

_hash_memo: dict[tuple[str, int, int], str] = {}


def weights_key(st: SentenceTransformerDir) -> str:
    """sha256 over the weights, config.json and BUILDER_VERSION (hex, 16 chars).

    The 90 MB hash takes ~0.2 s, so it is memoised per (path, size, mtime) in-process.
    """
    stat = st.weights.stat()
    memo_key = (str(st.weights.resolve()), stat.st_size, stat.st_mtime_ns)
    digest = _hash_memo.get(memo_key)
    if digest is None:
        with open(st.weights, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        _hash_memo[memo_key] = digest
    h = hashlib.sha256()
    h.update(digest.encode())
    h.update(json.dumps(st.config, sort_keys=True).encode())
    h.update(f"builder={BUILDER_VERSION};opset={OPSET}".encode())
    return h.hexdigest()[:16]


@contextmanager
def _atomic_target(path: Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it into place only if the block succeeds."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.onnx", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o644)  # mkstemp makes it owner-only; a server may run as another user
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def cache_folder(st: SentenceTransformerDir, cache_dir: str | Path) -> Path:
    return Path(cache_dir) / f"{st.label}-{weights_key(st)}"


def export_onnx(st: SentenceTransformerDir, cache_dir: str | Path, quantization: str = "none") -> Path:
    """Path of the cached ONNX encoder for `st`, building it (and its int8 variant) if needed."""
    if quantization not in QUANTIZATIONS:
        raise ModelError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, not {quantization!r}")
    folder = cache_folder(st, cache_dir)
    fp32 = folder / "model.onnx"
    target = fp32 if quantization == "none" else folder / f"model.{quantization}.onnx"
    if target.is_file():
        return target
    # Two registry entries on the same weights may be first used at once: build once per
    # process. (Across processes the atomic rename keeps it safe, just not deduplicated.)
    with _lock_for(folder):
        if target.is_file():
            return target
        return _build(st, folder, fp32, target, quantization)


_locks_guard = threading.Lock()
_build_locks: dict[Path, threading.Lock] = {}


def _lock_for(folder: Path) -> threading.Lock:
    with _locks_guard:
        return _build_locks.setdefault(folder.resolve(), threading.Lock())


def _build(st: SentenceTransformerDir, folder: Path, fp32: Path, target: Path, quantization: str) -> Path:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelError(f"cannot create model cache directory {folder}: {e}") from None

    started = time.perf_counter()
    build_fp32 = not fp32.is_file()
    steps = (int(st.config["num_hidden_layers"]) + 2 if build_fp32 else 0) + (2 if quantization == "int8" else 0)
    progress = _Progress(steps, f"building ONNX encoder for {st.label}")
    try:
        if build_fp32:
            import onnx

            model = build_bert_graph(st, progress)
            with _atomic_target(fp32) as tmp:
                onnx.save_model(model, str(tmp))
            del model
            progress.step("saved float32 graph")
        if quantization == "int8":
            absmax = _calibrate(st, fp32)
            progress.step("calibrated int8 scales")
            _quantize_int8(st, absmax, target)
            progress.step("quantized to int8")
    finally:
        progress.close()
    log.info("built %s in %.1f s", target, time.perf_counter() - started)
    (folder / "source.json").write_text(json.dumps(
        {"source": str(st.path), "builder_version": BUILDER_VERSION, "opset": OPSET}, indent=2))
    return target


# Calibration input for the int8 variant: varied lengths, languages, code and symbols, so
# the per-channel activation maxima cover what embedding columns typically hold. Fixed
# text keeps builds reproducible (no data is downloaded or sampled).
CALIBRATION_TEXTS = (
    "", "ok", "The quick brown fox jumps over the lazy dog.", "Wie spät ist es?", "服务器内存不足",
    "SELECT * FROM t WHERE id = 1", "error: connection refused (os error 111)",
    "Quarterly revenue grew 12% year over year.", "She plays the violin in an orchestra.",
    "Restart the pod and check the readiness probe.", "\U0001f642 thanks!", "How do I reset my password?",
    "The patient was given 5 mg of the drug twice daily.",
    "Rain is expected tomorrow afternoon across the northern region.", "def f(x): return x * 2",
    "A long sentence " * 40,
)


def _smooth_scale(act_absmax: np.ndarray, *weights: np.ndarray) -> np.ndarray:
    """SmoothQuant per-input-channel scale s: x/s and W*s compute the same product.

    onnxruntime's dynamic quantization uses one int8 scale for a whole activation tensor,
    and BERT's hidden states have a few channels ~20x larger than the rest, which leaves
    the others with a handful of levels. Dividing those channels down (and multiplying the
    matching weight rows up, where int8 weights are per output channel) evens this out.
    weights are in torch layout [out, in].
    """
    w_absmax = np.max([np.abs(w).max(axis=0) for w in weights], axis=0)
    s = np.maximum(act_absmax, 1e-5) ** SMOOTH_ALPHA / np.maximum(w_absmax, 1e-5) ** (1 - SMOOTH_ALPHA)
    return np.clip(s, 1e-2, 1e2).astype(np.float32)


def _calibrate(st: SentenceTransformerDir, fp32: Path) -> dict[str, np.ndarray]:
    """Per-channel |max| of every tensor that feeds a weight MatMul, over CALIBRATION_TEXTS."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper
    from tokenizers import Tokenizer

    model = onnx.load(str(fp32))
    weights = {t.name for t in model.graph.initializer}
    names = list(dict.fromkeys(n.input[0] for n in model.graph.node
                               if n.op_type == "MatMul" and n.input[1] in weights))
    model.graph.output.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in names)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    del model
    tokenizer = Tokenizer.from_file(str(st.tokenizer))
    tokenizer.enable_truncation(max_length=st.max_seq_length)
    tokenizer.no_padding()
    absmax: dict[str, np.ndarray] = {}
    # One text per run: no padding rows, so the maxima are those of real tokens.
    for encoding in tokenizer.encode_batch(list(CALIBRATION_TEXTS)):
        ids = np.array([encoding.ids], np.int64)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
        for name, value in zip(names, session.run(names, feed)):
            current = np.abs(value).reshape(-1, value.shape[-1]).max(axis=0)
            absmax[name] = np.maximum(absmax[name], current) if name in absmax else current
    return absmax


def _quantize_int8(st: SentenceTransformerDir, absmax: dict[str, np.ndarray], target: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    smoothed = build_bert_graph(st, smooth=absmax)
    keep_fp32 = [n.name for n in smoothed.graph.node if n.op_type == "MatMul" and FP32_ONLY in n.name]
    with _atomic_target(target) as tmp:
        # Dynamic quantization: int8 weights (per output channel), activations quantized per
        # batch at run time, so no calibration data is needed beyond the smoothing scales.
        # Only weight MatMuls are quantized; the embedding tables stay float.
        # reduce_range (7-bit weights): on x86 CPUs without VNNI (AVX2 only, e.g. some EPYC
        # machines this runs on), u8*s8 products saturate in int16 and the reference cases lost
        # ~0.01 of cosine; with it they keep >= 0.99 there, and the file is the same everywhere.
        with _quiet_quantizer_logs():
            quantize_dynamic(smoothed, tmp, op_types_to_quantize=["MatMul"], nodes_to_exclude=keep_fp32,
                             weight_type=QuantType.QInt8, per_channel=True, reduce_range=True)


@contextmanager
def _quiet_quantizer_logs() -> Iterator[None]:
    """The quantizer logs per-tensor chatter and advice on the root logger (the advised
    pre-processing is shape inference, which our graph does not need): keep it out of the
    server log. Its errors still pass, and so does everything else logged meanwhile."""
    root = logging.getLogger()

    def keep(record: logging.LogRecord) -> bool:
        from_quantizer = f"onnxruntime{os.sep}quantization" in record.pathname
        return not from_quantizer or record.levelno >= logging.ERROR

    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)
