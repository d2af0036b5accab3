"""Export a causal LM's extension for onnxruntime-genai: the builder's graph, rewritten, validated.

    result = export_genai("clinical-ext", "swap", "clinical-genai")
    onnxruntime_genai.Model("clinical-genai")   # opens it; embdeploy.runtime.generate wraps it

The base is built once per base (weights, config, precision, builder version) by
onnxruntime-genai's model builder (`python -m onnxruntime_genai.models.builder`,
KV cache, GroupQueryAttention, its own mask and position handling) and cached
beside the torch base exports (`<cache>/base/<fp>-genai-<dtype>/`). The extension
is then attached by the same content-based rewrite as every other export
(`embdeploy.onnx.rewrite`: the embedding Gather and the LM head MatMul). A tied
head is built with `shared_embeddings=false`, so the builder writes the table
twice (the Gather's (V, H) and the head's (H, V)): ONNX Runtime folds the
builder's shared Transpose into a second copy at session creation anyway, and the
rewrite then finds both tables by content.

What the graph takes (ids, mask, cache names, KV heads, head size) is read from
the builder's `genai_config.json` and checked against the graph (`GenaiInterface`),
so nothing here depends on the model family. Layout of an export:

    model.onnx, model.onnx.data   the rewritten graph
    extension.safetensors         swap: the exported (K, H) table(s); in the graph they are required inputs
    genai_config.json             the builder's, with vocab_size = V + K
    tokenizer files, config.json  the extended tokenizer; the base config with vocab_size = V + K
    embdeploy.json                format "genai", mode, fingerprints, digests, the validation report
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import EmbdeployError
from ..fsutil import atomic_output_dir, check_output_dir
from ..models import save_tokenizer
from .manifest import ExportManifest, dtype_name, publishable, short_dtype

GENAI_MODES = ("merged", "swap")
GENAI_CONFIG = "genai_config.json"
EXTENSION_TABLES = "extension.safetensors"  # swap: the exported (K, H) rows, fed as graph inputs
EXTENSION_TABLE = "extension_table"  # the input role of a swap table
# What the builder is asked for (in the cache key): fp32 on the CPU provider. fp16/int4 need validation
# tolerances of their own and are not offered yet.
_PRECISIONS = {"fp32": ("fp32", "cpu")}
_BUILDER_OPTIONS = {"shared_embeddings": "false"}  # see the module docstring (tied heads)
_PAST = "past_key_values"  # the role embdeploy.json gives every cache input (export.graph.PAST)


# --------------------------------------------------------------------------- the graph's interface


@dataclass(frozen=True)
class GenaiInterface:
    """What onnxruntime-genai feeds the decoder, read from genai_config.json and checked against the graph.

    `roles` maps every graph input a caller feeds to its role (input_ids, attention_mask,
    position_ids, past_key_values); `cache` maps each past input to its present output;
    the cache tensors are (batch, kv_heads, sequence, head_size).
    """

    roles: dict
    cache: dict
    logits: str
    kv_heads: int
    head_size: int
    layers: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None

    @classmethod
    def read(cls, directory, graph=None) -> "GenaiInterface":
        import onnx

        from ..onnx.rewrite import EXT_EMBED, EXT_HEAD

        d = Path(directory)
        path = d / GENAI_CONFIG
        if not path.is_file():
            raise EmbdeployError(f"{d} has no {GENAI_CONFIG}; it is not an onnxruntime-genai model directory "
                                 "(export with `embdeploy export --format genai`)")
        try:
            model = json.loads(path.read_text())["model"]
            dec = model["decoder"]
            names, outs = dec["inputs"], dec["outputs"]
            layers, kv_heads, head_size = int(dec["num_hidden_layers"]), int(dec["num_key_value_heads"]), int(dec["head_size"])
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
            raise EmbdeployError(f"{path} is not a genai config this embdeploy reads ({type(e).__name__}: {e}); "
                                 "rebuild the export") from None
        graph = graph if graph is not None else onnx.load(str(d / dec.get("filename", "model.onnx")), load_external_data=False)
        inits = {t.name for t in graph.graph.initializer}
        fed = [i.name for i in graph.graph.input if i.name not in inits]
        outputs = {o.name for o in graph.graph.output}
        roles, cache, problems = {}, {}, []
        for name in (EXT_EMBED, EXT_HEAD):
            if name in fed:
                roles[name] = EXTENSION_TABLE
        for key in ("input_ids", "attention_mask", "position_ids"):
            if key in names and names[key] in fed:
                roles[names[key]] = key
        for kind in ("key", "value"):
            past, present = names.get(f"past_{kind}_names"), outs.get(f"present_{kind}_names")
            if not past or not present:
                problems.append(f"no past_{kind}_names/present_{kind}_names in the decoder section")
                continue
            for layer in range(layers):
                p, q = past % layer, present % layer
                if p not in fed or q not in outputs:
                    problems.append(f"layer {layer}: the graph lacks cache input {p!r} or output {q!r}")
                roles[p], cache[p] = _PAST, q
        unknown = [n for n in fed if n not in roles]
        if unknown:
            problems.append(f"graph inputs {unknown} are not named in {GENAI_CONFIG}, so nothing would feed them")
        if "input_ids" not in roles.values():
            problems.append(f"{GENAI_CONFIG} names no input_ids input the graph takes")
        logits = outs.get("logits", "logits")
        if logits not in outputs:
            problems.append(f"the graph has no logits output {logits!r}")
        if problems:
            raise EmbdeployError(f"{path} and the graph disagree: " + "; ".join(problems))
        eos = model.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(roles, cache, logits, kv_heads, head_size, layers, int(model.get("vocab_size", 0)), eos,
                   model.get("pad_token_id"))


def import_genai():
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise EmbdeployError(
            "onnxruntime-genai is not installed; `pip install -e \".[cpu,genai]\"` (it needs onnxruntime >= 1.31 "
            "and the CPU onnxruntime, not onnxruntime-gpu)"
        ) from None
    return og


# --------------------------------------------------------------------------- the base, built once


def genai_base(ext, dtype: str = "fp32", cache_dir=None, progress=None):
    """The builder's base model for `ext`'s base (a BaseExport: path, cached), built once and cached."""
    from . import base as base_export

    say = progress or (lambda msg: None)
    og = import_genai()
    dtype = short_dtype(dtype)
    if dtype not in _PRECISIONS:
        raise EmbdeployError(f"--format genai builds {', '.join(_PRECISIONS)} bases for now; drop --dtype {dtype}")
    precision, provider = _PRECISIONS[dtype]
    with base_export.plain_model(ext) as plain:
        source = {
            "format": "genai", "model_class": type(plain).__name__,
            "weights": base_export._weights_digest(plain), "config": base_export._config_digest(plain.config),
            "dtype": dtype_name(dtype), "builder": f"onnxruntime-genai {og.__version__}",
            "precision": precision, "execution_provider": provider, "extra_options": dict(_BUILDER_OPTIONS),
        }
        entry = base_export.cache_root(cache_dir) / "base" / f"{ext.base_fingerprint.split(':')[-1][:16]}-genai-{dtype}"
        if base_export._cache_hit(entry, source):
            say(f"genai base found in the cache: {entry}")
            return base_export.BaseExport(entry, True)
        say(f"building the genai base with onnxruntime-genai's model builder ({precision}, {provider}; "
            "done once per base, then cached)")
        with tempfile.TemporaryDirectory(prefix="embdeploy-genai-") as tmp:
            hf, built = Path(tmp) / "hf", Path(tmp) / "built"
            plain.save_pretrained(str(hf))
            save_tokenizer(ext.base_tokenizer, hf)
            _run_builder(hf, built, Path(tmp) / "cache", precision, provider, type(plain).__name__)
            _write_base(entry, built, ext, source)
    return base_export.BaseExport(entry, False)


def _run_builder(hf: Path, out: Path, cache: Path, precision: str, provider: str, model_class: str) -> None:
    options = " ".join(f"{k}={v}" for k, v in _BUILDER_OPTIONS.items())
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out), "-p", precision,
           "-e", provider, "-c", str(cache), "--extra_options", options]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0 or not (out / "model.onnx").is_file():
        lines = [ln for ln in (p.stderr + p.stdout).splitlines() if ln.strip() and "it/s" not in ln]
        reason = next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln), lines[-1] if lines else "no output")
        reason = reason.replace(str(hf), model_class)  # the builder names the model by its (temporary) input dir
        raise EmbdeployError(
            f"onnxruntime-genai's model builder could not build this base ({reason.strip()[:400]}). It supports "
            "Llama, Mistral, Qwen2/3, Phi-3, Gemma and a few more families; export other decoders with "
            "--format onnx"
        )


def _write_base(entry: Path, built: Path, ext, source: dict) -> None:
    import shutil

    import onnx

    from .graph import graph_outputs

    graph = onnx.load(str(built / "model.onnx"), load_external_data=False)
    iface = GenaiInterface.read(built, graph)
    with atomic_output_dir(entry, overwrite=True, kind="export") as tmp:
        publishable(tmp)
        for name in ("model.onnx", "model.onnx.data", GENAI_CONFIG):  # the base tokenizer is the extension's business
            if (built / name).is_file():
                shutil.copy2(built / name, tmp / name)
        ExportManifest(
            mode="base", task="text-generation", V=ext.V, K=0, H=ext.H, dtype=source["dtype"],
            inputs=tuple(iface.roles), input_roles=iface.roles, outputs=tuple(graph_outputs(graph)), files={},
            kv_cache=iface.cache, base_fingerprint={"embed": ext.base_fingerprint, "head": ext.head_fingerprint},
            head=ext.head_mode, source=source, format="genai",
        ).with_files(tmp).write(tmp)


# --------------------------------------------------------------------------- export


def export_genai(ext, mode: str, out, dtype: str = "fp32", overwrite: bool = False, validate: bool = True,
                 cache_dir=None, progress=None, provider: str = "cpu", base_model=None):
    """Export `ext` (an Extension or an extension directory) for onnxruntime-genai to `out`, in `mode`.

    With `validate` (the default) the gate of `validate_genai` runs and a failure raises
    ValidationFailed with `out` not created. Returns an ExportResult.
    """
    from ..extend.model import Extension
    from ..onnx import rewrite as rw
    from ..onnx.io import load_model, save_model
    from .extension import ExportResult, loaded_extension

    say = progress or (lambda msg: None)
    t_start = time.perf_counter()
    problems = []
    if mode not in GENAI_MODES:
        problems.append(f"--format genai exports mode merged or swap, not {mode!r} (split would fold into merged "
                        "at session creation anyway)")
    if provider != "cpu":
        problems.append("--format genai validates on the CPU provider for now; pass --provider cpu")
    if problems:
        raise EmbdeployError("; ".join(problems))
    import_genai()
    out = Path(out)
    inputs = (None if isinstance(ext, Extension) else ext, cache_dir)
    check_output_dir(out, overwrite, "export", inputs)
    ext, extension_dir = loaded_extension(ext, base_model, say)
    if ext.head_mode == "none":
        raise EmbdeployError("--format genai is for causal LMs (a model with an LM head); this base has none, "
                             "export it with --format onnx")

    timings = {}
    t = time.perf_counter()
    made = genai_base(ext, dtype=dtype, cache_dir=cache_dir, progress=say)
    timings["base"] = time.perf_counter() - t

    say(f"rewriting the genai graph ({mode}, K={ext.K})")
    t = time.perf_counter()
    proto = load_model(made.path)
    head_table = head_ext = None
    if ext.head_mode == "untied":
        head_table = ext.base_head_table().detach().cpu().numpy()
        head_ext = ext.head_table().cpu().numpy()
    rewrite = {"merged": rw.rewrite_merged, "swap": rw.rewrite_swap}[mode]
    # in place: the loaded base is dropped right after, so no unchanged weight is copied
    new, _ = rewrite(proto, ext.base_table().detach().cpu().numpy(), ext.embed_table().cpu().numpy(), head_table, head_ext,
                     in_place=True)
    del proto
    timings["rewrite"] = time.perf_counter() - t

    tables = _tables_as_inputs(new) if mode == "swap" else {}
    report = None
    with atomic_output_dir(out, overwrite=overwrite, kind="export", inputs=(*inputs, ext.base_info.path)) as tmp:
        publishable(tmp)
        t = time.perf_counter()
        save_model(new, tmp)
        del new
        if tables:
            from safetensors.numpy import save_file

            save_file(tables, str(tmp / EXTENSION_TABLES))
        _write_genai_config(made.path / GENAI_CONFIG, tmp / GENAI_CONFIG, ext)
        save_tokenizer(ext.tokenizer, tmp)
        config = copy.deepcopy(ext.model.config)
        config.vocab_size = ext.V + ext.K
        config.save_pretrained(str(tmp))
        manifest = _manifest(ext, mode, dtype, tmp, made.path, extension_dir)
        manifest.write(tmp)
        timings["write"] = time.perf_counter() - t
        if validate:
            from .validate_genai import validate_genai

            say("validating against PyTorch: logits (prefill, decode step) and greedy generation through onnxruntime-genai")
            t = time.perf_counter()
            report = validate_genai(dataclasses.replace(manifest, directory=Path(tmp)), ext, shown_as=out)
            timings["validate"] = time.perf_counter() - t
            manifest = dataclasses.replace(manifest, validation=report.to_json())
            manifest.write(tmp)
    timings["total"] = time.perf_counter() - t_start
    return ExportResult(out, mode, dtype_name(dtype), made.path, made.cached, manifest, report, timings)


def _tables_as_inputs(model) -> dict:
    """Swap: the extension initializers removed from `model` (in place), returned as {name: (K, H) rows}.

    onnxruntime-genai feeds `Generator.set_model_input` only to inputs the session lists, and ONNX Runtime
    does not list an input that has an initializer (an overridable one, as rewrite_swap writes it): the
    table would be silently ignored. As plain graph inputs the tables are fed per generator, so each
    request can bring its own; the exported rows ship beside the graph.
    """
    from onnx import numpy_helper

    from ..onnx.rewrite import EXT_EMBED, EXT_HEAD

    tables = {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer if t.name in (EXT_EMBED, EXT_HEAD)}
    kept = [t for t in model.graph.initializer if t.name not in tables]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return tables


def read_tables(m) -> dict:
    """{input name: (K, H) float rows} of a genai swap export (its extension.safetensors); {} for merged."""
    if m.mode != "swap":
        return {}
    from safetensors.numpy import load_file

    path = m.path / EXTENSION_TABLES
    if not path.is_file():
        raise EmbdeployError(f"{m.path} is a genai swap export without {EXTENSION_TABLES}; re-export it")
    return load_file(str(path))


def _write_genai_config(src: Path, dst: Path, ext) -> None:
    """The builder's config with the extended vocabulary; token ids stay the base's (new ids are never special).

    genai refuses keys it does not know, so the swap tables' input names live in embdeploy.json
    (extension_initializers), not here.
    """
    cfg = json.loads(src.read_text())
    cfg["model"]["vocab_size"] = ext.V + ext.K
    dst.write_text(json.dumps(cfg, indent=4) + "\n")


def _manifest(ext, mode, dtype, tmp: Path, base_path: Path, extension_dir) -> ExportManifest:
    import onnx

    from ..onnx.rewrite import EXT_EMBED, EXT_HEAD
    from .graph import graph_outputs

    graph = onnx.load(str(tmp / "model.onnx"), load_external_data=False)
    iface = GenaiInterface.read(tmp, graph)
    return ExportManifest(
        mode=mode, task="text-generation", V=ext.V, K=ext.K, H=ext.H, dtype=dtype_name(dtype),
        inputs=tuple(iface.roles), input_roles=iface.roles, outputs=tuple(graph_outputs(graph)), files={},
        kv_cache=iface.cache,
        extension_initializers={
            "embed": EXT_EMBED if mode == "swap" else None,
            "head": EXT_HEAD if mode == "swap" and ext.head_mode == "untied" else None,
        },
        base_onnx=str(base_path),
        base_fingerprint={"embed": ext.base_fingerprint, "head": ext.head_fingerprint},
        extension_fingerprint=ext.extension_fingerprint(),
        extension_dir=str(extension_dir) if extension_dir else None,
        base_model=ext.base_info.to_json(), head=ext.head_mode, tokens=tuple(ext.token_ids),
        base_tokenizer=ext.base_tokenizer_record(), format="genai",
    ).with_files(tmp)
