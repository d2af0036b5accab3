"""ONNX Runtime, set up in one place: the import, providers, session options, session creation, feeds.

Every stage that opens an ORT session (validate, runtime, bench) goes through
`create_session`, with one fallback policy: ORT only logs a warning when the
provider asked for cannot start and runs on the next one (CPU); a provider
that was asked for explicitly is therefore checked and a fallback refused. Only
the runtime's automatic choice (no providers given: CUDA when this build has it,
else CPU) may fall back, and says so in the log.

    so = session_options(threads=1, sequential=True)
    sess = create_session("onnx-dir/model.onnx", resolve_providers("cpu"), so)

Swap exports take another extension table per session through
`swap_session_options` (CPU), or per run as a feed.
"""

from __future__ import annotations

import contextlib
import io
import logging
import weakref

import numpy as np

from .errors import EmbdeployError

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
PROVIDER_ALIASES = {"cpu": CPU, "cuda": CUDA}
ORT_INT = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}
ORT_TO_NUMPY = {**ORT_INT, "tensor(float)": np.float32, "tensor(float16)": np.float16,
                "tensor(double)": np.float64, "tensor(bool)": np.bool_}
_preloaded = False


# --------------------------------------------------------------------------- the module


def import_ort(cuda: bool = False):
    """The onnxruntime module; an EmbdeployError naming the extra to install when it is missing.

    cuda=True (the caller is about to open a CUDA session) first loads the CUDA
    and cuDNN libraries that onnxruntime-gpu's `cuda`/`cudnn` extras install as
    nvidia-* wheels. Without that, a process that has not imported a CUDA build
    of torch finds none of them and ORT quietly falls back to the CPU.
    """
    try:
        import onnxruntime
    except ImportError:
        raise EmbdeployError(
            "onnxruntime is not installed; install `embdeploy[cpu]` (or `embdeploy[gpu]` on a CUDA machine)"
        ) from None
    if cuda:
        _preload_cuda(onnxruntime)
    return onnxruntime


def _preload_cuda(ort) -> None:
    global _preloaded  # once per process: it loads shared libraries
    if _preloaded or CUDA not in ort.get_available_providers() or not hasattr(ort, "preload_dlls"):
        return
    _preloaded = True
    # preload_dlls prints its findings to stdout, which would spoil `--json` output.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(Exception):
        ort.preload_dlls()
    # What is still missing shows as a session that runs on CPU; create_session checks for that and says so.


# --------------------------------------------------------------------------- providers


def provider_name(p) -> str:
    """The ORT name of a provider entry: a name or a (name, options) pair."""
    return p[0] if isinstance(p, (tuple, list)) else p


def wants_cuda(providers) -> bool:
    """Whether an ORT provider list (names or (name, options) pairs) asks for CUDA."""
    return any(provider_name(p) == CUDA for p in providers)


def resolve_providers(providers=None) -> list:
    """ORT provider list for `providers`: None (CUDA when available, then CPU), or names.

    Accepts "cpu,cuda", ["cuda", "cpu"], full ORT names, and (name, options) pairs.
    A provider this onnxruntime build lacks is refused with the list of available ones.
    """
    ort = import_ort()
    available = ort.get_available_providers()
    if providers is None:
        return [CUDA, CPU] if CUDA in available else [CPU]
    if isinstance(providers, str):
        providers = [p for p in providers.split(",") if p.strip()]
    out, unknown = [], []
    for p in providers:
        name, options = p if isinstance(p, (tuple, list)) else (p, None)
        if not isinstance(name, str):
            raise EmbdeployError(f"a provider is a name like 'cpu' or 'cuda', got {name!r}")
        full = PROVIDER_ALIASES.get(name.strip().lower(), name.strip())
        if full not in available:
            unknown.append(name)
        else:
            out.append((full, options) if options else full)
    if unknown or not out:
        raise EmbdeployError(
            f"execution provider(s) {', '.join(map(repr, unknown)) or '(none given)'} not available in this "
            f"onnxruntime {ort.__version__}; available: {', '.join(available)} (short names: "
            f"{', '.join(k for k, v in PROVIDER_ALIASES.items() if v in available)}). "
            "CUDA needs onnxruntime-gpu (`embdeploy[gpu]`) and an NVIDIA GPU"
        )
    return out


def require_provider(sess, wanted: str, model_path) -> None:
    """Refuse a session that silently fell back from `wanted` (ORT only logs a warning)."""
    used = sess.get_providers()
    if wanted not in used:
        raise EmbdeployError(
            f"ONNX Runtime could not start {wanted} for {model_path} (the session would run on {', '.join(used)}); "
            "check nvidia-smi and that onnxruntime-gpu's CUDA and cuDNN libraries are installed "
            "(`pip install onnxruntime-gpu[cuda,cudnn]`), or use the CPU provider"
        )


# --------------------------------------------------------------------------- sessions


def session_options(threads: int | None = None, *, sequential: bool = False, disable_prepacking: bool = False):
    """SessionOptions: `threads` intra-op threads (None: ORT's choice) and one inter-op thread.

    `sequential` for timing (bench). `disable_prepacking`: MatMul/Gemm weights are otherwise
    re-laid out into a private buffer per session (bench's memory measurements compare both).
    """
    ort = import_ort()
    so = ort.SessionOptions()
    so.log_severity_level = 3  # swap graphs: ORT notes its overridable initializers at every load
    if threads is not None:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    if sequential:
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if disable_prepacking:
        so.add_session_config_entry("session.disable_prepacking", "1")
    return so


