"""What a production service imports: an ONNX Runtime session over an `embdeploy export` directory.

    session = Session("clinical-onnx")                  # CUDA when available, else CPU
    out = session.encode(["troponin rose overnight"])   # {"last_hidden_state", "sentence_embedding", "attention_mask"}
    session.run({"input_ids": ids})                     # pre-tokenized ids, range-checked first
    session.swap_extension("oncology-ext")              # swap exports only: another table, no re-export
    tenant = session.fork(extension="cardio-ext")       # another table over the same loaded base

On open: the files are checked against the sha256 digests in `embdeploy.json`,
the extended tokenizer is loaded and its new tokens checked against their ids,
and the graph's inputs and outputs against the manifest.

Ids are checked before every run: the GPU Gather does not check its indices and
would read whatever memory lies past the table. Ids outside [0, V+K), token
types outside the model's type table and sequences longer than its position
table are refused with the offending value and its position.

Swap exports keep the extension table an overridable initializer. By default
(`table_binding="feed"`) the table is passed with every run as a graph input:
one ORT session serves every extension, so the base, every prepacked weight and
the arena are shared by all tenants, and a swap builds no ORT session at all.
`table_binding="session"` builds one ORT session per table instead
(`swap_session_options`); tenants then share the base weights only through the
memory-mapped external data file (CPU). Either way a swap switches one reference:
requests that started before it finish on the old table, the next ones use the
new table and its tokenizer, never a mix.

Thread safety: `encode`, `run`, `tokenize` and `swap_extension` may be called
from any number of threads. ORT's `run` is thread-safe; each extension's
tokenizer has its own lock (transformers tokenizers change their truncation
settings per call); swaps are serialized by a lock.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import EmbdeployError, raise_all
from ..export.manifest import ExportManifest
from ..ort import (
    ORT_INT, create_session, import_ort, resolve_providers, session_options, swap_session_options,
    wants_cuda,
)

log = logging.getLogger(__name__)

ROLES = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
TABLE_BINDINGS = ("feed", "session")
_NP_DTYPES = {"float32": np.float32, "float16": np.float16}
_UNBOUNDED = 1_000_000  # tokenizers without a limit report model_max_length = 1e30


# --------------------------------------------------------------------------- id checks


def check_ids(ids, vocab_size: int, name: str = "input_ids", what: str | None = None) -> np.ndarray:
    """`ids` as a 2-D (batch, sequence) integer array whose values are all in [0, vocab_size).

    Raises EmbdeployError naming the first offending value and its position, and
    how many others there are. `what` describes the range in the message.
    """
    arr = np.asarray(ids)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise EmbdeployError(
            f"{name} must be an integer array (int64 or int32), got dtype {arr.dtype}; pass token ids, "
            "e.g. from session.tokenize(texts)"
        )
    if arr.ndim != 2:
        raise EmbdeployError(f"{name} must have shape (batch, sequence), got shape {arr.shape}")
    if arr.size == 0:
        raise EmbdeployError(f"{name} is empty (shape {arr.shape}); pass at least one token id")
    bad = (arr < 0) | (arr >= vocab_size)
    if bad.any():
        where = np.argwhere(bad)
        b, s = (int(x) for x in where[0])
        value = int(arr[b, s])
        more = f" (and {len(where) - 1} more)" if len(where) > 1 else ""
        kind = "negative" if value < 0 else "too large"
        raise EmbdeployError(
            f"{name}[{b}, {s}] = {value} is {kind}: valid values are 0..{vocab_size - 1}"
            f"{f' ({what})' if what else ''}{more}. The ids come from another tokenizer or extension; "
            "tokenize with this session (session.tokenize / session.encode) or load the extension they belong to"
        )
    return arr


# --------------------------------------------------------------------------- the export's description


@dataclass(frozen=True)
class _Export:
    """The immutable part every tenant of one export shares: its manifest and what config.json adds."""

    manifest: ExportManifest
    max_positions: int | None  # from config.json; None when unknown
    type_vocab_size: int | None

    @property
    def path(self) -> Path:
        return self.manifest.path


def _read_export(onnx_dir: Path, verify: bool) -> _Export:
    m = ExportManifest.verify(onnx_dir) if verify else ExportManifest.read(onnx_dir)
    problems = []
    roles = m.roles
    past = [n for n, r in roles.items() if r == "past_key_values"]
    if past:
        # Generation (a cache carried from step to step, sampling) is another program than one-shot encode/run.
        raise EmbdeployError(
            f"{onnx_dir} is a decoder exported with a KV cache ({len(past)} inputs: {', '.join(past[:2])}"
            f"{', …' if len(past) > 2 else ''}); runtime.Session runs whole sequences and keeps no cache, so it "
            "cannot serve it. Run it with onnxruntime directly (feed past_key_values.*, read present.*: "
            "embdeploy.json's kv_cache pairs them), or export the extension onto a base without the cache "
            "(optimum task 'text-generation') to serve it with Session"
        )
    unknown = [f"{n!r} ({r!r})" for n, r in roles.items() if r not in ROLES]
    if unknown:
        problems.append(f"inputs with roles the runtime cannot fill: {', '.join(unknown)}")
    if m.mode == "swap" and not m.ext_embed:  # read without verify: the graph check has not caught it
        problems.append("a swap export must name its extension table in extension_initializers.embed")
    if not m.outputs:
        problems.append("the manifest lists no outputs")
    raise_all(problems, f"{onnx_dir / 'embdeploy.json'} cannot be served; re-run `embdeploy export`:")
    config = {}
    if (onnx_dir / "config.json").is_file():
        try:
            config = json.loads((onnx_dir / "config.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise EmbdeployError(f"{onnx_dir / 'config.json'} is not valid JSON; re-run `embdeploy export`") from None
    positions = next((config[k] for k in ("max_position_embeddings", "n_positions") if isinstance(config.get(k), int)), None)
    types = config.get("type_vocab_size") if isinstance(config.get("type_vocab_size"), int) else None
    return _Export(m, positions, types)


@dataclass(frozen=True)
class _Tenant:
    """One extension's view of the export: replaced as a whole by a swap, never modified."""

    sess: object  # onnxruntime.InferenceSession
    tokenizer: object
    tok_lock: threading.Lock
    K: int
    tokens: tuple[str, ...]
    fingerprint: str | None
    source: str  # "export" or the extension directory
    tables: dict  # {initializer name: (K, H) array} fed with every run (table_binding "feed")
    bound: dict  # the same tables as OrtValues on the session's device (io_binding)


