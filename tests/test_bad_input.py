"""Bad input, tampering and interruption: every case ends in a clear message, a non-zero exit and nothing half-written.

The table of cases, with the messages users see, is docs/bad-input.md; each row names
its test here (or in tests/test_cli.py, which holds the extend/merge/inspect cases).

CLI cases run `python -m embdeploy.cli` in a subprocess in a directory of their own and
check: the exit code, no "Traceback" on stderr, the message names the problem and the
fix, and the directory listing (names and sizes) is the same before and after. They
are started together by one module fixture (two at a time: most of their time is
importing torch), and each case is then its own test. API cases (runtime, low level)
check the exception type and message.

The models are a tiny random GPT-2 (vocabulary 300, hidden 32) saved with
save_pretrained, and a second one with other weights (another base).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from embdeploy.errors import EmbdeployError, FingerprintMismatch
from embdeploy.fsutil import PARTIAL_MARK

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")

TOKENS = ["hyperkalemia", "troponin", "zorblax", "qwertyx"]
DOC = Path(__file__).resolve().parent.parent / "docs" / "bad-input.md"


# --------------------------------------------------------------------------- the world: bases, extensions, exports


@dataclass
class World:
    root: Path
    cache: Path
    base_a: Path
    base_b: Path
    ext_a: Path
    ext_b: Path
    swap: Path  # swap export of ext_a
    merged: Path  # merged export of ext_a
    base_a_onnx: Path  # the cached base export of base_a (a directory with embdeploy.json)
    base_b_onnx: Path  # the same for base_b
    tokens: Path
    V: int = 0
    K: int = 0

    def env(self) -> dict:
        return {**os.environ, "EMBDEPLOY_CACHE": str(self.cache), "HF_HUB_OFFLINE": "1", "COLUMNS": "400",
                "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    from embdeploy.coverage import FAMILIES, build
    from embdeploy.export import export_base, export_extension
    from embdeploy.extend.api import extend_cli
    from embdeploy.extend.model import load_extension

    root = tmp_path_factory.mktemp("bad-input")
    cache = root / "cache"
    tokens = root / "tokens.txt"
    tokens.write_text("\n".join(TOKENS) + "\n")
    paths = {}
    for name, seed in (("a", 0), ("b", 1)):
        model, tok = build(FAMILIES["gpt2"], seed=seed)
        model.save_pretrained(root / f"base-{name}")
        tok.save_pretrained(root / f"base-{name}")
        extend_cli(str(root / f"base-{name}"), tokens, root / f"ext-{name}", init="mean-noise")  # what `extend` runs
        paths[name] = export_base(load_extension(root / f"ext-{name}"), cache_dir=cache).path
    ext_a = load_extension(root / "ext-a")
    for mode in ("swap", "merged"):
        export_extension(root / "ext-a", mode, root / f"export-{mode}", cache_dir=cache)
    return World(root, cache, root / "base-a", root / "base-b", root / "ext-a", root / "ext-b", root / "export-swap",
                 root / "export-merged", paths["a"], paths["b"], tokens, ext_a.V, ext_a.K)


# --------------------------------------------------------------------------- helpers


def listing(d: Path) -> dict[str, int]:
    """Every path under d with its size (-1 for directories)."""
    return {p.relative_to(d).as_posix(): (-1 if p.is_dir() else p.lstat().st_size) for p in sorted(d.rglob("*"))}


def run_cli(args, env, timeout=300) -> tuple[int, str, str]:
    p = subprocess.run([sys.executable, "-m", "embdeploy.cli", *map(str, args)], capture_output=True, text=True,
                       env=env, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def flat(text: str) -> str:
    return " ".join(text.split())


def copy(src: Path, d: Path, name: str | None = None) -> Path:
    dst = d / (name or src.name)
    shutil.copytree(src, dst, symlinks=True)
    return dst


def edit_json(path: Path, **changes) -> None:
    m = json.loads(path.read_text())
    m.update(changes)
    path.write_text(json.dumps(m, indent=2))


def flip_byte(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


class _Trap:
    """Unpickling this creates the file `marker`: proof that something unpickled the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def pickle_trap(path: Path) -> Path:
    marker = path.parent / "UNPICKLED"
    path.write_bytes(pickle.dumps(_Trap(marker)))
    return marker


# --------------------------------------------------------------------------- CLI cases: setups


def ext_other_base(w: World, d: Path):
    ext = copy(w.ext_a, d, "ext")
    m = json.loads((ext / "extension.json").read_text())
    m["base_model"].update(path=str(w.base_b), ref=str(w.base_b))
    (ext / "extension.json").write_text(json.dumps(m))
    return ["export", ext, "--out", d / "out"]


def ext_base_gone(w: World, d: Path):
    ext = copy(w.ext_a, d, "ext")
    m = json.loads((ext / "extension.json").read_text())
    m["base_model"].update(path=str(d / "moved-away"), ref=str(d / "moved-away"), portable_ref=str(d / "moved-away"))
    (ext / "extension.json").write_text(json.dumps(m))
    return ["export", ext, "--out", d / "out"]


def ext_truncated(w: World, d: Path):
    ext = copy(w.ext_a, d, "ext")
    st = ext / "extension.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    return ["export", ext, "--out", d / "out"]


def ext_edited(w: World, d: Path):
    ext = copy(w.ext_a, d, "ext")
    flip_byte(ext / "extension.safetensors", -2)  # a bit of the last float: still a valid file
    return ["export", ext, "--out", d / "out"]


