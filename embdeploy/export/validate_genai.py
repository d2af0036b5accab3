"""The validation gate of a genai export: ONNX Runtime and onnxruntime-genai against PyTorch.

    report = validate_genai(manifest, ext)   # raises ValidationFailed on any failed check

Checks, every one against the extended PyTorch model:

    prefill          rows holding every new id (texts with the new tokens, then the ids fed directly),
                     run through model.onnx with an empty KV cache; logits compared at every position
    decode step      the prefill's present.* fed back with one more token (the row's last); its logits
                     compared with PyTorch's full-sequence logits at that position
    generation       greedy decoding through onnxruntime-genai (its cache, mask and search) equals
                     transformers' `generate` token for token, on prompts holding new tokens; prompts
                     where PyTorch's next token is a new id are searched for and included, so emitting
                     new tokens is shown where the rows make it happen
    swap             a replacement table (rows permuted and perturbed, one new token's row arranged so
                     it wins the argmax after a prompt) fed per generator with `set_model_input`: the
                     generation (which then starts with that new id) equals PyTorch's with that table;
                     the prefill/decode logits with that table are compared too

The cache tensors' shapes, the mask and the input names come from genai_config.json
(`GenaiInterface`), never from the model family. onnxruntime-genai's tokenizer
(onnxruntime-extensions) is compared with transformers' on the probe texts and the
texts where it differs are listed as notes: it does not implement the `lstrip` and
`single_word` flags embdeploy's new tokens carry, so a new token after whitespace
differs. `embdeploy.runtime.generate` tokenizes with transformers for that reason.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np

from ..errors import EmbdeployError, FingerprintMismatch, ValidationFailed
from ..ort import create_session
from .genai import GenaiInterface, import_genai, read_tables
from .validate import (PROVIDERS, Probe, ValidationReport, _compare, _extension_rows, _replacement,
                       tolerance_for)

NEW_PER_ROW = 16  # new ids per probe row
MAX_NEW_TOKENS = 8  # generated per generation probe
MAX_PROMPTS = 4  # generation prompts (plus the ones where a new token comes next)


def validate_genai(m, ext, provider: str = "cpu", shown_as=None) -> ValidationReport:
    """Validate the genai export described by manifest `m` (read from its directory) against `ext`."""
    t0 = time.perf_counter()
    if m.base_fingerprint.get("embed") != ext.base_fingerprint:
        raise FingerprintMismatch(
            f"{m.path} was exported from another base (embedding fingerprint {str(m.base_fingerprint.get('embed'))[:23]}…, "
            f"this extension's base has {ext.base_fingerprint[:23]}…); validate with the extension it was exported from"
        )
    if (m.V, m.K, m.H) != (ext.V, ext.K, ext.H):
        raise EmbdeployError(f"{m.path} holds V={m.V}, K={m.K}, H={m.H} but the extension has V={ext.V}, K={ext.K}, "
                             f"H={ext.H}; validate with the extension it was exported from")
    report = ValidationReport(str(shown_as or m.path), m.mode, m.precision, provider, tolerance_for(m.precision, provider))
    report.new_ids_checked = ext.K
    if m.extension_fingerprint != ext.extension_fingerprint():
        report.extension_fingerprint_matches = False
        report.notes.append("the extension's rows differ from the ones recorded at export; the numbers compare "
                            "the export with the extension given now")
    iface = GenaiInterface.read(m.path)
    rows = _probe_rows(ext)
    with _eval(ext.model):
        sess = create_session(m.model_path, PROVIDERS[provider])
        tables = read_tables(m)  # swap: the exported rows, fed like any request's table
        refs = _logits_checks(sess, iface, ext, rows, tables, report, "")
        prompts = _prompts(ext, rows, refs, report)
        og = import_genai()
        model = og.Model(str(m.path))
        _tokenizer_notes(og, model, ext, report)
        for name, ids in prompts:
            _generation_check(og, model, iface, ext, name, ids, tables, report)
        if m.mode == "swap":
            _swap_checks(og, model, sess, iface, ext, m, rows, prompts, report)
        del model, sess
    report.seconds = time.perf_counter() - t0
    if not report.passed:
        lines = report.failures()
        shown = "\n".join(f"  - {ln}" for ln in lines[:12]) + (f"\n  … {len(lines) - 12} more" if len(lines) > 12 else "")
        err = ValidationFailed(f"validation of {report.onnx_dir} failed ({len(lines)} problem(s)):\n{shown}")
        err.report = report
        raise err
    return report


def validate_genai_dir(onnx_dir, ext_dir=None, provider: str = "cpu", base_model=None) -> ValidationReport:
    """For `embdeploy validate` on a genai export: every file verified, the extension loaded, the gate run."""
    from pathlib import Path

    from ..extend.model import load_extension
    from .manifest import ExportManifest

    m = ExportManifest.verify(onnx_dir)
    ext_dir = ext_dir or m.extension_dir
    if not ext_dir or not Path(ext_dir).is_dir():
        raise EmbdeployError(f"{onnx_dir} records no extension directory that still exists ({ext_dir}); "
                             "pass it with --ext EXT_DIR")
    return validate_genai(m, load_extension(ext_dir, base_model=base_model), provider=provider)


@contextlib.contextmanager
def _eval(model):
    import torch

    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(training)


# --------------------------------------------------------------------------- probes


def _probe_rows(ext) -> list[tuple[str, list[int]]]:
    """(name, ids): texts with the new tokens (as the tokenizer makes them), then every new id fed directly."""
    tok, V, K = ext.tokenizer, ext.V, ext.K
    tokens = ext.tokens
    start = [i for i in (tok.bos_token_id,) if i is not None and getattr(tok, "add_bos_token", False)]
    rows = []
    for s in range(0, K, NEW_PER_ROW):
        text = "the " + " and ".join(tokens[s: s + NEW_PER_ROW]) + " ."
        rows.append((f"text {s // NEW_PER_ROW + 1}", tok(text)["input_ids"]))
    ids = [V + K - 1, V] + list(range(V + 1, V + K - 1)) if K > 1 else [V]
    base = tok("the patient")["input_ids"]
    for s in range(0, len(ids), NEW_PER_ROW):
        rows.append((f"ids {s // NEW_PER_ROW + 1}", start + base + ids[s: s + NEW_PER_ROW]))
    return [(n, r) for n, r in rows if len(r) >= 2]


def _feeds(iface: GenaiInterface, ids: np.ndarray, total: int, past: dict | None, extra: dict) -> dict:
    feeds = dict(extra)
    for name, role in iface.roles.items():
        if role == "input_ids":
            feeds[name] = ids
        elif role == "attention_mask":
            feeds[name] = np.ones((ids.shape[0], total), dtype=np.int64)
        elif role == "position_ids":
            feeds[name] = np.arange(total - ids.shape[1], total, dtype=np.int64)[None].repeat(ids.shape[0], 0)
        elif role == "extension_table":
            continue  # in `extra`
        else:  # (batch, kv_heads, past, head_size), empty on the prefill
            feeds[name] = past[name] if past is not None else np.zeros(
                (ids.shape[0], iface.kv_heads, 0, iface.head_size), dtype=np.float32)
    return feeds


def _logits_checks(sess, iface, ext, rows, extra: dict, report, label: str) -> dict:
    """Prefill (all but the last token) and one decode step (the last) per row; returns PyTorch's logits per row."""
    import torch

    out_names = [o.name for o in sess.get_outputs()]
    refs = {}
    for name, row in rows:
        ids = np.asarray([row], dtype=np.int64)
        ref = ext.model(input_ids=torch.from_numpy(ids)).logits.float().numpy()
        refs[name] = ref
        pre = ids[:, :-1]
        try:
            got = dict(zip(out_names, sess.run(None, _feeds(iface, pre, pre.shape[1], None, extra))))
            past = {p: got[q] for p, q in iface.cache.items()}
            step = dict(zip(out_names, sess.run(None, _feeds(iface, ids[:, -1:], ids.shape[1], past, extra))))
        except Exception as e:  # ORT's own error types
            report.problems.append(f"{label}{name}: ONNX Runtime failed: {str(e).splitlines()[0][:300]}")
            continue
        for kind, value, want, mask in (("prefill", got, ref[:, :-1], pre), ("decode step", step, ref[:, -1:], ids[:, -1:])):
            probe = Probe(f"{label}{kind}: {name}", mask, np.ones_like(mask))
            report.checks.append(_compare(probe, iface.logits, value[iface.logits], want, report.tolerance))
    return refs


