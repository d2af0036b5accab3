"""Merge an extension into a plain transformers model directory.

The result has a (V+K)×H table (and head), `config.vocab_size` = V+K, the
extended tokenizer, and loads with `AutoModel*.from_pretrained` with no
embdeploy installed. Sentence-transformers files of a local base (modules.json,
pooling config) are copied along so the merged model pools the same way.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch

from ..fsutil import ARTIFACTS, atomic_output_dir, check_output_dir
from ..models import save_tokenizer
from .layer import ExtendedEmbedding, ExtendedLMHead
from .model import Extension

_ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


def unwrap(model) -> None:
    """Put the original embedding and head modules back (in place)."""
    for mod in list(model.modules()):
        for attr, child in list(mod.named_children()):
            if isinstance(child, (ExtendedEmbedding, ExtendedLMHead)):
                setattr(mod, attr, child.base)


def merged_model(ext: Extension):
    """A new plain model with the extension rows written into resized tables."""
    model = copy.deepcopy(ext.model)
    unwrap(model)
    V, K = ext.V, ext.K
    model.resize_token_embeddings(V + K, mean_resizing=False)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[V:] = ext.embed_table().to(emb.dtype)
        if ext.head_mode == "untied":
            head = model.get_output_embeddings().weight
            head[V:] = ext.head_table().to(head.dtype)
            bias = getattr(model.get_output_embeddings(), "bias", None)
            if bias is not None:
                bias[V:] = 0
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def merge_extension(ext: Extension, out, overwrite: bool = False, inputs=()) -> Path:
    inputs = (*inputs, ext.base_info.path)
    check_output_dir(out, overwrite, "merged-model", inputs)
    model = merged_model(ext)
    with atomic_output_dir(out, overwrite=overwrite, kind="merged-model", inputs=inputs) as tmp:
        model.save_pretrained(str(tmp))
        # marks the directory as embdeploy's, so a later `merge --overwrite` may replace it
        (tmp / ARTIFACTS["merged-model"][0]).write_text(json.dumps({
            "written_by": "embdeploy merge", "base_fingerprint": ext.base_fingerprint,
            "V": ext.V, "K": ext.K, "extension_fingerprint": ext.extension_fingerprint(),
        }, indent=2) + "\n")
        save_tokenizer(ext.tokenizer, tmp)
        src = Path(ext.base_info.path)
        if src.is_dir():
            for name in _ST_FILES:
                if (src / name).is_file():
                    shutil.copy2(src / name, tmp / name)
            for sub in src.iterdir():
                if sub.is_dir() and sub.name[:1].isdigit() and "_" in sub.name:  # 1_Pooling, 2_Normalize
                    shutil.copytree(sub, tmp / sub.name)
    return Path(out)
