"""Put extension groups into a transformers model; save and load extension directories.

    ext = extend_model(model, tokenizer, ["hyperkalemia", "troponin"], name="clinical")
    ext.model(**ext.tokenizer("troponin rose", return_tensors="pt"))   # the same model object
    ext.save("clinical-ext")
    ext = load_extension("clinical-ext")    # loads the base it names and checks its fingerprint

What the tokenizer sees: new tokens are added as whole-word added tokens
(matched before pre-tokenization, case-folded when the tokenizer normalizes,
absorbing the space before them), with ids V, V+1, … where V is the number of
rows of the base table. Where the tokenizer is shorter than the table (padded
tables), the gap is filled with special placeholder tokens
`<|embdeploy_reserved_N|>` so that no new id lands on an existing row.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from ..errors import EmbdeployError, FingerprintMismatch, raise_all
from ..fingerprint import rows_fingerprint, table_fingerprint, tokenizer_fingerprint
from ..fsutil import atomic_output_dir
from ..jsonfile import read_versioned
from ..models import BaseInfo, load_base, load_tokenizer, refuse_remote_code, save_tokenizer
from .config import ExtensionConfig
from .init import initial_rows
from .layer import ExtendedEmbedding, ExtendedLMHead

FORMAT = "embdeploy-extension"
FORMAT_VERSION = 1
WEIGHTS = "extension.safetensors"
MANIFEST = "extension.json"
RESERVED = "<|embdeploy_reserved_{}|>"
BASE_TOKENIZER = "base_tokenizer"  # the original tokenizer: subword pieces for init, distillation and eval


@dataclass
class Group:
    name: str
    tokens: list[str]
    first_id: int
    init: dict
    notes: list[str] = field(default_factory=list)

    @property
    def ids(self) -> list[int]:
        return list(range(self.first_id, self.first_id + len(self.tokens)))


@dataclass
class ExtendReport:
    """What `add` did with the requested tokens."""

    added: list[tuple[str, int]]
    skipped: list[tuple[str, str]]  # (token, reason)
    notes: list[str]


def _find_embedding_slots(model: nn.Module, weight: torch.Tensor):
    """(parent, attr) of every nn.Embedding whose weight is the base table.

    Encoder-decoder models often hold the shared table in several modules
    (shared, encoder.embed_tokens, decoder.embed_tokens); all of them are wrapped.
    """
    slots = []
    for name, mod in model.named_modules(remove_duplicate=False):
        for attr, child in mod.named_children():
            if isinstance(child, nn.Embedding) and child.weight is weight:
                slots.append((mod, attr))
    return slots


class Extension:
    """A base model with stacked, named extension groups. The model is modified in place."""

    def __init__(self, model, tokenizer, base_info: BaseInfo | None = None):
        emb = model.get_input_embeddings()
        if isinstance(emb, ExtendedEmbedding):
            raise EmbdeployError("this model already carries an embdeploy extension; use its Extension object to add groups")
        if not isinstance(emb, nn.Embedding):
            raise EmbdeployError(
                f"{type(model).__name__}.get_input_embeddings() is a {type(emb).__name__}; embdeploy needs an nn.Embedding table"
            )
        if not getattr(tokenizer, "is_fast", False):
            raise EmbdeployError("embdeploy needs a fast tokenizer (tokenizer.json); load it with use_fast=True")
        self.model = model
        self.tokenizer = tokenizer
        self.base_tokenizer = copy.deepcopy(tokenizer)  # the original tokenization, for init and distillation
        self.base_info = base_info or BaseInfo(
            ref=str(getattr(model.config, "_name_or_path", "")),
            path=str(getattr(model.config, "_name_or_path", "")),
            task="",
            model_class=type(model).__name__,
        )
        base_weight = emb.weight
        self.V, self.H = base_weight.shape
        self.embed_tables = nn.ParameterDict()
        self.head_tables: nn.ParameterDict | None = None
        self.groups: list[Group] = []
        self.training_records: list[dict] = []
        self.reserved = 0

        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is not None and not isinstance(head, nn.Linear):
            head = None
        self.head_mode = "none"
        if head is not None:
            if head.weight is base_weight or head.weight.data_ptr() == base_weight.data_ptr():
                self.head_mode = "tied"
            elif head.weight.shape == base_weight.shape:
                self.head_mode = "untied"
            else:
                raise EmbdeployError(
                    f"the LM head has {head.weight.shape[0]} rows but the input table has {self.V}; "
                    "embdeploy needs one head row per input row"
                )
        self.base_fingerprint = table_fingerprint(base_weight)
        self.head_fingerprint = table_fingerprint(head.weight) if self.head_mode == "untied" else None

        # Freeze everything: only extension tables will require grad.
        for p in model.parameters():
            p.requires_grad_(False)
        slots = _find_embedding_slots(model, base_weight)
        self.embedding_modules = []
        for parent, attr in slots:
            wrapped = ExtendedEmbedding(getattr(parent, attr), self.embed_tables)
            setattr(parent, attr, wrapped)
            self.embedding_modules.append(wrapped)
        self.head_module = None
        if self.head_mode != "none":
            self.head_tables = self.embed_tables if self.head_mode == "tied" else nn.ParameterDict()
            self.head_module = ExtendedLMHead(head, self.head_tables, tied=self.head_mode == "tied")
            model.set_output_embeddings(self.head_module)
        self._check_tokenizer_fits()

    # ----------------------------------------------------------------- properties
    @property
    def K(self) -> int:
        return sum(len(g.tokens) for g in self.groups)

    @property
    def tokens(self) -> list[str]:
        return [t for g in self.groups for t in g.tokens]

    @property
    def token_ids(self) -> dict[str, int]:
        return {t: i for g in self.groups for t, i in zip(g.tokens, g.ids)}

    def embed_table(self) -> torch.Tensor:
        """The K×H new input rows, in id order."""
        return self.embedding_modules[0].extension_table().detach()

    def head_table(self) -> torch.Tensor | None:
        """The K×H new head rows (the same rows as `embed_table` when tied); None without a head."""
        return self.head_module.extension_table().detach() if self.head_module is not None else None

    def base_table(self) -> torch.Tensor:
        return self.embedding_modules[0].base.weight

    def base_head_table(self) -> torch.Tensor | None:
        return self.head_module.base.weight if self.head_module is not None else None

    def extension_parameters(self) -> list[nn.Parameter]:
        """Exactly the trainable parameters: the groups' rows (and untied head rows)."""
        params = list(self.embed_tables.values())
        if self.head_mode == "untied":
            params += list(self.head_tables.values())
        return params

    def extension_fingerprint(self) -> str:
        return rows_fingerprint(self.embed_table(), self.head_table() if self.head_mode == "untied" else None)

    def verify_base(self) -> None:
        """Recompute the base fingerprints; raise if any base row changed."""
        if table_fingerprint(self.base_table()) != self.base_fingerprint:
            raise FingerprintMismatch("the base embedding table changed; this is a bug in the code that trained it")
        if self.head_mode == "untied" and table_fingerprint(self.base_head_table()) != self.head_fingerprint:
            raise FingerprintMismatch("the base LM head changed; this is a bug in the code that trained it")

    # ----------------------------------------------------------------- tokenizer
    def _check_tokenizer_fits(self):
        n = len(self.tokenizer)
        if n > self.V:
            raise EmbdeployError(
                f"the tokenizer has {n} tokens but the embedding table only {self.V} rows: ids {self.V}..{n - 1} "
                "have no row and would collide with new ids. Resize the model's embeddings to the tokenizer first."
            )

    def _reserve_padding_rows(self):
        # Padded tables (V > len(tokenizer)): fill the gap with special placeholders so the
        # tokenizer's next id is V. The placeholders map onto the padding rows, which exist.
        from transformers import AddedToken

        gap = self.V - len(self.tokenizer)
        if gap > 0:
            start = len(self.tokenizer)
            self.tokenizer.add_tokens([AddedToken(RESERVED.format(start + i), special=True) for i in range(gap)], special_tokens=True)
            self.reserved += gap

    def _classify(self, tokens, strict: bool):
        vocab = self.base_tokenizer.get_vocab()
        added = set(self.tokens)
        keep, skipped, notes = [], [], []
        pre = getattr(self.base_tokenizer.backend_tokenizer, "pre_tokenizer", None)
        norm = tokenizer_form(self.base_tokenizer)
        # Tokens are compared as the tokenizer will see them: two that normalize alike would get two
        # ids, and the tokenizer would only ever produce one of them (the other row dead).
        seen = {norm(t): t for t in self.tokens}
        for t in tokens:
            if t in added:
                skipped.append((t, "already added by an earlier extension group"))
                continue
            other = seen.get(norm(t))
            if other is not None:
                where = "an earlier extension group" if other in added else "this list"
                skipped.append((t, f"the same token as {other!r} ({where}) once the tokenizer normalizes it "
                                   f"(both read as {norm(t)!r}); a second row would never be used"))
                continue
            why = already_one_token(self.base_tokenizer, t, vocab)
            if why:
                skipped.append((t, why))
                continue
            if pre is not None and len(pre.pre_tokenize_str(t)) > 1:
                notes.append(
                    f"{t!r} would be split at pre-tokenization; as an added token it is matched as one unit "
                    "in text before that split"
                )
            keep.append(t)
            seen[norm(t)] = t
        if strict and skipped:
            raise_all([f"{t!r}: {why}" for t, why in skipped], "tokens that cannot be added (strict mode):")
        return keep, skipped, notes

    # ----------------------------------------------------------------- adding groups
    def add(self, config: ExtensionConfig) -> ExtendReport:
        """Add one named group of tokens, initialised as `config.init` says."""
        if any(g.name == config.name for g in self.groups):
            raise EmbdeployError(f"an extension group named {config.name!r} already exists; pass another --name")
        keep, skipped, notes = self._classify(config.tokens, config.strict)
        if not keep:
            raise EmbdeployError(
                "none of the tokens is new: " + "; ".join(f"{t!r} {why}" for t, why in skipped[:5])
                + ". Nothing to add."
            )
        self._reserve_padding_rows()
        first = self.V + self.K
        if len(self.tokenizer) != first:
            raise EmbdeployError(f"tokenizer length {len(self.tokenizer)} does not match V+K={first}; the tokenizer was changed outside embdeploy")
        self.tokenizer.add_tokens([new_added_token(t) for t in keep])
        got = [self.tokenizer.convert_tokens_to_ids(t) for t in keep]
        want = list(range(first, first + len(keep)))
        if got != want:
            raise EmbdeployError(f"the tokenizer assigned ids {got[:5]}… instead of {want[:5]}…; cannot place new rows safely")
        rows, head_rows, init_notes = initial_rows(
            config, keep, self.base_table(), self.base_tokenizer,
            self.base_head_table() if self.head_mode == "untied" else None,
        )
        self._add_tables(config.name, rows, head_rows)
        group = Group(config.name, keep, first, config.to_json(), notes + init_notes)
        self.groups.append(group)
        return ExtendReport(added=list(zip(keep, group.ids)), skipped=skipped, notes=notes + init_notes)

    def _add_tables(self, name: str, rows: torch.Tensor, head_rows: torch.Tensor | None):
        dev = self.base_table().device
        self.embed_tables[name] = nn.Parameter(rows.to(dev, self.base_table().dtype).clone(), requires_grad=True)
        if self.head_mode == "untied":
            if head_rows is None:
                head_rows = torch.zeros_like(rows)
            self.head_tables[name] = nn.Parameter(head_rows.to(dev, self.base_table().dtype).clone(), requires_grad=True)

    # ----------------------------------------------------------------- persistence
    def manifest(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created_by": f"embdeploy {__version__}",
            "base_model": self.base_info.to_json(),
            "base_fingerprint": {"embed": self.base_fingerprint, "head": self.head_fingerprint},
            "extension_fingerprint": self.extension_fingerprint(),
            "V": self.V,
            "K": self.K,
            "H": self.H,
            "dtype": str(self.base_table().dtype).replace("torch.", ""),
            "head": self.head_mode,
            "reserved_placeholders": self.reserved,
            "groups": [
                {"name": g.name, "first_id": g.first_id, "count": len(g.tokens), "init": g.init, "notes": g.notes}
                for g in self.groups
            ],
            "tokens": [{"token": t, "id": i, "group": g.name} for g in self.groups for t, i in zip(g.tokens, g.ids)],
            "base_tokenizer": self.base_tokenizer_record(),
            "training": self.training_records,
        }

    def base_tokenizer_record(self) -> dict:
        """What proves the extended tokenizer's base part is the base tokenizer (checked at every load)."""
        n = len(self.base_tokenizer)
        return {"size": n, "fingerprint": tokenizer_fingerprint(self.base_tokenizer, n)}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"embed.{n}": p.detach().cpu().contiguous() for n, p in self.embed_tables.items()}
        if self.head_mode == "untied":
            out.update({f"head.{n}": p.detach().cpu().contiguous() for n, p in self.head_tables.items()})
        return out

    def save(self, out, overwrite: bool = False, inputs=()) -> Path:
        """Write extension.safetensors, extension.json and the extended tokenizer, atomically.

        `overwrite` replaces only an extension directory, never the base model or another of `inputs`.
        """
        from safetensors.torch import save_file

        if not self.groups:
            raise EmbdeployError("the extension has no tokens yet; add a group before saving")
        inputs = (*inputs, self.base_info.path)
        with atomic_output_dir(out, overwrite=overwrite, kind="extension", inputs=inputs) as tmp:
            save_file(self.state_tensors(), str(tmp / WEIGHTS), metadata={"format": FORMAT})
            save_tokenizer(self.tokenizer, tmp)
            save_tokenizer(self.base_tokenizer, tmp / BASE_TOKENIZER)
            (tmp / MANIFEST).write_text(json.dumps(self.manifest(), indent=2, ensure_ascii=False) + "\n")
        return Path(out)