def ext_nan(w: World, d: Path):
    from safetensors.numpy import load_file, save_file

    ext = copy(w.ext_a, d, "ext")
    st = ext / "extension.safetensors"
    tensors = load_file(str(st))
    tensors["embed.default"][1, 3] = np.nan
    save_file(tensors, str(st), metadata={"format": "embdeploy-extension"})
    return ["export", ext, "--out", d / "out"]


def ext_manifest(**changes):
    def setup(w: World, d: Path):
        ext = copy(w.ext_a, d, "ext")
        edit_json(ext / "extension.json", **changes)
        return ["export", ext, "--out", d / "out"]

    return setup


def base_onnx(target: Callable[[World, Path], Path]):
    def setup(w: World, d: Path):
        return ["export", w.ext_a, "--out", d / "out", "--base-onnx", target(w, d)]

    return setup


def onnx_table_twice(w: World, d: Path) -> Path:
    """Base A's graph with a second initializer holding the same table, read by a second Gather."""
    import onnx
    from onnx import helper

    from embdeploy.onnx.io import load_model, save_model
    from embdeploy.onnx.rewrite import find_embedding

    model = load_model(w.base_a_onnx)
    from safetensors.numpy import load_file

    table = load_file(str(w.base_a / "model.safetensors"))["transformer.wte.weight"]
    emb = find_embedding(model, table)
    init = next(t for t in model.graph.initializer if t.name == emb.table)
    dup = onnx.TensorProto()
    dup.CopyFrom(init)
    dup.name = "copy_of_the_table"
    model.graph.initializer.append(dup)
    ids = model.graph.node[emb.gathers[0]].input[1]
    model.graph.node.append(helper.make_node("Gather", ["copy_of_the_table", ids], ["unused_rows"], name="second_lookup"))
    save_model(model, d / "twice")
    return d / "twice" / "model.onnx"


def onnx_external(kind: str):
    """Base A's export (without its manifest) whose external data is reached through `kind`."""

    def target(w: World, d: Path) -> Path:
        import onnx

        base = copy(w.base_a_onnx, d, "base")
        (base / "embdeploy.json").unlink()  # a user's ONNX file, not one of our verified exports
        outside = d / "outside"
        outside.mkdir()
        shutil.move(base / "model.onnx.data", outside / "model.onnx.data")
        location = {
            "dotdot": "../outside/model.onnx.data",
            "absolute": str(outside / "model.onnx.data"),
            "symlink": "model.onnx.data",
        }[kind]
        if kind == "symlink":
            (base / "model.onnx.data").symlink_to(outside / "model.onnx.data")
        model = onnx.load(str(base / "model.onnx"), load_external_data=False)
        for t in model.graph.initializer:
            for entry in t.external_data:
                if entry.key == "location":
                    entry.value = location
        (base / "model.onnx").write_bytes(model.SerializeToString())
        return base

    return target


def onnx_pickle(w: World, d: Path) -> Path:
    pickle_trap(d / "model.onnx")
    return d / "model.onnx"


def extend_vectors_pickle(w: World, d: Path):
    pickle_trap(d / "vectors.pt")
    return ["extend", w.base_a, "--tokens", w.tokens, "--out", d / "out", "--init", "vectors", "--init-source",
            d / "vectors.pt"]


def extend_pickle_weights(w: World, d: Path):
    model = d / "model"
    model.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(w.base_a / f, model / f)
    pickle_trap(model / "pytorch_model.bin")
    return ["extend", model, "--tokens", w.tokens, "--out", d / "out"]


def export_readonly(w: World, d: Path):
    (d / "a-file").write_text("x")  # we run as root: a path under a regular file cannot be created by anyone
    return ["export", w.ext_a, "--out", d / "a-file" / "out"]


def recipe(text: str):
    def setup(w: World, d: Path):
        (d / "recipe.json").write_text(text)
        return ["export", w.ext_a, "--out", d / "out", "--recipe", d / "recipe.json"]

    return setup


def export_copy(which: str, change: Callable[[Path], None] | None = None, name: str | None = None):
    """A copy of the swap/merged export, changed by `change`."""

    def setup(w: World, d: Path) -> Path:
        exp = copy(getattr(w, which), d, name)
        if change:
            change(exp)
        return exp

    return setup


def validate_of(make: Callable[[World, Path], Path], *extra):
    def setup(w: World, d: Path):
        return ["validate", make(w, d), *[x(w) if callable(x) else x for x in extra]]

    return setup


def train_texts(content: bytes):
    def setup(w: World, d: Path):
        ext = copy(w.ext_a, d, "ext")
        (d / "texts.txt").write_bytes(content)
        return ["train", ext, "--texts", d / "texts.txt", "--steps", "2"]

    return setup


def not_an_export(w: World, d: Path) -> Path:
    return copy(w.ext_a, d, "ext")



# --- outputs that must never destroy what embdeploy did not write (docs/bad-input.md, "Output paths")


def overwrite_source_ext(w: World, d: Path):
    ext = copy(w.ext_a, d, "ext")
    return ["export", ext, "--out", ext, "--overwrite"]


def overwrite_base_model(w: World, d: Path):
    base = copy(w.base_a, d, "base")
    return ["extend", base, "--tokens", w.tokens, "--out", base, "--overwrite"]


def overwrite_parent_of_input(w: World, d: Path):
    (d / "work").mkdir()
    ext = copy(w.ext_a, d / "work", "ext")
    return ["export", ext, "--out", d / "work", "--overwrite"]


