"""Shared fixtures: tiny random models built from configs, and tokenizers built here.

No test touches the network: word-piece models reuse the packaged MiniLM
tokenizer; byte-level models use a BPE trained in-process on a few sentences.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

CORPUS = [
    "the patient had a fever and a cough for three days",
    "the doctor ordered a blood test and an x ray of the chest",
    "results came back normal and the patient went home",
    "a small model runs fast on one cpu core",
    "new words need new rows in the embedding table",
    "the server returned an error when the request was too large",
] * 20


@pytest.fixture
def one_thread(request):
    """Tiny models on 1 torch thread: hand-offs cost more than the matmuls (much more on a busy machine).

    Tests marked slow (real MiniLM) keep the default thread count.
    """
    if request.node.get_closest_marker("slow"):
        yield
        return
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def minilm_dir():
    from embdeploy.models import packaged_minilm_dir

    return packaged_minilm_dir()


@pytest.fixture(scope="session")
def wordpiece_tokenizer(minilm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_dir))


def make_bpe_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer (GPT-2 style), trained on CORPUS in a few ms."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    return fast


@pytest.fixture(scope="session")
def bpe_tokenizer():
    return make_bpe_tokenizer()


def tiny_bert(vocab_size=30522, hidden=32, layers=1, seed=0, masked_lm=False):
    import torch
    from transformers import BertConfig, BertForMaskedLM, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=hidden * 2, max_position_embeddings=128,
    )
    return (BertForMaskedLM if masked_lm else BertModel)(cfg).eval()


def tiny_gpt2(vocab_size, hidden=32, seed=0):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=1, n_head=2, n_positions=128,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama(vocab_size, hidden=32, seed=0, tie=False):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                      tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def tiny_gemma(vocab_size, hidden=32, seed=0):
    import torch
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(seed)
    cfg = GemmaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=128,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return GemmaForCausalLM(cfg).eval()


# --------------------------------------------------------------------------- extensions and exports

NEW_TOKENS = ["hyperkalemia", "troponin", "zorblax", "qwertyx"]
TINY_ARCHS = ("bert", "bert-mlm", "gpt2", "llama", "gemma")


@pytest.fixture(scope="session")
def make_extension(wordpiece_tokenizer):
    """make_extension(arch, tokens=NEW_TOKENS, seed=0, init="normal") -> a fresh Extension of a tiny random model.

    arch is one of TINY_ARCHS. "normal" init gives every new token its own row, so
    tests can tell the rows apart in the outputs.
    """
    import copy

    from embdeploy.extend.model import extend_model

    def make(arch: str, tokens=NEW_TOKENS, seed: int = 0, init: str = "normal"):
        if arch not in TINY_ARCHS:
            raise ValueError(f"unknown arch {arch!r}; choose one of {TINY_ARCHS}")
        if arch.startswith("bert"):
            tok = copy.deepcopy(wordpiece_tokenizer)
            model = tiny_bert(seed=seed, masked_lm=arch == "bert-mlm")
        else:
            tok = make_bpe_tokenizer()
            model = {"gpt2": tiny_gpt2, "llama": tiny_llama, "gemma": tiny_gemma}[arch](len(tok), seed=seed)
        return extend_model(model, tok, list(tokens), init=init, seed=seed)

    return make


@pytest.fixture(scope="session")
def export_cache(tmp_path_factory):
    """One base-export cache for the session: each tiny base goes through torch.onnx once."""
    return tmp_path_factory.mktemp("embdeploy-cache")