class _Runtime:
    """ORT sessions and settings shared by a Session and its forks."""

    def __init__(self, export: _Export, providers, threads, io_binding: bool, table_binding: str):
        self.export = export
        self.providers = resolve_providers(providers)
        self.explicit = providers is not None
        self.threads = threads
        self.io_binding = io_binding
        self.table_binding = table_binding
        self.device_type, self.device_id = "cpu", 0
        self.input_types: dict = {}
        self._sess = None  # the export's own session, created when a tenant first needs it
        self._lock = threading.Lock()

    @property
    def sess(self):
        """The ORT session of the export as written (its own extension table)."""
        with self._lock:
            if self._sess is None:
                self._sess = self.create_session()
        return self._sess

    def _check_graph(self, sess) -> None:
        """The first session made: its device, and its inputs and outputs against the manifest."""
        export = self.export
        self.device_type = "cuda" if "CUDAExecutionProvider" in sess.get_providers() else "cpu"
        for p in self.providers:
            if isinstance(p, tuple) and p[0] == "CUDAExecutionProvider":
                self.device_id = int(p[1].get("device_id", 0))
        types = {i.name: ORT_INT.get(i.type) for i in sess.get_inputs()}
        problems = []
        if set(types) != set(export.manifest.roles):
            problems.append(f"the graph's inputs {sorted(types)} differ from the manifest's {sorted(export.manifest.roles)}")
        problems += [f"input {n!r} has type {t}, not int64/int32" for n, t in types.items() if t is None]
        graph_outputs = tuple(o.name for o in sess.get_outputs())
        if graph_outputs != export.manifest.outputs:
            problems.append(f"the graph's outputs {list(graph_outputs)} differ from the manifest's {list(export.manifest.outputs)}")
        raise_all(problems, f"{export.path} does not match its embdeploy.json; re-run `embdeploy export`:")
        self.input_types = types

    def options(self):
        return session_options(self.threads)

    def create_session(self, so=None):
        # an automatic choice (no providers given) may fall back to the CPU with a warning; a provider asked for may not
        sess = create_session(self.export.manifest.model_path, self.providers, so or self.options(),
                              explicit=self.explicit)
        if not self.input_types:
            self._check_graph(sess)
        return sess

    def binds_tables(self) -> bool:
        """Whether fed tables go in as OrtValues on the device (IO binding) rather than numpy arrays.

        On CPU a numpy feed is used in place (measured: a 100000 x 384 table fed with every run costs
        nothing); on a GPU it would be copied to the device on every run, so it is put there once.
        """
        return self.io_binding or self.device_type != "cpu"

    def device_value(self, table: np.ndarray):
        return import_ort().OrtValue.ortvalue_from_numpy(table, self.device_type, self.device_id)