def overwrite_unrelated(w: World, d: Path):
    (d / "mine").mkdir()
    (d / "mine" / "notes.txt").write_text("a user's own file\n")
    return ["export", w.ext_a, "--out", d / "mine", "--overwrite"]


def overwrite_other_kind(w: World, d: Path):
    ext = copy(w.ext_a, d, "ext")  # an extension, not an input of this command
    return ["export", w.ext_a, "--out", ext, "--overwrite"]


def merge_over_a_model(w: World, d: Path):
    base = copy(w.base_a, d, "model")  # a transformers model that `merge` did not write
    return ["merge", w.ext_a, "--out", base, "--overwrite"]


def train_out_is_input(w: World, d: Path):
    ext = copy(w.ext_a, d, "ext")
    (d / "texts.txt").write_text("the troponin rose\n")
    return ["train", ext, "--texts", d / "texts.txt", "--out", ext, "--overwrite", "--steps", "1"]


def out_symlink(w: World, d: Path):
    real = copy(w.merged, d, "real")
    (d / "link").symlink_to(real)
    return ["export", w.ext_a, "--out", d / "link", "--overwrite"]


def out_dangling_symlink(w: World, d: Path):
    (d / "dangling").symlink_to(d / "nowhere")
    return ["export", w.ext_a, "--out", d / "dangling"]


def tokens_fifo(w: World, d: Path):
    os.mkfifo(d / "tokens.fifo")
    return ["extend", w.base_a, "--tokens", d / "tokens.fifo", "--out", d / "out"]


def texts_char_device(w: World, d: Path):
    ext = copy(w.ext_a, d, "ext")
    return ["train", ext, "--texts", "/dev/zero", "--steps", "1"]


def quickstart_fresh_foreign(w: World, d: Path):
    (d / "work").mkdir()
    (d / "work" / "thesis.tex").write_text("years of work\n")
    return ["quickstart", "--workdir", d / "work", "--fresh"]


# --- code shipped inside an artifact or a model is never run (docs/bad-input.md, "Code execution")

EVIL = "from pathlib import Path\nPath(__file__).with_name('CODE_RAN').write_text('x')\n"


def ext_remote_code(w: World, d: Path):
    ext = copy(w.ext_a, d, "ext")
    edit_json(ext / "tokenizer_config.json", auto_map={"AutoTokenizer": ["evil_tok.EvilTok", None]})
    (ext / "evil_tok.py").write_text(EVIL + "class EvilTok: pass\n")
    return ["export", ext, "--out", d / "out"]


def base_remote_code(w: World, d: Path):
    base = copy(w.base_a, d, "base")
    edit_json(base / "config.json", auto_map={"AutoModelForCausalLM": "evil_model.Evil", "AutoConfig": "evil_model.Cfg"})
    (base / "evil_model.py").write_text(EVIL)
    return ["extend", base, "--tokens", w.tokens, "--out", d / "out"]


def no_code_ran(d: Path) -> None:
    assert not list(d.rglob("CODE_RAN")), "code shipped in an artifact was run"



def edit_manifest(fn):
    """A change for export_copy: fn(manifest dict) edits embdeploy.json in place (its digests untouched)."""

    def change(e: Path) -> None:
        m = json.loads((e / "embdeploy.json").read_text())
        fn(m)
        (e / "embdeploy.json").write_text(json.dumps(m, indent=2))

    return change


def unlist(name: str):
    return edit_manifest(lambda m: m["files"].pop(name))


def add_stray_file(e: Path) -> None:
    (e / "notes.bin").write_bytes(b"unverified bytes")


def ext_without_fingerprint(w: World, d: Path):
    ext = copy(w.ext_a, d, "ext")
    m = json.loads((ext / "extension.json").read_text())
    del m["extension_fingerprint"]
    (ext / "extension.json").write_text(json.dumps(m))
    return ["export", ext, "--out", d / "out"]



def ext_tokenizer_ids_swapped(w: World, d: Path):
    """Two base ids swapped in the extension's tokenizer.json: every digest and id check of the new tokens passes."""
    ext = copy(w.ext_a, d, "ext")
    doc = json.loads((ext / "tokenizer.json").read_text())
    vocab = doc["model"]["vocab"]
    a, b = list(vocab)[10], list(vocab)[11]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (ext / "tokenizer.json").write_text(json.dumps(doc))
    return ["export", ext, "--out", d / "out"]


def ext_tokenizer_extra_token(w: World, d: Path):
    ext = copy(w.ext_a, d, "ext")
    doc = json.loads((ext / "tokenizer.json").read_text())
    top = max(t["id"] for t in doc["added_tokens"])
    doc["added_tokens"].append({"id": top + 1, "content": "sneaky", "single_word": False, "lstrip": False,
                                "rstrip": False, "normalized": True, "special": False})
    (ext / "tokenizer.json").write_text(json.dumps(doc))
    return ["export", ext, "--out", d / "out"]


@dataclass
class CliCase:
    id: str
    setup: Callable[[World, Path], list]  # prepares the case directory; returns the command's arguments
    says: tuple[str, ...]  # the message must contain each (whitespace-normalized)
    rc: int = 2
    after: Callable[[Path], None] | None = None  # an extra check of the case directory afterwards


def _nothing_at(out: Path) -> None:
    assert not out.exists(), f"{out} was written by a refused command"


def no_unpickling(d: Path) -> None:
    assert not list(d.rglob("UNPICKLED")), "a pickle file was unpickled"


