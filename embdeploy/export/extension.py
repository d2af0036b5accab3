"""Export an extension: rewrite the cached base ONNX, write the directory, validate, then publish.

    result = export_extension("clinical-ext", "swap", "clinical-onnx")
    result.report.max_abs_diff   # ORT vs PyTorch, every output, every probe

The output directory appears only once the validation passed: everything is
written to `.NAME.partial-*` first and renamed at the end; a failed validation
(ValidationFailed) removes it. Layout:

    model.onnx            the graph
    model.onnx.data       base weights (and, in merged mode, the (V+K, H) table)
    extension.onnx.data   split/swap: the (K, H) extension table(s)
    tokenizer files       the extended tokenizer
    config.json           the base config with vocab_size = V + K
    modules.json, 1_Pooling/, sentence_bert_config.json   sentence-transformers bases: see st_layout
    embdeploy.json        mode, shapes, fingerprints, sha256 of every file, the validation report
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import EmbdeployError, FingerprintMismatch
from ..fsutil import atomic_output_dir, check_output_dir
from ..models import save_tokenizer
from .manifest import EXPORT_MODES, MANIFEST, ExportManifest, dtype_name, publishable, short_dtype
from .st_layout import write_st_layout

if TYPE_CHECKING:
    from .validate import ValidationReport

EXTENSION_DATA = "extension.onnx.data"


@dataclass
class ExportResult:
    out: Path
    mode: str
    dtype: str  # "float32" | "float16"
    base_onnx: Path  # the base export (directory or file) that was rewritten
    base_cached: bool  # True when the base came from the cache or --base-onnx (no torch export ran)
    manifest: ExportManifest
    report: ValidationReport | None  # None with validate=False
    timings: dict[str, float] = field(default_factory=dict)  # seconds: base, rewrite, write, validate, total


def export_extension(
    ext,
    mode: str,
    out,
    base_onnx=None,
    dtype: str = "fp32",
    overwrite: bool = False,
    validate: bool = True,
    cache_dir=None,
    progress=None,
    backend: str = "torch",
    provider: str = "cpu",
    quantize: str | None = None,
    calibration_texts=None,
    base_model=None,
    validate_texts=None,
) -> ExportResult:
    """Export `ext` (an Extension or an extension directory) to ONNX directory `out` in `mode`.

    The base comes from `base_onnx` (an ONNX file or directory, e.g. from
    `optimum-cli export onnx`) or else from `export_base` (cached). With
    `validate` (the default) ORT is checked against PyTorch on `provider` and a
    failure raises ValidationFailed with `out` not created; `validate_texts` (a text file or a list of
    str) adds the user's texts to the probes. `base_model` (a path or alias) is where the
    base is found when the extension moved away from the one it records (checked by fingerprint).
    """
    from ..extend.model import Extension
    from ..onnx import rewrite as rw
    from ..onnx.io import load_model, save_model
    from . import base as base_export
    from .graph import cache_outputs, input_roles, to_float16
    from .validate import PROVIDERS
    from .validate import read_probe_texts, validate_manifest

    say = progress or (lambda msg: None)
    t_start = time.perf_counter()
    problems = []
    if mode not in EXPORT_MODES:
        problems.append(f"unknown mode {mode!r}; choose one of {', '.join(EXPORT_MODES)}")
    try:
        dtype = short_dtype(dtype)
    except EmbdeployError as e:
        problems.append(str(e))
    if provider not in PROVIDERS:
        problems.append(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    if quantize is not None:
        from .quantize import QUANTIZE

        if quantize not in QUANTIZE:
            problems.append(f"unknown quantization {quantize!r}; choose one of {', '.join(QUANTIZE)}")
        if dtype == "fp16":
            problems.append("--quantize int8 starts from the float32 base; drop --dtype fp16")
        if provider != "cpu":
            problems.append("int8 exports run ONNX Runtime's dynamic quantization kernels on the CPU provider; "
                            "validate them with --provider cpu")
    if calibration_texts is not None:
        if quantize is None:
            problems.append("--calibration-texts applies to --quantize int8 only; add --quantize int8 or drop it")
        elif not Path(calibration_texts).is_file():
            problems.append(f"calibration texts {calibration_texts} is not a file; pass a text file (one text per line)")
    if validate_texts is not None and not validate:
        problems.append("--validate-texts adds probes to the validation; drop it or drop --no-validate")
    if problems:
        raise EmbdeployError("; ".join(problems))
    validate_texts = read_probe_texts(validate_texts)  # a missing or empty file is refused before the export runs
    out = Path(out)
    inputs = (None if isinstance(ext, Extension) else ext, base_onnx, cache_dir)
    check_output_dir(out, overwrite, "export", inputs)  # fail before minutes of export, not after

    ext, extension_dir = loaded_extension(ext, base_model, say)

    timings = {}
    t = time.perf_counter()
    if base_onnx is not None:
        base_path, base_manifest = _user_base(Path(base_onnx), ext)
        base_cached = True
    else:
        made = base_export.export_base(ext, dtype=dtype, backend=backend, cache_dir=cache_dir, progress=say,
                                       quantize=quantize, calibration_texts=calibration_texts)
        base_path, base_cached = made.path, made.cached
        base_manifest = ExportManifest.read(base_path)
    timings["base"] = time.perf_counter() - t

    say(f"rewriting the base graph ({mode}, K={ext.K})")
    t = time.perf_counter()
    proto = load_model(base_path)
    base_table = ext.base_table().detach().cpu().numpy()
    base_quantized = base_manifest is not None and base_manifest.quantization
    quantization = base_manifest.quantization if base_quantized else None
    if quantize and base_onnx is not None and not base_quantized:
        from .quantize import calibration_feeds, quantize_proto, scheme
        from .quantize import calibration_texts as read_calibration

        say(f"quantizing the given base ({quantize})")  # a user's file is quantized here, not cached
        texts, where = read_calibration(calibration_texts)
        feeds = calibration_feeds(proto, base_table, ext.base_tokenizer, texts)
        proto, kept = quantize_proto(proto, base_table, ext.base_head_table().detach().cpu().numpy()
                                     if ext.head_mode == "untied" else None, feeds)
        quantization = {**scheme(quantize, texts if feeds else None, where if feeds else None), "float_matmuls": kept}
    if not quantize and base_quantized:
        raise EmbdeployError(f"--base-onnx {base_onnx} is an int8 base; pass --quantize int8, or the float32 base")
    emb = rw.find_embedding(proto, base_table)
    if emb.dtype.name == "float16" and dtype == "fp32":
        raise EmbdeployError(
            f"the base ONNX {base_path} is float16; export with --dtype fp16, or pass a float32 base"
        )
    if emb.dtype.name == "float32" and dtype == "fp16":
        proto = to_float16(proto)  # a user's float32 base (ours come from the cache already cast)
    roles = (base_manifest.input_roles if base_manifest is not None else None) or input_roles(proto, emb.gathers)
    cache = cache_outputs(proto, roles)  # {past_key_values.*: present.*}; empty without a KV cache
    head_table = head_ext = None
    if ext.head_mode == "untied":
        head_table = ext.base_head_table().detach().cpu().numpy()
        head_ext = ext.head_table().cpu().numpy()
    rewrite = {"merged": rw.rewrite_merged, "split": rw.rewrite_split, "swap": rw.rewrite_swap}[mode]
    new, _ = rewrite(proto, base_table, ext.embed_table().cpu().numpy(), head_table, head_ext, in_place=True)
    del proto  # the same model as new: in place, no weight was copied
    timings["rewrite"] = time.perf_counter() - t

    names = {i.name for i in new.graph.initializer}
    separate = {n: EXTENSION_DATA for n in (rw.EXT_EMBED, rw.EXT_HEAD) if n in names} if mode != "merged" else {}
    report = None
    inputs = (*inputs, ext.base_info.path)
    with atomic_output_dir(out, overwrite=overwrite, kind="export", inputs=inputs) as tmp:
        publishable(tmp)
        t = time.perf_counter()
        save_model(new, tmp, separate=separate)
        del new
        save_tokenizer(ext.tokenizer, tmp)
        config = copy.deepcopy(ext.model.config)
        config.vocab_size = ext.V + ext.K
        config.save_pretrained(str(tmp))
        write_st_layout(tmp, ext.base_info.path, ext.base_info.pooling if _task(ext) == "feature-extraction" else None, say)
        manifest = _manifest(ext, mode, dtype, tmp, base_path, extension_dir, roles, cache)
        if quantize:
            manifest = dataclasses.replace(manifest, quantization=quantization)
        manifest.write(tmp)
        timings["write"] = time.perf_counter() - t
        if validate:
            say(f"validating against PyTorch on {provider}")
            t = time.perf_counter()
            report = validate_manifest(dataclasses.replace(manifest, directory=Path(tmp)), ext, provider, shown_as=out,
                                       texts=validate_texts)
            timings["validate"] = time.perf_counter() - t
            manifest = dataclasses.replace(manifest, validation=report.to_json())
            manifest.write(tmp)
    timings["total"] = time.perf_counter() - t_start
    return ExportResult(out, mode, dtype_name(dtype), base_path, base_cached, manifest, report, timings)


def loaded_extension(ext, base_model, say) -> tuple:
    """(the Extension, its directory or None): `ext` as given, or loaded from its directory; K=0 refused."""
    from ..extend.model import Extension, load_extension

    extension_dir = None
    if not isinstance(ext, Extension):
        extension_dir = Path(ext).resolve()
        say(f"loading the extension {extension_dir}")
        ext = load_extension(extension_dir, base_model=base_model)
    if ext.K == 0:
        raise EmbdeployError("the extension has no tokens (K=0); nothing to export")
    return ext, extension_dir


def _user_base(path: Path, ext) -> tuple[Path, ExportManifest | None]:
    """An ONNX file or directory given with --base-onnx; our own base exports are verified first."""
    path = path.expanduser().resolve()
    if not path.exists():
        raise EmbdeployError(f"--base-onnx {path} does not exist; pass an ONNX file or the directory holding model.onnx")
    manifest = None
    if path.is_dir():
        if (path / MANIFEST).is_file():
            manifest = ExportManifest.verify(path)
            if manifest.mode != "base":
                raise EmbdeployError(
                    f"--base-onnx {path} is a {manifest.mode!r} export (already extended); pass the base export"
                )
            fp = manifest.base_fingerprint.get("embed")
            if fp != ext.base_fingerprint:
                raise FingerprintMismatch(
                    f"--base-onnx {path} was exported from another base (embedding fingerprint {str(fp)[:23]}…, "
                    f"the extension's base has {ext.base_fingerprint[:23]}…); export the base this extension was made for"
                )
        elif not (path / "model.onnx").is_file():
            found = sorted(p.name for p in path.glob("*.onnx"))
            hint = f" (it holds {', '.join(found)}; pass that file)" if found else ""
            raise EmbdeployError(f"--base-onnx {path} has no model.onnx{hint}")
    return path, manifest


def _manifest(ext, mode, dtype, tmp: Path, base_path: Path, extension_dir, roles, cache) -> ExportManifest:
    import onnx

    from ..onnx import EXT_EMBED, EXT_HEAD
    from .graph import graph_inputs, graph_outputs

    graph = onnx.load(str(tmp / "model.onnx"), load_external_data=False)
    fed = graph_inputs(graph)
    info = ext.base_info
    task = _task(ext)
    return ExportManifest(
        mode=mode, task=task, V=ext.V, K=ext.K, H=ext.H, dtype=dtype_name(dtype), inputs=tuple(fed),
        input_roles={n: roles[n] for n in fed if n in roles}, outputs=tuple(graph_outputs(graph)), files={},
        kv_cache=cache,
        extension_initializers={
            "embed": EXT_EMBED if mode != "merged" else None,
            "head": EXT_HEAD if mode != "merged" and ext.head_mode == "untied" else None,
        },
        base_onnx=str(base_path),
        base_fingerprint={"embed": ext.base_fingerprint, "head": ext.head_fingerprint},
        extension_fingerprint=ext.extension_fingerprint(),
        extension_dir=str(extension_dir) if extension_dir else None,
        base_model=info.to_json(), head=ext.head_mode, tokens=tuple(ext.token_ids),
        base_tokenizer=ext.base_tokenizer_record(),
        pooling=info.pooling if task == "feature-extraction" else None,
    ).with_files(tmp)


def _task(ext) -> str:
    from .wrapper import infer_task

    return infer_task(ext.model, ext.base_info.task or None)