# --------------------------------------------------------------------------- the session


class Session:
    """An exported model ready to serve: tokenizer, id checks, ORT session(s), swappable extension table.

    Args:
        onnx_dir: a directory written by `embdeploy export`.
        providers: None (CUDA when available, else CPU), or e.g. "cpu", ["cuda", "cpu"].
        threads: ORT intra-op threads per run (None: ORT's default, one per core).
        extension: an extension directory to use instead of the exported rows (swap exports; other
            modes accept only the extension they were exported with).
        io_binding: run through IO binding: inputs copied to the device once, outputs allocated on
            it; needed for `device_outputs=True`.
        table_binding: "feed" (one ORT session, the table passed with every run) or "session"
            (one ORT session per table); see the module docstring.
        verify: check every file against its sha256 in embdeploy.json (seconds for large models).
    """

    def __init__(
        self,
        onnx_dir,
        providers=None,
        threads: int | None = None,
        extension=None,
        *,
        io_binding: bool = False,
        table_binding: str = "feed",
        verify: bool = True,
    ):
        if table_binding not in TABLE_BINDINGS:
            raise EmbdeployError(f"unknown table_binding {table_binding!r}; choose one of {', '.join(TABLE_BINDINGS)}")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise EmbdeployError(f"threads must be a positive integer or None, got {threads!r}")
        export = _read_export(Path(onnx_dir).expanduser(), verify)
        self._rt = _Runtime(export, providers, threads, io_binding, table_binding)
        self._swap_lock = threading.Lock()
        self._state = self._tenant(extension)

    # ------------------------------------------------------------------ properties
    @property
    def path(self) -> Path:
        return self._rt.export.path

    @property
    def mode(self) -> str:
        return self._rt.export.manifest.mode

    @property
    def task(self) -> str:
        return self._rt.export.manifest.task

    @property
    def V(self) -> int:
        return self._rt.export.manifest.V

    @property
    def K(self) -> int:
        return self._state.K

    @property
    def H(self) -> int:
        return self._rt.export.manifest.H

    @property
    def outputs(self) -> tuple[str, ...]:
        return self._rt.export.manifest.outputs

    @property
    def tokens(self) -> tuple[str, ...]:
        """The new tokens of the current extension: tokens[i] has id V + i."""
        return self._state.tokens

    @property
    def providers(self) -> list[str]:
        return list(self._state.sess.get_providers())

    @property
    def tokenizer(self):
        """The tokenizer of the table in use (the extended one), or None for a base export."""
        return self._state.tokenizer

    @property
    def max_length(self) -> int | None:
        """Default token limit per text: the tokenizer's, capped by the model's position table."""
        limits = [n for n in (getattr(self._state.tokenizer, "model_max_length", None), self._rt.export.max_positions)
                  if isinstance(n, int) and n < _UNBOUNDED]
        return min(limits) if limits else None

    def metadata(self) -> dict:
        state, ex = self._state, self._rt.export
        return {
            "path": str(ex.path),
            "mode": ex.manifest.mode,
            "task": ex.manifest.task,
            "V": ex.manifest.V,
            "K": state.K,
            "H": ex.manifest.H,
            "dtype": ex.manifest.dtype,
            "inputs": list(ex.manifest.roles.values()),
            "outputs": list(ex.manifest.outputs),
            "providers": self.providers,
            "max_length": self.max_length,
            "tokens": [{"token": t, "id": ex.manifest.V + i} for i, t in enumerate(state.tokens)],
            "base_fingerprint": ex.manifest.base_fingerprint,
            "extension_fingerprint": state.fingerprint,
            "extension": state.source,
            "table_binding": self._rt.table_binding if ex.manifest.mode == "swap" else None,
            "io_binding": self._rt.io_binding,
        }

    # ------------------------------------------------------------------ tenants and swap
    def fork(self, extension=None) -> "Session":
        """Another Session over the same loaded export, with its own extension table (swap exports).

        With table_binding "feed" the fork runs on this session's ORT session: it
        costs its (K, H) table and its tokenizer, nothing else.
        """
        other = object.__new__(Session)
        other._rt = self._rt
        other._swap_lock = threading.Lock()
        other._state = other._tenant(extension)
        return other

    def snapshot(self) -> "Session":
        """This session fixed to its current extension: a later swap on `self` does not change it.

        For callers that must report which table produced their numbers
        (`snapshot().metadata()["extension_fingerprint"]` goes with its outputs).
        """
        other = object.__new__(Session)
        other._rt = self._rt
        other._swap_lock = threading.Lock()
        other._state = self._state
        return other

    def swap_extension(self, ext_dir) -> None:
        """Serve the rows (and tokenizer) of extension directory `ext_dir` from now on; swap exports only.

        The new table is read and checked (same base fingerprint, V and H; K may
        differ), its ORT session built if needed, then switched in one step.
        On any error the current extension stays in place.
        """
        if self.mode != "swap":
            raise EmbdeployError(self._not_swappable(ext_dir))
        with self._swap_lock:
            state = self._tenant(ext_dir)
            self._state = state  # one reference: in-flight requests keep the tenant they started with

    def _not_swappable(self, ext_dir) -> str:
        why = ("has no extension table" if self.mode == "base"
               else "has its extension rows built into the graph")
        return (
            f"{self.path} is a {self.mode!r} export: it {why}, so the extension in {ext_dir} cannot be "
            "swapped in at run time. Export with `--mode swap` to replace extension tables without re-export, "
            "or open the export made for that extension"
        )

    def _tenant(self, extension) -> _Tenant:
        rt, ex = self._rt, self._rt.export
        meta = ex.manifest
        if extension is None:  # the rows the export was written with
            tokens = meta.tokens
            tokenizer = _load_tokenizer(ex.path, meta.V, tokens, meta.base_tokenizer)
            return _Tenant(rt.sess, tokenizer, threading.Lock(), meta.K, tokens, meta.extension_fingerprint,
                           "export", {}, {})
        if ex.manifest.mode != "swap":
            from ..extend.model import read_manifest

            m = read_manifest(extension)
            if ex.manifest.mode != "base" and m.get("extension_fingerprint") == meta.extension_fingerprint:
                return self._tenant(None)  # the very rows the graph holds
            raise EmbdeployError(self._not_swappable(extension))

        from .tables import read_extension

        tables = read_extension(extension, meta, _NP_DTYPES[ex.manifest.dtype])
        tokenizer = _load_tokenizer(Path(extension), ex.manifest.V, tables.tokens, meta.base_tokenizer)
        feeds = {ex.manifest.ext_embed: tables.embed}
        if ex.manifest.ext_head:
            feeds[ex.manifest.ext_head] = tables.head
        if rt.table_binding == "feed":
            sess = rt.sess
            fed = feeds
        else:
            if wants_cuda(rt.providers):
                raise EmbdeployError(
                    "table_binding='session' works on the CPU provider only: a CUDA session ignores or refuses an "
                    "extension table given through the session options (perf/README.md, CUDA); use "
                    "table_binding='feed' (the default), which feeds the table from GPU memory with every run")
            sess = rt.create_session(swap_session_options(rt.options(), tables.embed, tables.head))
            fed = {}
        bound = {name: rt.device_value(t) for name, t in fed.items()} if rt.binds_tables() else {}
        state = _Tenant(sess, tokenizer, threading.Lock(), tables.K, tables.tokens, tables.fingerprint,
                        str(tables.directory), fed, bound)
        if rt.table_binding == "session":
            self._check_table_in_use(state, feeds)
        return state

    def _check_table_in_use(self, state: _Tenant, tables: dict) -> None:
        """Run the new ids with the session's own table and with the table fed explicitly: same numbers.

        ORT drops an initializer given through the session options when it lives
        on another device than ORT planned for it, logs a warning and uses the
        file's table instead (session_state_utils.cc); this turns that into an error.
        """
        ex = self._rt.export
        width = min(state.K, ex.max_positions or state.K, 64)
        ids = (ex.manifest.V + np.arange(width, dtype=np.int64) % state.K)[None, :]
        feeds = self._role_feeds({"input_ids": ids}, state.K)
        names = list(ex.manifest.outputs)
        implicit = self._run(state, feeds, names, False)
        explicit = self._run(_with_tables(state, tables, self._rt), feeds, names, False)
        if not all(np.array_equal(implicit[n], explicit[n]) for n in names):
            raise EmbdeployError(
                "ONNX Runtime did not use the extension table given through the session options (it does so "
                "silently when the table is on another device than the one it planned); use table_binding='feed'"
            )

    # ------------------------------------------------------------------ running
    def token_counts(self, texts) -> list[int]:
        """Tokens per text, special tokens included, before any truncation."""
        texts, state = _as_texts(texts), self._state
        if state.tokenizer is None:
            raise EmbdeployError(f"{self.path} holds no tokenizer (a base export?), so it cannot count tokens of text")
        with state.tok_lock:
            return [len(r) for r in state.tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]]

    def tokenize(self, texts, max_length: int | None = None) -> dict[str, np.ndarray]:
        """{"input_ids", "attention_mask", "token_type_ids"} (batch, sequence) int64 for `texts`, padded."""
        return self._tokenize(self._state, _as_texts(texts), max_length)

    def tokenize_each(self, texts, max_length: int | None = None) -> list["TokenRow"]:
        """Each text's tokens, unpadded, truncated to `max_length` (default `self.max_length`).

        `pad(tokenize_each(texts))` equals `tokenize(texts)`; a server tokenizes each text once
        this way, checks sizes from the rows, and pads texts of many requests into one batch.
        Each row also carries its count before truncation; only texts over the limit are tokenized twice.
        """
        texts, state = _as_texts(texts), self._state
        limit = self._length_limit(max_length)
        tok = self._text_tokenizer(state)
        with state.tok_lock:
            enc = tok(texts, add_special_tokens=True, truncation=False, padding=False,
                      return_attention_mask=False, return_token_type_ids=True)
            ids, types = enc["input_ids"], enc.get("token_type_ids")
            lengths = [len(r) for r in ids]
            long = [i for i, n in enumerate(lengths) if limit is not None and n > limit]
            if long:
                cut = tok([texts[i] for i in long], add_special_tokens=True, truncation=True, max_length=limit,
                          padding=False, return_attention_mask=False, return_token_type_ids=True)
                for j, i in enumerate(long):
                    ids[i] = cut["input_ids"][j]
                    if types is not None:
                        types[i] = cut["token_type_ids"][j]
        empty = [i for i, r in enumerate(ids) if not r]
        if empty:
            raise EmbdeployError(f"texts[{empty[0]}] gives no tokens at all; pass non-empty text")
        return [TokenRow(ids[i], None if types is None else types[i], lengths[i]) for i in range(len(ids))]

    def pad(self, rows) -> dict[str, np.ndarray]:
        """Rows from `tokenize_each` (of this session's tokenizer) as the padded arrays `tokenize` returns."""
        if not rows:
            raise EmbdeployError("rows is empty; pass at least one row from tokenize_each")
        types = None if any(r.types is None for r in rows) else [r.types for r in rows]
        return _pad(self._text_tokenizer(self._state), [r.ids for r in rows], types)

    @property
    def extension_fingerprint(self) -> str | None:
        """The fingerprint of the extension rows in use (as metadata() reports it): equal fingerprints, equal rows."""
        return self._state.fingerprint

    def encode(
        self,
        texts,
        batch_size: int = 32,
        max_length: int | None = None,
        outputs=None,
        device_outputs: bool = False,
    ) -> dict:
        """Tokenize and run `texts` in batches of `batch_size`; {output name: array}.

        Texts longer than `max_length` tokens (default: `self.max_length`) are
        truncated. Per-token outputs ((B, S, ...): last_hidden_state, logits) are
        padded with zeros to the longest text of the call; `attention_mask` (B, S)
        is always returned too (1 = token, 0 = padding). `outputs` picks a subset
        of the model's outputs (a name or a list). With `device_outputs` (needs
        io_binding) the model's values stay on the device as OrtValues (the mask
        is a numpy array); all texts must then fit one batch.
        """
        texts = _as_texts(texts)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise EmbdeployError(f"batch_size must be a positive integer, got {batch_size!r}")
        names = self._output_names(outputs)
        state = self._state  # one tenant for the whole call, even if a swap happens meanwhile
        if device_outputs:
            self._need_io_binding()
            if len(texts) > batch_size:
                raise EmbdeployError(
                    f"device_outputs returns one batch of OrtValues: pass at most batch_size={batch_size} texts "
                    f"(got {len(texts)}), or call encode once per batch"
                )
            enc = self._tokenize(state, texts, max_length)
            out = self._run(state, self._role_feeds(enc, state.K), names, True)
            out["attention_mask"] = enc["attention_mask"]
            return out
        parts = []
        for start in range(0, len(texts), batch_size):
            enc = self._tokenize(state, texts[start : start + batch_size], max_length)
            parts.append((enc["attention_mask"], self._run(state, self._role_feeds(enc, state.K), names, False)))
        return _merge(parts, names)

    def run(self, feeds: dict, outputs=None, device_outputs: bool = False) -> dict:
        """Run pre-tokenized inputs: {"input_ids": (B, S) ints, optional "attention_mask", "token_type_ids", "position_ids"}.

        Keys may be roles or the graph's input names. Missing masks are all ones,
        token types zeros, positions counted along the mask. Every id is checked first.
        """
        if not isinstance(feeds, dict):
            raise EmbdeployError(f"feeds must be a dict of arrays by input name, got {type(feeds).__name__}")
        if device_outputs:
            self._need_io_binding()
        state = self._state
        by_role = {}
        names_to_roles = dict(self._rt.export.manifest.roles)
        tables = {self._rt.export.manifest.ext_embed, self._rt.export.manifest.ext_head} - {None}
        problems = []
        for key, value in feeds.items():
            role = names_to_roles.get(key, key)
            if key in tables:
                problems.append(f"{key!r} is the extension table: use swap_extension(ext_dir) or fork(extension=...)")
            elif role not in ROLES or role not in names_to_roles.values():
                problems.append(f"unknown input {key!r}; this model takes {', '.join(names_to_roles.values())}")
            else:
                by_role[role] = value
        if "input_ids" not in by_role:
            problems.append("input_ids is missing")
        raise_all(problems, "run() got feeds it cannot use:")
        return self._run(state, self._role_feeds(by_role, state.K), self._output_names(outputs), device_outputs)

    # ------------------------------------------------------------------ internals
    def _need_io_binding(self):
        if not self._rt.io_binding:
            raise EmbdeployError("device_outputs=True needs a session opened with io_binding=True")

    def _output_names(self, outputs) -> list[str]:
        names = list(self.outputs)
        if outputs is None:
            return names
        wanted = [outputs] if isinstance(outputs, str) else list(outputs)
        unknown = [o for o in wanted if o not in names]
        if unknown or not wanted:
            raise EmbdeployError(
                f"unknown output(s) {', '.join(map(repr, unknown)) or '(none)'}; this model exports {', '.join(names)}"
            )
        return wanted

    def _length_limit(self, max_length) -> int | None:
        positions = self._rt.export.max_positions
        if max_length is None:
            return self.max_length
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise EmbdeployError(f"max_length must be a positive integer, got {max_length!r}")
        if positions is not None and max_length > positions:
            raise EmbdeployError(
                f"max_length {max_length} is more than the model's {positions} positions; pass at most {positions}"
            )
        return max_length

    def _text_tokenizer(self, state: _Tenant):
        if state.tokenizer is None:
            raise EmbdeployError(
                f"{self.path} holds no tokenizer (a base export?), so it cannot encode text; pass token ids to "
                "run(), or open an export written by `embdeploy export` for an extension"
            )
        return state.tokenizer

    def _tokenize(self, state: _Tenant, texts: list[str], max_length) -> dict[str, np.ndarray]:
        limit = self._length_limit(max_length)
        tok = self._text_tokenizer(state)
        with state.tok_lock:  # transformers sets the backend's truncation on every call
            enc = tok(texts, add_special_tokens=True, truncation=limit is not None, max_length=limit,
                      padding=False, return_attention_mask=False, return_token_type_ids=True)
        rows, types = enc["input_ids"], enc.get("token_type_ids")
        empty = [i for i, r in enumerate(rows) if not r]
        if empty:
            raise EmbdeployError(f"texts[{empty[0]}] gives no tokens at all; pass non-empty text")
        return _pad(tok, rows, types)

    def _role_feeds(self, given: dict, K: int) -> dict[str, np.ndarray]:
        """Checked arrays for every role the graph takes."""
        ex = self._rt.export
        ids = check_ids(given["input_ids"], ex.manifest.V + K, "input_ids", f"V={ex.manifest.V} base rows + K={K} extension rows")
        B, S = ids.shape
        if ex.max_positions is not None and S > ex.max_positions:
            raise EmbdeployError(
                f"input_ids has {S} positions, the model only {ex.max_positions}; truncate to {ex.max_positions} "
                "tokens (encode/tokenize do, with max_length)"
            )
        out = {"input_ids": ids}
        roles = set(ex.manifest.roles.values())
        mask = given.get("attention_mask")
        if mask is None:
            mask = np.ones((B, S), dtype=np.int64)
        mask = np.asarray(mask)
        if mask.shape != ids.shape:
            raise EmbdeployError(f"attention_mask has shape {mask.shape}, input_ids {ids.shape}; they must match")
        if mask.dtype == np.bool_:
            mask = mask.astype(np.int64)
        check_ids(mask, 2, "attention_mask", "0 = padding, 1 = token")
        if "attention_mask" in roles:
            out["attention_mask"] = mask
        if "token_type_ids" in roles:
            tt = given.get("token_type_ids")
            tt = np.zeros((B, S), dtype=np.int64) if tt is None else np.asarray(tt)
            if tt.shape != ids.shape:
                raise EmbdeployError(f"token_type_ids has shape {tt.shape}, input_ids {ids.shape}; they must match")
            out["token_type_ids"] = check_ids(tt, ex.type_vocab_size or np.iinfo(np.int64).max, "token_type_ids",
                                              "the model's token type table")
        if "position_ids" in roles:
            pos = given.get("position_ids")
            pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None) if pos is None else np.asarray(pos)
            if pos.shape != ids.shape:
                raise EmbdeployError(f"position_ids has shape {pos.shape}, input_ids {ids.shape}; they must match")
            out["position_ids"] = check_ids(pos, ex.max_positions or np.iinfo(np.int64).max, "position_ids",
                                            "the model's position table")
        return out

    def _run(self, state: _Tenant, by_role: dict, names: list[str], device_outputs: bool) -> dict:
        rt = self._rt
        feeds = {name: np.ascontiguousarray(by_role[role], dtype=rt.input_types[name])
                 for name, role in rt.export.manifest.roles.items()}
        if not (rt.io_binding or state.bound):
            values = state.sess.run(names, {**feeds, **state.tables})
            return dict(zip(names, values))
        binding = state.sess.io_binding()  # one per call: bindings are not shared between threads
        for name, arr in feeds.items():
            binding.bind_cpu_input(name, arr)
        for name, value in state.bound.items():
            binding.bind_ortvalue_input(name, value)
        for name in names:
            binding.bind_output(name, rt.device_type, rt.device_id)
        state.sess.run_with_iobinding(binding)
        if device_outputs:
            return dict(zip(names, binding.get_outputs()))
        return dict(zip(names, binding.copy_outputs_to_cpu()))