def _prompts(ext, rows, refs, report) -> list[tuple[str, list[int]]]:
    """Generation prompts: the probe rows, and prefixes after which PyTorch's greedy next token is a new id."""
    V = ext.V
    prompts = [(f"generate: {n}", r) for n, r in rows[:MAX_PROMPTS]]
    found = []
    for name, row in rows:
        nxt = refs[name][0].argmax(-1)
        for p in range(len(row)):
            if nxt[p] >= V:
                found.append((f"generate, next token new: {name}[:{p + 1}]", row[: p + 1]))
                break
    if found:
        prompts += found[:2]
    else:
        report.notes.append("no probe prefix makes PyTorch's greedy next token a new id (the rows do not make one "
                            "win); generation of new ids is shown by the swap check, where a row is arranged to")
    return prompts


def _torch_generate(ext, iface, ids: list[int], n: int) -> list[int]:
    import torch

    eos = list(iface.eos_token_ids) or None
    pad = iface.pad_token_id if iface.pad_token_id is not None else (eos[0] if eos else 0)
    out = ext.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, num_beams=1, eos_token_id=eos, pad_token_id=pad,
                             top_k=None, top_p=None, temperature=None)
    return out[0, len(ids):].tolist()


def genai_generate(og, model, ids: list[int], n: int, inputs: dict) -> list[int]:
    """Greedy decoding of `n` tokens (fewer at EOS) after `ids` through onnxruntime-genai; `inputs` fed per generator."""
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + n, do_sample=False, num_beams=1)
    gen = og.Generator(model, params)
    for name, value in inputs.items():
        gen.set_model_input(name, np.ascontiguousarray(value))
    gen.append_tokens(np.asarray(ids, dtype=np.int32))
    out = []
    while not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return out


