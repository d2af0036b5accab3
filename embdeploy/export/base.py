"""Export the base model to ONNX once, and keep it in a cache.

    base_dir = export_base(ext)        # ~/.cache/embdeploy/base/<fp[:16]>-<task>-<dtype>[-optimum]/
    export_base(ext)                   # again: found in the cache, nothing exported

The exported module is the plain base (the extended model with its original
embedding and head modules put back for the duration, see `plain_model`),
wrapped so its outputs follow the task (see `wrapper`). Every extension of
that base is then a graph rewrite of this one file. A cache entry is reused only when its recorded source (weights digest,
config, task, pooling, dtype, backend) matches and every file still has its
recorded sha256; otherwise it is rebuilt.

Cache root: `cache_dir`, else `$EMBDEPLOY_CACHE`, else `~/.cache/embdeploy`;
base exports live in `<root>/base/`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..errors import EmbdeployError
from ..fingerprint import table_fingerprint
from ..fsutil import atomic_output_dir, check_output_dir
from .manifest import MANIFEST, ExportManifest, dtype_name, publishable, short_dtype

OPSET = 18
# How the torch backend's graph is made, beyond torch.onnx's own options (in the cache key, so a change
# rebuilds): attention exported as the model's eager code, intermediate value_info dropped. Both for speed
# in ONNX Runtime, see _torch_export.
TORCH_RECIPE = "eager-attention,no-value-info"
BACKENDS = ("torch", "optimum")
_DUMMY_SHAPE = (2, 16)  # (batch, sequence); validation probes other shapes on purpose
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures",
                         "_attn_implementation_autoset", "_commit_hash")


@dataclass(frozen=True)
class BaseExport:
    """Where the base export is, and whether it came from the cache (no export or quantization ran)."""

    path: Path
    cached: bool


def cache_root(cache_dir=None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("EMBDEPLOY_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "embdeploy"


# --------------------------------------------------------------------------- what is exported


class _Base:
    """The plain base model and what the cache key and manifest need to know about it."""

    def __init__(self, ext_or_model, plain, task: str | None, pooling: dict | None):
        from ..extend.model import Extension
        from .wrapper import check_pooling, infer_task, model_inputs

        self.model = plain  # from plain_model(ext_or_model)
        if isinstance(ext_or_model, Extension):
            ext = ext_or_model
            info = ext.base_info
            self.task = infer_task(self.model, task or info.task or None)
            self.pooling = pooling if pooling is not None else info.pooling
            self.source_path = info.path or None
            self.embed_fp, self.head_fp, self.head_mode = ext.base_fingerprint, ext.head_fingerprint, ext.head_mode
            self.V, self.H = ext.V, ext.H
        else:
            self.task = infer_task(self.model, task)
            self.pooling = pooling
            self.source_path = getattr(self.model.config, "_name_or_path", "") or None
            self.embed_fp, self.head_fp, self.head_mode, (self.V, self.H) = _tables(self.model)
        self.pooling = check_pooling(self.pooling) if self.task == "feature-extraction" else None
        self.inputs = model_inputs(self.model)

    def source(self, dtype: str, backend: str) -> dict:
        """Everything that decides the exported file; a cache entry is reused only if this matches."""
        return {
            "model_class": type(self.model).__name__,
            "weights": _weights_digest(self.model),
            "config": _config_digest(self.model.config),
            "task": self.task,
            "pooling": self.pooling,
            "inputs": self.inputs,
            "dtype": dtype_name(dtype),
            "backend": backend,
            "opset": OPSET,
            **({"recipe": TORCH_RECIPE} if backend == "torch" else {}),
        }


@contextlib.contextmanager
def plain_model(ext_or_model):
    """The base model: for an Extension, its model with the original embedding/head modules put back
    for the duration (restored on exit; no copy of the weights, which may be gigabytes)."""
    from ..extend.layer import ExtendedEmbedding, ExtendedLMHead
    from ..extend.model import Extension

    if not isinstance(ext_or_model, Extension):
        yield ext_or_model
        return
    model = ext_or_model.model
    slots = [
        (parent, attr, child)
        for parent in list(model.modules())
        for attr, child in list(parent.named_children())
        if isinstance(child, (ExtendedEmbedding, ExtendedLMHead))
    ]
    try:
        for parent, attr, child in slots:
            setattr(parent, attr, child.base)
        yield model
    finally:
        for parent, attr, child in slots:
            setattr(parent, attr, child)


def _tables(model):
    from torch import nn

    emb = model.get_input_embeddings()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        head = None
    mode = "none"
    if head is not None:
        mode = "tied" if head.weight.data_ptr() == emb.weight.data_ptr() else "untied"
    head_fp = table_fingerprint(head.weight) if mode == "untied" else None
    return table_fingerprint(emb.weight), head_fp, mode, tuple(emb.weight.shape)


def _weights_digest(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict(keep_vars=False).items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}:".encode())
        h.update(table_fingerprint(t).encode())
    return "sha256:" + h.hexdigest()


def _config_digest(config) -> str:
    d = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    return "sha256:" + hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


# --------------------------------------------------------------------------- export_base


def export_base(
    ext_or_model,
    task: str | None = None,
    pooling: dict | None = None,
    dtype: str = "fp32",
    backend: str = "torch",
    cache_dir=None,
    out=None,
    overwrite: bool = False,
    progress=None,
    quantize: str | None = None,
    calibration_texts=None,
) -> BaseExport:
    """Export the base model of `ext_or_model` (an Extension, or a plain transformers model) once.

    Returns the cache directory (model.onnx, model.onnx.data, embdeploy.json with
    mode "base", K=0) and whether it was found there. With `out`, the export is also copied to that directory
    (atomically; `overwrite` to replace it). `task` and `pooling` default to the
    extension's base info (a plain model: task from its class, no pooling).
    """
    say = progress or (lambda msg: None)
    if backend not in BACKENDS:
        raise EmbdeployError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    dtype = short_dtype(dtype)
    if out is not None:
        check_output_dir(Path(out), overwrite, "export")  # before the export, not after
    with plain_model(ext_or_model) as plain:
        training = plain.training
        plain.eval()
        try:
            base = _Base(ext_or_model, plain, task, pooling)
            by = "" if backend == "torch" else f"-{backend}"  # one entry per exporter: switching does not evict
            q = f"-{quantize}" if quantize else ""
            source = base.source(dtype, backend)
            texts = None
            if quantize:
                from .quantize import calibration_texts as read_calibration
                from .quantize import scheme

                if dtype != "fp32":
                    raise EmbdeployError("--quantize int8 starts from the float32 base; drop --dtype fp16")
                tokenizer = getattr(ext_or_model, "base_tokenizer", None)  # an Extension's; a plain model has none
                if tokenizer is not None:
                    texts, where = read_calibration(calibration_texts)
                source["quantize"] = scheme(quantize, texts, where if texts else None)
                if calibration_texts is not None:  # the user's texts: an entry of its own beside the default one
                    q += "-" + source["quantize"]["keep_float"]["calibration"]["sha256"].split(":")[1][:8]
            elif calibration_texts is not None:
                raise EmbdeployError("--calibration-texts applies to --quantize int8 only; add --quantize int8 or drop it")
            entry = cache_root(cache_dir) / "base" / f"{base.embed_fp.split(':')[-1][:16]}-{base.task}-{dtype}{by}{q}"
            cached = _cache_hit(entry, source)
            if cached:
                say(f"base export found in the cache: {entry}")
            else:
                quantization = source.get("quantize")
                if quantize:
                    from ..onnx.io import load_model
                    from .quantize import calibration_feeds, quantize_proto

                    fp32_dir = export_base(plain, base.task, base.pooling, "fp32", backend, cache_dir,
                                           progress=progress).path
                    say(f"quantizing the base export ({quantize}, onnxruntime dynamic, per-channel MatMul weights)")
                    head = plain.get_output_embeddings() if hasattr(plain, "get_output_embeddings") else None
                    table = base.model.get_input_embeddings().weight.detach().numpy()
                    fp32 = load_model(fp32_dir)
                    feeds = calibration_feeds(fp32, table, tokenizer, texts) if texts else None
                    proto, kept = quantize_proto(fp32, table, head.weight.detach().numpy() if head is not None else None,
                                                 feeds)
                    del fp32
                    if kept:
                        say("kept in float (largest input outlier ratio on the calibration texts): "
                            + ", ".join(f"{n} ({r})" for n, r in kept.items()))
                    quantization = {**quantization, "float_matmuls": kept}
                elif dtype == "fp16":
                    fp32_dir = export_base(plain, base.task, base.pooling, "fp32", backend, cache_dir,
                                           progress=progress).path
                    say("casting the base export to float16")
                    proto = _fp16_from(fp32_dir)
                else:
                    say(f"exporting the base model to ONNX ({backend}; done once per base, then cached)")
                    proto = _export_proto(base, backend)
                _write_base(entry, proto, base, source, quantization)
        finally:
            plain.train(training)
    if out is not None:
        with atomic_output_dir(out, overwrite=overwrite, kind="export") as tmp:
            publishable(tmp)
            for p in entry.iterdir():
                shutil.copy2(p, tmp / p.name)
    return BaseExport(Path(out) if out is not None else entry, cached)


def _cache_hit(entry: Path, source: dict) -> bool:
    if not (entry / MANIFEST).is_file():
        return False
    try:
        m = ExportManifest.verify(entry)
    except EmbdeployError:
        return False  # tampered or half-deleted: rebuilt
    return m.mode == "base" and m.source == source


def _fp16_from(fp32_dir: Path):
    from ..onnx.io import load_model
    from .graph import to_float16

    return to_float16(load_model(fp32_dir))


def _export_proto(base: _Base, backend: str):
    from ..onnx.io import load_model
    from .wrapper import OutputWrapper

    with tempfile.TemporaryDirectory(prefix="embdeploy-base-") as tmp:
        if backend == "optimum":
            return _rename_outputs(load_model(_optimum_export(base, Path(tmp))), _OPTIMUM_RENAMES)
        path = Path(tmp) / "model.onnx"
        wrapper = OutputWrapper(base.model, base.task, base.pooling, base.inputs).eval()
        with _eager_attention(base.model):
            _torch_export(wrapper, path)
        proto = load_model(path)
        # torch.onnx declares every intermediate shape. With them, ONNX Runtime (1.32, CPU) fuses each
        # residual Add + LayerNormalization into SkipLayerNormalization, whose CPU kernel is slower than the
        # two ops (MiniLM 1x128: 3.3 ms against 0.8 ms); optimum's exports declare none. ORT infers the shapes.
        del proto.graph.value_info[:]
        return proto


@contextlib.contextmanager
def _eager_attention(model):
    """The model's eager attention for the duration (restored on exit). torch.onnx decomposes SDPA into
    more nodes (NaN guards for fully masked rows, extra Transpose/Slice) than the eager code gives:
    MiniLM on ORT CPU is 3-5% faster exported eager. Models that cannot switch export as they are."""
    before = getattr(model.config, "_attn_implementation", None)
    switched = False
    if before not in (None, "eager") and hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation("eager")
            switched = True
        except Exception:  # transformers raises ValueError/ImportError for models without eager support
            pass
    try:
        yield
    finally:
        if switched:
            model.set_attn_implementation(before)


@contextlib.contextmanager
def _quiet_exporter():
    """Scoped: torch.onnx logs a warning per missing torchvision op, warns a lot, and torch.export
    prints whole graphs to stdout when it fails; our error message says what matters."""
    loggers = [logging.getLogger(name) for name in ("torch", "torch.onnx", "torch.fx.experimental.symbolic_shapes")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _torch_export(wrapper, path: Path) -> None:
    """torch.onnx (dynamo) export of `wrapper` to `path`, batch and sequence axes dynamic."""
    import torch

    table = wrapper.model.get_input_embeddings().weight
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, table.shape[0], _DUMMY_SHAPE, generator=g).to(table.device)
    dummies = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    args = tuple(dummies[n] for n in wrapper.input_names)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    try:
        with _quiet_exporter(), torch.no_grad():
            torch.onnx.export(
                wrapper, args, str(path), dynamo=True, opset_version=OPSET, external_data=True,
                input_names=wrapper.input_names, output_names=wrapper.output_names,
                dynamic_shapes={n: {0: batch, 1: seq} for n in wrapper.input_names}, verbose=False,
            )
    except Exception as e:  # torch.export / onnxscript raise many types for unsupported code
        root = e.__cause__ or e  # torch.onnx wraps the torch.export error in a long how-to text
        first = next((ln for ln in str(root).splitlines() if ln.strip()), type(root).__name__)
        raise EmbdeployError(
            f"torch.onnx could not export {type(wrapper.model).__name__} ({type(root).__name__}: {first[:300]}). "
            "Export the base yourself (e.g. `optimum-cli export onnx`) and pass it with --base-onnx PATH, "
            "or try --backend optimum"
        ) from e
    _refuse_fixed_axes(path, wrapper)
    _refuse_shape_failures(path, wrapper)


_OTHER_SHAPES = ((1, 1), (3, 7))  # (batch, sequence) unlike the dummy: batch 1 is where exporters specialize


def _refuse_shape_failures(path: Path, wrapper) -> None:
    """Run the export once per shape in _OTHER_SHAPES: a graph with symbolic axes can still fail
    in ONNX Runtime at other sizes (an axis of size 1 squeezed away at trace time). Without
    onnxruntime the check is left to validation."""
    try:
        import numpy as np
        import onnxruntime as ort
    except ImportError:
        return
    so = ort.SessionOptions()
    so.log_severity_level = 4  # the failure is reported below, once
    try:
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception:  # not this check's business: validation reports what ORT says about the file
        return
    for shape in _OTHER_SHAPES:
        feeds = {n: (np.ones if n == "attention_mask" else np.zeros)(shape, dtype=np.int64) for n in wrapper.input_names}
        try:
            sess.run(None, feeds)
        except Exception as e:  # ORT's own error types
            first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)[:300]
            raise EmbdeployError(
                f"torch.onnx's export of {type(wrapper.model).__name__} does not run in ONNX Runtime on inputs of "
                f"shape (batch, sequence) = {shape} ({first}); it only works for shapes like {_DUMMY_SHAPE}. Export "
                "the base yourself (e.g. `optimum-cli export onnx`) and pass it with --base-onnx PATH, or try "
                "--backend optimum"
            ) from None


def _refuse_fixed_axes(path: Path, wrapper) -> None:
    """torch.export may specialize an axis it was asked to keep dynamic (model code that depends on
    the length) and still succeed: the graph then takes only the dummy shape, which users would
    first see as a failed validation. Refuse it here, where the fix is known."""
    import onnx

    fixed = []
    for vi in onnx.load(str(path), load_external_data=False).graph.input:
        if vi.name not in wrapper.input_names:
            continue
        dims = vi.type.tensor_type.shape.dim
        for axis, label in enumerate(("batch", "sequence")):
            if axis < len(dims) and dims[axis].HasField("dim_value"):
                fixed.append(f"{vi.name} {label} = {dims[axis].dim_value}")
    if fixed:
        raise EmbdeployError(
            f"torch.onnx exported {type(wrapper.model).__name__} with fixed input sizes ({', '.join(fixed)}); "
            f"the graph would take only inputs of shape {_DUMMY_SHAPE}. Export the base yourself with dynamic "
            "batch and sequence axes (e.g. `optimum-cli export onnx`) and pass it with --base-onnx PATH, "
            "or try --backend optimum"
        )


# optimum's sentence-transformers export names the per-token output after sentence-transformers;
# embdeploy's exports (and optimum's ORTModelForFeatureExtraction) call it last_hidden_state.
_OPTIMUM_RENAMES = {"token_embeddings": "last_hidden_state"}


def _optimum_export(base: _Base, tmp: Path) -> Path:
    """optimum-onnx's `main_export` of the base model directory, without a KV cache.

    A base with sentence-transformers pooling is exported as optimum's sentence_transformers
    library (outputs token_embeddings, renamed last_hidden_state, and sentence_embedding), so
    the outputs are the ones the torch backend gives; validation checks the pooling.
    """
    try:
        from optimum.exporters.onnx import main_export
    except ImportError:
        raise EmbdeployError(
            "--backend optimum needs the optimum ONNX exporter, which is not installed. Install optimum-onnx "
            "in an environment with transformers<4.58 (its supported range), or use --backend torch, or export "
            "the base yourself and pass it with --base-onnx PATH"
        ) from None
    if not base.source_path or not Path(base.source_path).is_dir():
        raise EmbdeployError(
            "--backend optimum exports from a model directory, and this base has none on disk "
            f"({base.source_path!r}); save it with save_pretrained first, or use --backend torch"
        )
    library = "sentence_transformers" if base.pooling else "transformers"
    try:
        with _quiet_exporter():
            main_export(base.source_path, output=tmp, task=base.task, opset=OPSET, no_post_process=True,
                        library_name=library)
    except Exception as e:
        raise EmbdeployError(f"optimum could not export {base.source_path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    path = tmp / "model.onnx"
    if not path.is_file():
        raise EmbdeployError(f"optimum wrote no model.onnx in its output ({sorted(p.name for p in tmp.iterdir())})")
    return path


def _rename_outputs(proto, renames: dict[str, str]):
    """`proto` with graph outputs renamed ({old: new}; absent names ignored), wherever the name is used."""
    renames = {old: new for old, new in renames.items() if old in {o.name for o in proto.graph.output}}
    if not renames:
        return proto
    graph = proto.graph
    used = {n for node in graph.node for n in (*node.input, *node.output)} | {i.name for i in graph.input}
    taken = [new for new in renames.values() if new in used]
    if taken:
        raise EmbdeployError(f"cannot rename the exported outputs {list(renames)} to {taken}: the graph already uses those names")
    for node in graph.node:
        for names in (node.input, node.output):
            for i, name in enumerate(names):
                names[i] = renames.get(name, name)
    for vi in (*graph.output, *graph.value_info):
        vi.name = renames.get(vi.name, vi.name)
    return proto


def _write_base(entry: Path, proto, base: _Base, source: dict, quantization: dict | None = None) -> None:
    from ..onnx.io import save_model
    from ..onnx.match import find_embedding
    from .graph import cache_outputs, graph_outputs, input_roles

    roles = input_roles(proto, find_embedding(proto, base.model.get_input_embeddings().weight.detach().numpy()).gathers)
    cache = cache_outputs(proto, roles)
    with atomic_output_dir(entry, overwrite=True, kind="export") as tmp:
        publishable(tmp)
        save_model(proto, tmp)
        ExportManifest(
            mode="base", task=base.task, V=base.V, K=0, H=base.H, dtype=source["dtype"], inputs=tuple(roles),
            input_roles=roles, outputs=tuple(graph_outputs(proto)), files={}, kv_cache=cache,
            base_fingerprint={"embed": base.embed_fp, "head": base.head_fp}, head=base.head_mode,
            pooling=base.pooling, quantization=quantization, source=source,
        ).with_files(tmp).write(tmp)