@dataclass(frozen=True)
class TokenRow:
    """One text's tokens, unpadded (`Session.tokenize_each`): ids and token types after truncation."""

    ids: list[int]
    types: list[int] | None
    length: int  # tokens before truncation, special tokens included


def _pad(tok, rows: list, types) -> dict[str, np.ndarray]:
    """(B, S) int64 input_ids, attention_mask, token_type_ids: rows padded to the longest, on the tokenizer's side."""
    B, S = len(rows), max(len(r) for r in rows)
    pad = next((i for i in (tok.pad_token_id, tok.eos_token_id) if i is not None), 0)
    ids = np.full((B, S), pad, dtype=np.int64)
    mask = np.zeros((B, S), dtype=np.int64)
    tt = np.zeros((B, S), dtype=np.int64)
    left = getattr(tok, "padding_side", "right") == "left"
    for i, r in enumerate(rows):
        span = slice(S - len(r), S) if left else slice(0, len(r))
        ids[i, span] = r
        mask[i, span] = 1
        if types is not None:
            tt[i, span] = types[i]
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": tt}


def _with_tables(state: _Tenant, tables: dict, rt: _Runtime) -> _Tenant:
    """The same tenant with `tables` fed explicitly (for the self-check of table_binding 'session')."""
    from dataclasses import replace

    bound = {name: rt.device_value(t) for name, t in tables.items()} if rt.binds_tables() else {}
    return replace(state, tables=tables, bound=bound)