def _generation_check(og, model, iface, ext, name, ids, inputs, report, want_first=None) -> None:
    ref = _torch_generate(ext, iface, ids, MAX_NEW_TOKENS)
    try:
        got = genai_generate(og, model, ids, MAX_NEW_TOKENS, inputs)
    except Exception as e:  # genai raises RuntimeError/OrtException
        report.problems.append(f"{name}: onnxruntime-genai failed: {str(e).splitlines()[0][:300]}")
        return
    new = [t for t in ref if t >= ext.V]
    report.notes.append(f"{name}: {len(ids)} prompt tokens ({sum(i >= ext.V for i in ids)} new), generated {got}"
                        + (f", {len(new)} new id(s)" if new else ""))
    if got != ref:
        first = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref)))
        report.problems.append(f"{name}: onnxruntime-genai generated {got}, transformers' generate {ref} "
                               f"(first difference at step {first})")
    if want_first is not None and (not ref or ref[0] != want_first):
        report.problems.append(f"{name}: the arranged row should make new id {want_first} the next token, "
                               f"PyTorch generated {ref[:1]}; the swap check could not show a new token emitted")


def _tokenizer_notes(og, model, ext, report) -> None:
    tok = og.Tokenizer(model)
    tokens = ext.tokens[:NEW_PER_ROW]
    texts = ["the " + " and ".join(tokens) + " .", ",".join(tokens), tokens[0]]
    differ = [t for t in texts if [int(i) for i in tok.encode(t)] != ext.tokenizer(t)["input_ids"]]
    if differ:
        report.notes.append(
            f"onnxruntime_genai.Tokenizer differs from transformers on {len(differ)} of {len(texts)} probe texts "
            f"(e.g. {differ[0][:60]!r}): onnxruntime-extensions ignores the new tokens' lstrip/single_word flags; "
            "embdeploy.runtime.generate encodes with transformers' tokenizer")
    else:
        report.notes.append(f"onnxruntime_genai.Tokenizer gives transformers' ids on all {len(texts)} probe texts")


# --------------------------------------------------------------------------- swap


def _last_hidden(ext, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(h, logits) at the last position: the LM head's input and output, read with a forward hook."""
    import torch

    seen = {}
    handle = ext.model.get_output_embeddings().register_forward_hook(
        lambda mod, args, out: seen.update(h=args[0][0, -1].float().numpy()))
    try:
        logits = ext.model(input_ids=torch.tensor([ids])).logits[0, -1].float().numpy()
    finally:
        handle.remove()
    return seen["h"], logits


def _swap_checks(og, model, sess, iface, ext, m, rows, prompts, report) -> None:
    embed = _replacement(ext.embed_table().float().cpu().numpy(), seed=1)
    head = _replacement(ext.head_table().float().cpu().numpy(), seed=2) if m.ext_head else None
    name, ids = prompts[0]
    absent = [j for j in range(ext.K - 1, -1, -1) if ext.V + j not in ids]
    j = absent[0] if absent else ext.K - 1  # a row the prompt does not read: arranging it leaves h unchanged
    with _extension_rows(ext, embed, head):
        h, logits = _last_hidden(ext, ids)
    # Row j scores h @ row = target: above every other column (the others do not change with row j).
    target = float(np.delete(logits, ext.V + j).max()) + max(1.0, 0.1 * float(np.abs(logits).max()))
    arranged = h * (target / float(h @ h))
    (head if head is not None else embed)[j] = arranged
    feeds = {m.ext_embed: embed.astype(np.float32)}
    if head is not None:
        feeds[m.ext_head] = head.astype(np.float32)
    with _extension_rows(ext, embed, head):
        _logits_checks(sess, iface, ext, rows, feeds, report, "swapped table: ")
        _generation_check(og, model, iface, ext, f"swapped table, row {ext.V + j} arranged: {name}", ids, feeds,
                          report, want_first=ext.V + j)
        for other_name, other in prompts[1:2]:
            _generation_check(og, model, iface, ext, f"swapped table: {other_name}", other, feeds, report)