CLI_CASES = [
    # extension directories
    CliCase("ext-other-base", ext_other_base,
            ("was made for a base whose embedding table has fingerprint", "Load it onto the base it was made for")),
    CliCase("ext-base-moved", ext_base_gone, ("moved-away does not exist", "Pass it with --base-model PATH_OR_ALIAS",
                                              "checked against the fingerprint recorded in extension.json")),
    CliCase("ext-safetensors-truncated", ext_truncated, ("extension.safetensors is corrupted or truncated",
                                                         "re-create the extension")),
    CliCase("ext-safetensors-edited", ext_edited, ("do not match the extension_fingerprint in",
                                                   "re-create the extension")),
    CliCase("ext-safetensors-nan", ext_nan, ("tensor embed.default contains NaN or Inf",)),
    CliCase("ext-json-version", ext_manifest(format_version=2),
            ("has format_version 2; this embdeploy reads version 1", "upgrade embdeploy")),
    CliCase("ext-json-k", ext_manifest(K=9), ("is inconsistent", "K is 9 but 4 tokens are listed")),
    CliCase("ext-json-h", ext_manifest(H=64), ("tensor embed.default has shape (4, 32), the manifest says (4, 64)",)),
    # --base-onnx
    CliCase("onnx-other-model", base_onnx(lambda w, d: w.base_b_onnx / "model.onnx"),
            ("the ONNX model does not contain this base table", "Export the base model this extension was made for")),
    CliCase("onnx-other-model-dir", base_onnx(lambda w, d: w.base_b_onnx),
            ("was exported from another base", "export the base this extension was made for")),
    CliCase("onnx-table-twice", base_onnx(onnx_table_twice),
            ("several distinct initializers hold the base embedding table", "'copy_of_the_table'",
             "export the model with its embeddings shared")),
    CliCase("onnx-data-dotdot", base_onnx(onnx_external("dotdot")),
            ("refusing to load", "'..' is refused; keep data files inside the model directory")),
    CliCase("onnx-data-absolute", base_onnx(onnx_external("absolute")),
            ("refusing to load", "absolute paths are refused; keep data files next to the model")),
    CliCase("onnx-data-symlink", base_onnx(onnx_external("symlink")),
            ("refusing to load", "(symlink?); copy the file into the model directory")),
    CliCase("onnx-already-extended", base_onnx(lambda w, d: w.merged),
            ("is a 'merged' export (already extended); pass the base export",)),
    CliCase("onnx-pickle", base_onnx(onnx_pickle), ("is not a readable ONNX model",), after=no_unpickling),
    CliCase("onnx-missing", base_onnx(lambda w, d: d / "nope.onnx"),
            ("does not exist; pass an ONNX file or the directory holding model.onnx",)),
    # pickle files are never loaded
    CliCase("vectors-pickle", extend_vectors_pickle, ("as safetensors", "vectors must be a safetensors file"),
            after=no_unpickling),
    CliCase("weights-pickle", extend_pickle_weights,
            ("has no safetensors weights", "pickle files, which embdeploy never loads", "safe_serialization=True"),
            after=no_unpickling),
    # export options
    CliCase("export-unknown-mode", lambda w, d: ["export", w.ext_a, "--out", d / "out", "--mode", "fast"],
            ("Invalid value for '--mode'", "'fast' is not one of 'merged', 'split', 'swap'")),
    CliCase("export-readonly-out", export_readonly, ("a-file is a file, not a directory; choose a writable --out",)),
    CliCase("export-no-out", lambda w, d: ["export", w.ext_a, "--mode", "swap"], ("no output directory: pass --out DIR",)),
    CliCase("export-calibration-not-int8", lambda w, d: ["export", w.ext_a, "--out", d / "out", "--calibration-texts",
                                                          w.ext_a / "extension.json"],
            ("--calibration-texts applies to --quantize int8 only; add --quantize int8 or drop it",),
            after=lambda d: _nothing_at(d / "out")),
    CliCase("export-calibration-missing", lambda w, d: ["export", w.ext_a, "--out", d / "out", "--quantize", "int8",
                                                         "--calibration-texts", d / "missing.txt"],
            ("is not a file; pass a text file (one text per line)",), after=lambda d: _nothing_at(d / "out")),
    CliCase("validate-texts-missing", lambda w, d: ["validate", w.swap, "--texts", d / "missing.txt"],
            ("missing.txt does not exist",)),
    CliCase("recipe-unknown-key", recipe('{"recipe_version": 1, "modee": "swap"}'),
            ("has problems", "unknown key(s) 'modee'", "mode is required")),
    CliCase("recipe-bad-json", recipe('{"mode": "swap",}'), ("is not valid JSON",)),
    CliCase("recipe-bad-value", recipe('{"mode": "swap", "dtype": "int8", "validate": "yes"}'),
            ("dtype is 'int8'; choose one of fp32, fp16", "validate is 'yes'; use true or false")),
    # validate
    CliCase("validate-tampered", validate_of(export_copy("swap", lambda e: flip_byte(e / "model.onnx.data", 100))),
            ("does not match its embdeploy.json", "model.onnx.data: its sha256 differs from the one recorded at export",
             "re-run `embdeploy export`")),
    CliCase("validate-file-missing", validate_of(export_copy("swap", lambda e: (e / "extension.onnx.data").unlink())),
            ("extension.onnx.data: missing",)),
    CliCase("validate-not-export", validate_of(not_an_export),
            ("has no embdeploy.json, so it is not an embdeploy ONNX directory", "`embdeploy export`")),
    CliCase("validate-manifest-json", validate_of(export_copy("swap", lambda e: (e / "embdeploy.json").write_text("{"))),
            ("embdeploy.json is not valid JSON", "re-run `embdeploy export`")),
    CliCase("validate-manifest-k", validate_of(export_copy("merged", lambda e: edit_json(e / "embdeploy.json", K=9))),
            ("K is 9 but 4 tokens are listed", "re-run `embdeploy export`")),
    CliCase("validate-other-ext", validate_of(lambda w, d: w.swap, "--ext", lambda w: w.ext_b),
            ("was exported from a base with embedding fingerprint", "validate with the extension it was exported from")),
    CliCase("validate-partial", validate_of(export_copy("swap", name=f".exp{PARTIAL_MARK}x1y2")),
            ("is an unfinished export", "delete it and run `embdeploy export` again")),
    # train, bench, inspect, serve
    CliCase("train-empty-texts", train_texts(b"\n \n"), ("is empty; write one text per line",)),
    CliCase("train-binary-texts", train_texts(b"\x00\x01PK\x03\x04" * 10), ("is binary (contains NUL bytes)",)),
    CliCase("bench-not-export", lambda w, d: ["bench", not_an_export(w, d)],
            ("has no embdeploy.json, so it is not an embdeploy ONNX directory",)),
    CliCase("inspect-manifest-not-object",
            lambda w, d: ["inspect", export_copy("swap", lambda e: (e / "embdeploy.json").write_text("[]"))(w, d)],
            ("does not hold a JSON object", "re-run `embdeploy export`")),
    CliCase("serve-not-export", lambda w, d: ["serve", not_an_export(w, d), "--port", "0"],
            ("has no embdeploy.json, so it is not an embdeploy ONNX directory",)),
    # output paths: --overwrite replaces only what embdeploy wrote, never an input
    CliCase("overwrite-source-ext", overwrite_source_ext,
            ("an input of this command; writing it would destroy the input", "Choose another --out")),
    CliCase("overwrite-base-model", overwrite_base_model, ("an input of this command; writing it would destroy the input",)),
    CliCase("overwrite-parent-of-input", overwrite_parent_of_input,
            ("contains", "an input of this command; writing it would destroy the input")),
    CliCase("overwrite-unrelated-dir", overwrite_unrelated,
            ("--overwrite replaces only what embdeploy wrote", "is not an ONNX export directory", "nothing was deleted")),
    CliCase("overwrite-other-kind", overwrite_other_kind,
            ("which is an extension directory, with an ONNX export directory", "nothing was deleted")),
    CliCase("merge-overwrite-a-model", merge_over_a_model,
            ("--overwrite replaces only what embdeploy wrote", "is not a merged model directory (embdeploy merge)")),
    CliCase("train-out-is-input", train_out_is_input, ("an input of this command; writing it would destroy the input",)),
    CliCase("out-symlink", out_symlink, ("is a symbolic link (to", "Pass the real directory path, or another --out")),
    CliCase("out-dangling-symlink", out_dangling_symlink, ("is a symbolic link (to", "which does not exist")),
    CliCase("tokens-fifo", tokens_fifo, ("is a named pipe (FIFO), which embdeploy will not read",
                                         "pass a text file with one new token per line")),
    CliCase("texts-char-device", texts_char_device, ("/dev/zero is a character device, which embdeploy will not read",)),
    CliCase("quickstart-fresh-foreign", quickstart_fresh_foreign,
            ("--fresh deletes the work directory", "was not made by `embdeploy quickstart`", "nothing was deleted")),
    # code shipped inside an artifact is never run, nor asked about
    CliCase("ext-remote-code", ext_remote_code,
            ("asks to run code of its own, which embdeploy never does", "evil_tok.py is Python code",
             "tokenizer_config.json has an auto_map"), after=no_code_ran),
    CliCase("base-remote-code", base_remote_code,
            ("base model directory", "asks to run code of its own", "evil_model.py is Python code",
             "config.json has an auto_map"), after=no_code_ran),
    # every byte of an export is covered, paths stay inside, behaviour fields agree with the graph
    CliCase("validate-file-unlisted", validate_of(export_copy("swap", unlist("extension.onnx.data"))),
            ("extension.onnx.data: not listed in embdeploy.json, so nothing vouches for it",)),
    CliCase("validate-file-added", validate_of(export_copy("swap", add_stray_file)),
            ("notes.bin: not listed in embdeploy.json", "remove it or re-export")),
    CliCase("validate-files-dotdot", validate_of(export_copy("swap", edit_manifest(
        lambda m: m["files"].update({"../../etc/passwd": "sha256:" + "0" * 64})))),
            ("files lists '../../etc/passwd': '..' and empty path parts are refused",)),
    CliCase("validate-files-absolute", validate_of(export_copy("swap", edit_manifest(
        lambda m: m["files"].update({"/etc/passwd": "sha256:" + "0" * 64})))),
            ("files lists '/etc/passwd': absolute paths are refused",)),
    CliCase("validate-mode-edited", validate_of(export_copy("merged", edit_manifest(lambda m: m.update(mode="swap")))),
            ("mode swap needs the extension table embdeploy_ext_embed",)),
    CliCase("validate-roles-edited", validate_of(export_copy("swap", edit_manifest(
        lambda m: m["input_roles"].update(bogus_mask="attention_mask")))),
            ("input_roles names bogus_mask, which the graph does not take",)),
    CliCase("validate-dtype-edited", validate_of(export_copy("merged", edit_manifest(lambda m: m.update(dtype="float16")))),
            ("dtype float16 needs a float16 table",)),
    CliCase("validate-hidden-edited", validate_of(export_copy("merged", edit_manifest(lambda m: m.update(H=64)))),
            ("H=64", "and the graph has none")),
    CliCase("validate-field-missing", validate_of(export_copy("merged", edit_manifest(lambda m: m.pop("base_model")))),
            ("is inconsistent", "base_model is missing")),
    CliCase("validate-field-mistyped", validate_of(export_copy("merged", edit_manifest(
        lambda m: m.update(tokens="troponin", model_file=None)))),
            ("model_file is null, expected a string", "tokens is a string, expected a list")),
    CliCase("ext-tokenizer-ids-swapped", ext_tokenizer_ids_swapped,
            ("the extended tokenizer's base part is not the base tokenizer",)),
    CliCase("ext-tokenizer-extra-token", ext_tokenizer_extra_token,
            ("tokens were added or removed outside embdeploy",)),
    CliCase("ext-json-no-fingerprint", ext_without_fingerprint,
            ("extension_fingerprint is missing; without it the rows cannot be checked",)),
]