def create_session(model_path, providers, so=None, *, explicit: bool = True):
    """An InferenceSession on `model_path` with `providers` (an ORT list, see resolve_providers).

    When the first provider does not start, ORT falls back silently: refused when it was asked
    for (`explicit`), a logged warning for an automatic choice.
    """
    ort = import_ort(cuda=wants_cuda(providers))
    try:
        sess = ort.InferenceSession(str(model_path), so if so is not None else session_options(), providers=providers)
    except Exception as e:  # ORT raises its own Fail/InvalidGraph types
        raise EmbdeployError(f"ONNX Runtime cannot load {model_path}: {str(e).splitlines()[0]}") from None
    wanted = provider_name(providers[0])
    if explicit:
        require_provider(sess, wanted, model_path)
    elif wanted not in sess.get_providers():
        log.warning("ONNX Runtime could not start %s for %s (the session runs on %s); check the CUDA/cuDNN "
                    "installation, or pass providers=['cpu']", wanted, model_path, ", ".join(sess.get_providers()))
    return sess


# --------------------------------------------------------------------------- feeds


def role_arrays(input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The array for every input role a graph may take, from ids and (optionally) a mask.

    Missing mask: all ones; token types: zeros; positions counted along the mask, so
    left padding gets the positions the model saw in training.
    """
    ids = np.asarray(input_ids)
    mask = np.ones_like(ids, dtype=np.int64) if attention_mask is None else np.asarray(attention_mask, np.int64)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": np.zeros_like(ids, dtype=np.int64),
        "position_ids": np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int64),
    }


def empty_past(inp, batch: int) -> np.ndarray | None:
    """A zero-length KV cache for ORT input `inp` (a NodeArg): (batch, heads, 0, head_dim) in its dtype.

    The heads and head_dim axes must be fixed in the graph; None when they are not
    (or the input is not a 4-D float tensor), so the caller can name the input.
    """
    dtype = ORT_TO_NUMPY.get(inp.type)
    dims = list(inp.shape)
    if dtype is None or not np.issubdtype(dtype, np.floating) or len(dims) != 4:
        return None
    if not all(isinstance(d, int) for d in (dims[1], dims[3])):
        return None
    return np.zeros((batch, dims[1], 0, dims[3]), dtype)


# --------------------------------------------------------------------------- per-session tables

# ORT uses an added initializer's buffer in place without holding a Python reference: the
# OrtValues must outlive every session made from the options (else a use-after-free, seen as a
# segfault). InferenceSession keeps its SessionOptions, so tying them to the options suffices.
_KEEP_ALIVE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def add_initializer(so, name: str, table) -> None:
    """Supply initializer `name` of sessions made from `so` from `table` (used in place on the CPU)."""
    ort = import_ort()
    table = np.ascontiguousarray(table)
    value = ort.OrtValue.ortvalue_from_numpy(table)  # holds `table`; ORT holds neither
    try:
        so.add_initializer(name, value)
    except Exception as e:  # ORT raises a bare RuntimeError/Fail, its reason after the last " : "
        reason = str(e).split(" : ")[-1].strip()
        raise EmbdeployError(
            f"ONNX Runtime refused initializer {name!r} ({reason}); use a fresh SessionOptions per extension table"
        ) from None
    _KEEP_ALIVE.setdefault(so, []).append(value)


def swap_session_options(so, ext_table, head_ext=None):
    """Make ONNX Runtime sessions created with `so` use these extension tables.

    For models written by `rewrite_swap`: `ext_table` (K, H) replaces
    `embdeploy_ext_embed`, `head_ext` (K, H) replaces `embdeploy_ext_head` (untied
    head only). K may differ from the exported extension. The dtype must be the
    model's (e.g. float16 for an fp16 export); a wrong dtype or H fails when the
    session runs. Uses `SessionOptions.add_initializer`, so each name can be set
    once per SessionOptions; on the CPU the buffers are used in place, not copied.

    CPU sessions only. A CUDA session ignores a CPU initializer it planned for
    the GPU (only a log warning; the file's table is used) and refuses a GPU
    one that ORT allocated ("Buffer containing the initializer must be owned
    by the user"; both in perf/README.md, CUDA). On CUDA,
    feed the table as the graph input of the same name instead (the rewrite
    declares one); `embdeploy.runtime.Session` does that by default.
    Returns `so`.
    """
    from .onnx import EXT_EMBED, EXT_HEAD  # the names rewrite_swap gives the tables

    ext = np.ascontiguousarray(_as_table(ext_table, "ext_table"))
    tables = {EXT_EMBED: ext}
    if ext.shape[0] == 0:
        raise EmbdeployError("ext_table has 0 rows; a swap-mode model needs at least one extension row")
    if head_ext is not None:
        head = np.ascontiguousarray(_as_table(head_ext, "head_ext"))
        if head.shape != ext.shape:
            raise EmbdeployError(f"head_ext has shape {head.shape} but ext_table has {ext.shape}; they must match")
        tables[EXT_HEAD] = head
    for name, table in tables.items():
        add_initializer(so, name, table)
    return so


def _as_table(table, what: str) -> np.ndarray:
    arr = np.asarray(table)
    if arr.ndim != 2:
        raise EmbdeployError(f"{what} must be a 2-D (rows, hidden) array, got shape {arr.shape}")
    return arr