def tokenizer_form(tokenizer):
    """token -> the string the tokenizer matches it as (its normalizer applied; identity without one)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    norm = getattr(backend, "normalizer", None)
    return norm.normalize_str if norm is not None else (lambda s: s)


def new_added_token(token: str):
    """How a new token enters the tokenizer: matched in normalized text, as a whole word, eating the space before it."""
    from transformers import AddedToken

    return AddedToken(token, single_word=True, lstrip=True, normalized=True)


def already_one_token(base_tokenizer, token: str, vocab: dict | None = None) -> str | None:
    """Why `extend` would skip `token` as not new (a reason to show), or None when it adds it."""
    vocab = base_tokenizer.get_vocab() if vocab is None else vocab
    pieces = base_tokenizer(token, add_special_tokens=False)["input_ids"]
    if token in vocab or (len(pieces) == 1 and pieces[0] != base_tokenizer.unk_token_id):
        return f"already one token in the vocabulary (id {vocab.get(token, pieces[0] if pieces else '?')})"
    return None


def extend_model(model, tokenizer, tokens_or_config, name: str = "default", init: str = "subword-mean", **kw) -> Extension:
    """Extend `model` (in place) with new tokens; returns the Extension handle.

    `tokens_or_config` is a list of token strings or an ExtensionConfig. Call
    `ext.add(ExtensionConfig(...))` to stack more named groups.
    """
    cfg = tokens_or_config if isinstance(tokens_or_config, ExtensionConfig) else ExtensionConfig(
        tokens=list(tokens_or_config), name=name, init=init, **kw
    )
    ext = Extension(model, tokenizer)
    ext.last_report = ext.add(cfg)
    return ext


# --------------------------------------------------------------------- loading
def read_manifest(directory) -> dict:
    d = Path(directory)
    if not d.is_dir():
        raise EmbdeployError(f"extension directory {d} does not exist; pass a directory written by `embdeploy extend`")
    mf = d / MANIFEST
    if not mf.is_file():
        raise EmbdeployError(f"{d} is not an extension directory (no {MANIFEST}); pass a directory written by `embdeploy extend`")
    m = read_versioned(mf, kind=FORMAT, kind_key="format", what="an embdeploy extension manifest",
                       fix="the file is corrupted, re-run `embdeploy extend`", versions=(FORMAT_VERSION,),
                       upgrade="Re-create the extension with this version or upgrade embdeploy.")
    problems = []
    for k in ("V", "K", "H"):
        if not isinstance(m.get(k), int) or m[k] < 0:
            problems.append(f"{k} is {m.get(k)!r}, expected a non-negative integer")
    toks = m.get("tokens")
    if not isinstance(toks, list):
        problems.append("tokens is missing" if toks is None else f"tokens is a {type(toks).__name__}, expected a list")
    elif any(not isinstance(t, dict) or not isinstance(t.get("token"), str) for t in toks):
        problems.append("tokens must be a list of objects with a string token and an integer id")
    for name in ("base_model", "base_fingerprint"):
        if not isinstance(m.get(name), dict):
            problems.append(f"{name} is missing" if name not in m else f"{name} is not an object")
    if not isinstance(m.get("groups"), list):
        problems.append("groups is missing" if "groups" not in m else "groups is not a list")
    fp = m.get("extension_fingerprint")
    if not (isinstance(fp, str) and fp.startswith("sha256:")):
        problems.append("extension_fingerprint is missing; without it the rows cannot be checked against the "
                        "manifest (re-save the extension with `embdeploy extend`/`train`)")
    raise_all(problems, f"{mf} is inconsistent:")
    if len(toks) != m["K"]:
        problems.append(f"K is {m['K']} but {len(toks)} tokens are listed")
    for j, t in enumerate(toks):
        if t.get("id") != m["V"] + j:
            problems.append(f"token {t.get('token')!r} has id {t.get('id')}, expected {m['V'] + j} (ids follow V in order)")
            break
    if sum(g.get("count", 0) for g in m.get("groups", [])) != m["K"]:
        problems.append("group counts do not add up to K")
    raise_all(problems, f"{mf} is inconsistent:")
    return m


def _read_tables(d: Path, m: dict) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    wf = d / WEIGHTS
    if not wf.is_file():
        raise EmbdeployError(f"{wf} is missing; the extension directory is incomplete, re-run `embdeploy extend`")
    try:
        tensors = load_file(str(wf))
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise EmbdeployError(f"{wf} is corrupted or truncated ({str(e).splitlines()[0]}); re-create the extension") from None
    problems = []
    for g in m["groups"]:
        for kind in ("embed",) + (("head",) if m.get("head") == "untied" else ()):
            key = f"{kind}.{g['name']}"
            t = tensors.get(key)
            if t is None:
                problems.append(f"tensor {key} is missing")
            elif tuple(t.shape) != (g["count"], m["H"]):
                problems.append(f"tensor {key} has shape {tuple(t.shape)}, the manifest says ({g['count']}, {m['H']})")
            elif not torch.isfinite(t.float()).all():
                problems.append(f"tensor {key} contains NaN or Inf")
    raise_all(problems, f"{wf} does not match {MANIFEST}:")
    return tensors


def _load_recorded_base(d: Path, m: dict, base_model=None):
    """(model, BaseInfo) for the base an extension names, or for `base_model` when the user gives one.

    The recorded absolute path is tried first (the same machine), then the portable reference
    (`minilm`, a hub id, the path as given). Whichever loads, the caller checks its fingerprint.
    """
    rec = m["base_model"]
    task = rec.get("task") or None
    if base_model is not None:
        model, _, info = load_base(base_model, task=task)
        return model, info
    tried = []
    for ref in dict.fromkeys(r for r in (rec.get("path"), rec.get("portable_ref"), rec.get("ref")) if r):
        try:
            model, _, info = load_base(ref, task=task)
        except EmbdeployError as e:
            tried.append(f"{ref}: {str(e).splitlines()[0]}")
            continue
        # Found again by its absolute path: keep the reference the user gave, so a save stays portable.
        info.ref = rec.get("ref") or info.ref
        info.portable_ref = rec.get("portable_ref") or info.portable_ref
        return model, info
    lines = "\n".join(f"  - {t}" for t in tried) or "  - extension.json names no base model"
    raise EmbdeployError(
        f"the base model of the extension in {d} is not found here:\n{lines}\n"
        "Pass it with --base-model PATH_OR_ALIAS (its directory, `minilm` for the built-in model, or a hub id); "
        "it is checked against the fingerprint recorded in extension.json"
    )


def load_extension(directory, model=None, tokenizer=None, base_model=None) -> Extension:
    """Load an extension directory onto `model` (or onto `base_model`, a path or alias, or else the base it names).

    Refuses a base whose embedding table (or untied head) fingerprint differs from the one recorded.
    """
    d = Path(directory)
    m = read_manifest(d)
    refuse_remote_code(d, "extension directory")  # the tokenizers are loaded below, its base model before
    tensors = _read_tables(d, m)
    info = None
    if model is None:
        model, info = _load_recorded_base(d, m, base_model)
    emb = model.get_input_embeddings()
    fp = table_fingerprint(emb.weight)
    if fp != m["base_fingerprint"]["embed"] or emb.weight.shape != (m["V"], m["H"]):
        raise FingerprintMismatch(
            f"the extension in {d} was made for a base whose embedding table has fingerprint "
            f"{m['base_fingerprint']['embed'][:23]}… ({m['V']}×{m['H']}); this model's table is "
            f"{fp[:23]}… ({tuple(emb.weight.shape)[0]}×{tuple(emb.weight.shape)[1]}). "
            f"Load it onto the base it was made for ({m['base_model'].get('ref')})"
            + (f"; --base-model {base_model} is another model." if base_model is not None else ".")
        )
    try:
        tok = tokenizer or load_tokenizer(d)
    except Exception as e:
        raise EmbdeployError(f"cannot load the extended tokenizer in {d}: {str(e).splitlines()[0]}") from None
    try:
        base_tok = load_tokenizer(d / BASE_TOKENIZER)
    except Exception as e:
        raise EmbdeployError(f"cannot load the original tokenizer in {d / BASE_TOKENIZER}: {str(e).splitlines()[0]}") from None
    # Build on the plain model with the original tokenizer, then restore groups and the extended tokenizer.
    ext = Extension(model, base_tok, info)
    if ext.head_fingerprint != m["base_fingerprint"].get("head"):
        raise FingerprintMismatch(
            f"the extension in {d} was made for a base whose LM head has fingerprint {m['base_fingerprint'].get('head')}; "
            f"this model's head differs ({ext.head_fingerprint}). Load it onto the base it was made for."
        )
    ext.tokenizer = tok
    ext.reserved = m.get("reserved_placeholders", 0)
    for g in m["groups"]:
        names = [t["token"] for t in m["tokens"] if t["group"] == g["name"]]
        ext.groups.append(Group(g["name"], names, g["first_id"], g.get("init", {}), g.get("notes", [])))
        ext._add_tables(g["name"], tensors[f"embed.{g['name']}"], tensors.get(f"head.{g['name']}"))
    ext.training_records = list(m.get("training", []))
    if ext.extension_fingerprint() != m["extension_fingerprint"]:
        raise EmbdeployError(
            f"the rows in {d / WEIGHTS} do not match the extension_fingerprint in {d / MANIFEST} (changed after "
            "it was saved, or the two files come from different revisions); re-create the extension, or save "
            "it again with `embdeploy extend`/`train`"
        )
    problems = []
    for t in m["tokens"]:
        got = tok.convert_tokens_to_ids(t["token"])
        if got != t["id"]:
            problems.append(f"token {t['token']!r}: the saved tokenizer gives id {got}, the manifest says {t['id']}")
    if len(tok) != m["V"] + m["K"]:
        problems.append(f"the tokenizer has {len(tok)} tokens, V+K = {m['V'] + m['K']}: tokens were added or removed "
                        "outside embdeploy (every stage refuses that)")
    problems += tokenizer_problems(tok, base_tok, m.get("base_tokenizer"), d)
    raise_all(problems[:10], f"the tokenizer in {d} does not match {MANIFEST}:")
    return ext


def tokenizer_problems(tok, base_tok, record: dict | None, d: Path) -> list[str]:
    """The extended tokenizer's base part, and the saved original tokenizer, against the fingerprint recorded at extend.

    Extensions written before the record existed are checked against their own base_tokenizer/ directory.
    """
    n = record.get("size") if isinstance(record, dict) else None
    n = n if isinstance(n, int) and n > 0 else len(base_tok)
    want = record.get("fingerprint") if isinstance(record, dict) else None
    saved = tokenizer_fingerprint(base_tok, n)
    problems = []
    if want is not None and saved != want:
        problems.append(f"the original tokenizer in {d / BASE_TOKENIZER} is not the one recorded at extend "
                        "(its vocabulary or normalization changed); re-create the extension")
    if tokenizer_fingerprint(tok, n) != (want or saved):
        problems.append("the extended tokenizer's base part is not the base tokenizer (a base id moved, a token "
                        "was renamed, or its normalizer or pre-tokenizer changed), so the deployed model would map "
                        "words to the wrong rows; re-create the extension with `embdeploy extend`")
    return problems