@dataclass
class CliResult:
    rc: int
    out: str
    err: str
    before: dict
    after: dict
    dir: Path
    seconds: float = 0.0


@pytest.fixture(scope="module")
def cli_results(world, tmp_path_factory) -> dict[str, CliResult]:
    """Every CLI case, set up in its own directory and run, two at a time."""
    dirs, args = {}, {}
    for case in CLI_CASES:
        d = tmp_path_factory.mktemp(case.id)
        args[case.id] = case.setup(world, d)
        dirs[case.id] = d
    before = {cid: listing(d) for cid, d in dirs.items()}
    watched = {p: listing(p) for p in (world.ext_a, world.ext_b, world.swap, world.merged)}

    def one(case):
        t = time.perf_counter()
        rc, out, err = run_cli(args[case.id], world.env())
        return case.id, rc, out, err, time.perf_counter() - t

    with ThreadPoolExecutor(max_workers=2) as pool:
        ran = list(pool.map(one, CLI_CASES))
    assert all(listing(p) == before_p for p, before_p in watched.items()), "a case changed the shared fixtures"
    return {cid: CliResult(rc, out, err, before[cid], listing(dirs[cid]), dirs[cid], secs) for cid, rc, out, err, secs in ran}


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.id for c in CLI_CASES])
def test_cli_refuses(case, cli_results):
    r = cli_results[case.id]
    shown = f"exit {r.rc}\nstdout: {r.out}\nstderr: {r.err}"
    assert r.rc == case.rc, shown
    assert "Traceback" not in r.err + r.out, shown
    message = flat(r.err)
    for phrase in case.says:
        assert phrase in message, f"{phrase!r} not in the message:\n{r.err}"
    assert r.after == r.before, f"the directory changed: {set(r.after) ^ set(r.before)}"
    if case.after:
        case.after(r.dir)