def open_session(onnx_dir, providers=None, threads: int | None = None, extension=None, **kwargs) -> Session:
    """`Session(onnx_dir, providers, threads, extension, **kwargs)`."""
    return Session(onnx_dir, providers=providers, threads=threads, extension=extension, **kwargs)


def _as_texts(texts) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    if not isinstance(texts, (list, tuple)):
        raise EmbdeployError(f"texts must be a string or a list of strings, got {type(texts).__name__}")
    if not texts:
        raise EmbdeployError("texts is empty; pass at least one string")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise EmbdeployError(f"texts[{bad[0]}] is a {type(texts[bad[0]]).__name__}, not a string")
    for i, t in enumerate(texts):
        at = lone_surrogate(t)
        if at is not None:
            raise EmbdeployError(f"texts[{i}] holds a lone surrogate (U+{ord(t[at]):04X} at character {at}), "
                                 "which is not text and no tokenizer can read; pass valid Unicode")
    return list(texts)


def lone_surrogate(text: str) -> int | None:
    """The index of the first unpaired surrogate in `text` (not encodable as UTF-8), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def _merge(parts, names: list[str]) -> dict[str, np.ndarray]:
    """Concatenate batches; per-token outputs (B, S, ...) and the masks padded with zeros to the longest sequence."""
    S = max(mask.shape[1] for mask, _ in parts)

    def padded(a: np.ndarray) -> np.ndarray:
        if a.shape[1] == S:
            return a
        widths = [(0, 0), (0, S - a.shape[1])] + [(0, 0)] * (a.ndim - 2)
        return np.pad(a, widths)

    out = {}
    for name in names:
        arrays = [o[name] for _, o in parts]
        per_token = arrays[0].ndim >= 3  # (B, S, H) or (B, S, V+K); pooled outputs are (B, H)
        out[name] = np.concatenate([padded(a) for a in arrays] if per_token else arrays, axis=0)
    out["attention_mask"] = np.concatenate([padded(m) for m, _ in parts], axis=0)
    return out


def _load_tokenizer(directory: Path, V: int, tokens: tuple[str, ...], record: dict | None = None):
    """The extended tokenizer in `directory`; its new tokens must have ids V, V+1, ... in order.

    None when the directory holds no tokenizer (base exports): such a session runs ids only.
    """
    if not any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from ..models import load_tokenizer, refuse_remote_code

    refuse_remote_code(directory, "export directory")
    try:
        tok = load_tokenizer(directory)
    except Exception as e:  # transformers raises OSError/ValueError with long texts
        raise EmbdeployError(f"cannot load the tokenizer in {directory}: {str(e).splitlines()[0]}") from None
    problems = []
    for i, t in enumerate(tokens):
        got = tok.convert_tokens_to_ids(t)
        if got != V + i:
            problems.append(f"token {t!r} has id {got}, the manifest says {V + i}")
    if len(tok) > V + len(tokens):
        problems.append(f"the tokenizer has {len(tok)} tokens, more than V+K = {V + len(tokens)} rows")
    if isinstance(record, dict) and isinstance(record.get("size"), int):
        from ..fingerprint import tokenizer_fingerprint

        if tokenizer_fingerprint(tok, record["size"]) != record.get("fingerprint"):
            problems.append("its base part is not the base tokenizer recorded at export (a base id moved, or its "
                            "normalizer or pre-tokenizer changed): words would reach the wrong rows")
    raise_all(problems[:10], f"the tokenizer in {directory} does not match the extension's rows:")
    return tok