# --------------------------------------------------------------------------- SIGKILL during export


def test_export_killed_midway_leaves_nothing_taken_for_finished(world, tmp_path):
    """kill -9 while the export writes/validates its `.out.partial-*` directory; the next run cleans it up."""
    from embdeploy.runtime import Session

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "embdeploy.cli", "export", str(world.ext_a), "--out", str(out), "--mode", "split"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=world.env())
    partial = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            partial = [p for p in tmp_path.glob(f".out{PARTIAL_MARK}*") if (p / "model.onnx").exists()]
            if partial:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
    finally:
        if proc.poll() is None and not partial:
            proc.kill()
        proc.wait(timeout=60)
    assert partial, f"the export finished (exit {proc.returncode}) before it could be killed mid-way"
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists(), "a killed export must not leave the output directory"
    leftover = partial[0]
    assert leftover.exists()

    rc, _, err = run_cli(["validate", leftover], world.env())
    assert rc == 2 and "Traceback" not in err and "is an unfinished export" in flat(err)
    with pytest.raises(EmbdeployError, match="is an unfinished export"):
        Session(leftover, providers="cpu")

    rc, _, err = run_cli(cmd[3:], world.env())
    assert rc == 0, err
    assert not list(tmp_path.glob(f".out{PARTIAL_MARK}*")), "the next run removes the leftovers"
    rc, _, err = run_cli(["validate", out], world.env())
    assert rc == 0, err


# --------------------------------------------------------------------------- output paths: the current directory,
# a second writer, SIGTERM, a full disk, file modes


def test_out_is_the_current_directory(world, tmp_path):
    """`--out .` (or a parent of the working directory) is refused, even with --overwrite."""
    (tmp_path / "notes.txt").write_text("mine\n")
    sub = tmp_path / "sub"
    sub.mkdir()
    before = listing(tmp_path)
    for out, cwd in ((".", tmp_path), ("..", sub)):
        p = subprocess.run([sys.executable, "-m", "embdeploy.cli", "export", str(world.ext_a), "--out", out, "--overwrite"],
                           capture_output=True, text=True, env=world.env(), cwd=cwd, timeout=300)
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
        assert "is the current directory or one of its parents" in flat(p.stderr)
    assert listing(tmp_path) == before


def test_a_second_writer_is_not_silently_replaced(tmp_path):
    """What appears at --out while a run writes is kept (the run's output is discarded with a message),
    unless --overwrite and it is an artifact of the same kind; no partial directory is left either way."""
    from embdeploy.fsutil import atomic_output_dir

    out = tmp_path / "out"

    def other_writer(kind_file: str) -> None:
        out.mkdir()
        (out / kind_file).write_text("{}")
        (out / "theirs.bin").write_bytes(b"x" * 10)

    with pytest.raises(EmbdeployError, match="appeared while this run was writing .* this run's output was discarded"):
        with atomic_output_dir(out, kind="export") as tmp:
            (tmp / "ours.bin").write_bytes(b"y")
            other_writer("embdeploy.json")
    assert sorted(p.name for p in out.iterdir()) == ["embdeploy.json", "theirs.bin"]
    shutil.rmtree(out)

    with pytest.raises(EmbdeployError, match="--overwrite replaces only what embdeploy wrote"):
        with atomic_output_dir(out, overwrite=True, kind="export") as tmp:
            (tmp / "ours.bin").write_bytes(b"y")
            other_writer("notes.txt")  # not an export: --overwrite may not replace it
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "theirs.bin"]
    shutil.rmtree(out)

    with atomic_output_dir(out, overwrite=True, kind="export") as tmp:
        (tmp / "ours.bin").write_bytes(b"y")
        other_writer("embdeploy.json")  # an export: --overwrite replaces it
    assert sorted(p.name for p in out.iterdir()) == ["ours.bin"]
    assert not [p for p in tmp_path.iterdir() if PARTIAL_MARK in p.name]


def test_export_terminated_midway_cleans_up(world, tmp_path):
    """SIGTERM (systemd, docker stop) is handled like Ctrl-C: a message, exit 143, no output and no partial dir."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "embdeploy.cli", "export", str(world.ext_a), "--out", str(out), "--mode", "split"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=world.env())
    sent = False
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if [p for p in tmp_path.glob(f".out{PARTIAL_MARK}*") if (p / "model.onnx").exists()]:
                proc.send_signal(signal.SIGTERM)
                sent = True
                break
            time.sleep(0.005)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert sent, f"the export finished (exit {proc.returncode}) before it could be terminated mid-way"
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "terminated (SIGTERM)" in err
    assert not out.exists()
    assert not list(tmp_path.glob(f".out{PARTIAL_MARK}*")), "SIGTERM must not strand a partial directory"


def _disk_full(written: Path):
    def fail(*args, **kwargs):
        written.write_bytes(b"\0" * 3_000_000)  # what a writer had put down before the disk filled
        raise OSError(28, "No space left on device")

    return fail


def test_full_disk_during_export_is_a_message(world, tmp_path, monkeypatch):
    """ENOSPC while the export writes (the fault injected into the ONNX writer): a message that says what
    happened and how much had been written, and the partial directory removed."""
    import embdeploy.onnx.io as onnx_io
    from embdeploy.export import export_extension

    out = tmp_path / "out"
    monkeypatch.setattr(onnx_io, "save_model", lambda proto, d, **kw: _disk_full(Path(d) / "model.onnx")())
    with pytest.raises(EmbdeployError, match=r"no space left on the device holding .* had written 3 MB when it ran out"):
        export_extension(world.ext_a, "merged", out, cache_dir=world.cache)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if PARTIAL_MARK in p.name]


def test_full_disk_reported_by_a_library_is_a_message(world, tmp_path, monkeypatch):
    """safetensors reports ENOSPC as its own error with 'os error 28' in the text; the message is the same."""
    import safetensors.torch

    from embdeploy.extend.model import load_extension

    def fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 1000)
        raise Exception("I/O error: No space left on device (os error 28)")

    ext = load_extension(world.ext_a)
    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    with pytest.raises(EmbdeployError, match="no space left on the device holding"):
        ext.save(tmp_path / "ext")
    assert list(tmp_path.iterdir()) == []


def test_every_output_file_has_the_usual_mode(world, tmp_path):
    """No file is left 0600 by a writer's temporary file: a service user can read every artifact."""
    from embdeploy.extend.api import extend_cli

    old = os.umask(0o022)
    try:
        extend_cli(str(world.base_a), world.tokens, tmp_path / "ext")
    finally:
        os.umask(old)
    for d in (tmp_path / "ext", world.merged):
        for p in [d, *d.rglob("*")]:
            want = 0o755 if p.is_dir() else 0o644
            assert p.stat().st_mode & 0o777 == want, f"{p} has mode {oct(p.stat().st_mode & 0o777)}"


# --------------------------------------------------------------------------- runtime (API)


@pytest.fixture(scope="module")
def swap_session(world):
    from embdeploy.runtime import Session

    return Session(world.swap, providers="cpu")


def test_session_refuses_a_tampered_export(world, tmp_path):
    from embdeploy.runtime import Session

    exp = copy(world.merged, tmp_path)
    flip_byte(exp / "model.onnx", 40)
    with pytest.raises(EmbdeployError, match="model.onnx: its sha256 differs from the one recorded at export"):
        Session(exp, providers="cpu")


def test_session_refuses_a_directory_that_is_not_an_export(world):
    from embdeploy.runtime import Session

    with pytest.raises(EmbdeployError, match="has no embdeploy.json, so it is not an embdeploy ONNX directory"):
        Session(world.ext_a, providers="cpu")


def test_session_refuses_an_edited_manifest(world, tmp_path):
    """embdeploy.json is not among the hashed files; its K is checked against its token list instead."""
    from embdeploy.runtime import Session

    exp = copy(world.merged, tmp_path)
    edit_json(exp / "embdeploy.json", K=world.K + 5)
    with pytest.raises(EmbdeployError, match=f"K is {world.K + 5} but {world.K} tokens are listed"):
        Session(exp, providers="cpu")


def _ext_with_table(world, d: Path, rows: np.ndarray, H: int | None = None) -> Path:
    from safetensors.numpy import save_file

    ext = copy(world.ext_a, d, "ext")
    save_file({"embed.default": rows}, str(ext / "extension.safetensors"), metadata={"format": "embdeploy-extension"})
    if H is not None:
        edit_json(ext / "extension.json", H=H)
    return ext


def test_session_refuses_a_tokenizer_edited_with_its_digest(world, tmp_path):
    """Two base ids swapped in an export's tokenizer.json and its sha256 rewritten to match: the digests pass,
    the base tokenizer's fingerprint does not."""
    from embdeploy.fingerprint import file_digest
    from embdeploy.runtime import Session

    exp = copy(world.merged, tmp_path)
    doc = json.loads((exp / "tokenizer.json").read_text())
    vocab = doc["model"]["vocab"]
    a, b = list(vocab)[10], list(vocab)[11]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (exp / "tokenizer.json").write_text(json.dumps(doc))
    m = json.loads((exp / "embdeploy.json").read_text())
    m["files"]["tokenizer.json"] = file_digest(exp / "tokenizer.json")
    (exp / "embdeploy.json").write_text(json.dumps(m))
    with pytest.raises(EmbdeployError, match="its base part is not the base tokenizer recorded at export"):
        Session(exp, providers="cpu")


def test_swap_table_of_another_hidden_size_is_refused(world, tmp_path):
    from embdeploy.runtime import Session

    ext = _ext_with_table(world, tmp_path, np.zeros((world.K, 16), np.float32), H=16)
    with pytest.raises(EmbdeployError, match="H: the extension's rows have hidden size 16, the export's 32"):
        Session(world.swap, providers="cpu", extension=ext)


def test_swap_table_not_matching_its_manifest_is_refused_and_the_old_one_kept(world, swap_session, tmp_path):
    ext = _ext_with_table(world, tmp_path, np.zeros((world.K, 31), np.float32))
    before = swap_session.encode("the troponin rose")["logits"]
    with pytest.raises(EmbdeployError, match=r"tensor embed.default has shape \(4, 31\), extension.json says \(4, 32\)"):
        swap_session.swap_extension(ext)
    np.testing.assert_array_equal(swap_session.encode("the troponin rose")["logits"], before)


def test_swap_extension_of_another_base_is_refused(world, swap_session):
    with pytest.raises(FingerprintMismatch, match="made for a base whose embedding table has fingerprint"):
        swap_session.swap_extension(world.ext_b)
    assert swap_session.metadata()["extension"] == "export"


def test_out_of_range_ids_at_runtime(world, swap_session):
    V, K = world.V, world.K
    with pytest.raises(EmbdeployError, match=rf"input_ids\[0, 1\] = {V + K} is too large: valid values are 0\.\.{V + K - 1}"):
        swap_session.run({"input_ids": np.array([[1, V + K]])})
    with pytest.raises(EmbdeployError, match=r"input_ids\[0, 0\] = -1 is negative"):
        swap_session.run({"input_ids": np.array([[-1, 2]])})
    assert swap_session.run({"input_ids": np.array([[V + K - 1]])})["logits"].shape == (1, 1, V + K)


def test_swap_table_of_the_wrong_shape_at_the_ort_level(world):
    """The low-level helper: a table that is not (K, H), or an empty one, is refused before ORT sees it."""
    import onnxruntime as ort

    from embdeploy.ort import swap_session_options

    with pytest.raises(EmbdeployError, match=r"ext_table must be a 2-D \(rows, hidden\) array, got shape \(32,\)"):
        swap_session_options(ort.SessionOptions(), np.zeros(32, np.float32))
    with pytest.raises(EmbdeployError, match="ext_table has 0 rows"):
        swap_session_options(ort.SessionOptions(), np.zeros((0, 32), np.float32))


# --------------------------------------------------------------------------- train (API)


def test_train_without_texts(world):
    from embdeploy.extend.model import load_extension
    from embdeploy.train import train

    ext = load_extension(world.ext_a)
    with pytest.raises(EmbdeployError, match="no training texts"):
        train(ext, ["", "   "], steps=1, progress=False)


# --------------------------------------------------------------------------- the table in docs/bad-input.md


def test_doc_table_lists_every_case():
    """Each case here has a row in docs/bad-input.md naming its test, and every row's test exists."""
    import re

    import test_cli

    text = DOC.read_text()
    named = set(re.findall(r"`(test_[a-z0-9_]+(?:\[[a-z0-9-]+\])?)`", text))
    here = {f"test_cli_refuses[{c.id}]" for c in CLI_CASES}
    here |= {name for name in globals() if name.startswith("test_") and name not in ("test_cli_refuses",
                                                                                      "test_doc_table_lists_every_case")}
    missing = sorted(here - named)
    assert not missing, f"cases without a row in docs/bad-input.md: {missing}"
    elsewhere = {n for n in named - here}
    unknown = sorted(n for n in elsewhere if not hasattr(test_cli, n.split("[")[0]) and n.split("[")[0] not in globals())
    assert not unknown, f"docs/bad-input.md names tests that do not exist: {unknown}"
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and "`test_" in ln]
    assert len(rows) >= 30
