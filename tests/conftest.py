"""Tiny, seeded, randomly initialised models of several families, built in code (no hub)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2", "gpt_neox"]

_COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               bos_token_id=2, eos_token_id=3, pad_token_id=1)


def tiny_config(family: str, layers: int = 2):

    config = _tiny_config(family)
    for key in ("num_hidden_layers", "n_layer"):
        if hasattr(config, key):
            setattr(config, key, layers)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i % len(config.layer_types)] for i in range(layers)]
    return config


def _tiny_config(family: str):
    from transformers import AutoConfig

    if family == "gpt2":
        return AutoConfig.for_model("gpt2", vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=256)
    if family == "gpt_neox":
        return AutoConfig.for_model("gpt_neox", vocab_size=256, hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256)
    extra = {}
    if family == "gemma":
        extra = dict(head_dim=16)
    if family in ("gemma2", "gemma3_text"):
        extra = dict(head_dim=16, sliding_window=8)  # a window shorter than test prompts
    if family in ("qwen3",):
        extra = dict(head_dim=16)
    return AutoConfig.for_model(family, **_COMMON, **extra)


def tiny_model(family: str = "llama", seed: int = 0, layers: int = 2) -> torch.nn.Module:
    """A fresh model (2 layers unless asked) with hidden size 64 and grouped-query attention, in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, layers), attn_implementation="eager")
    model.eval().requires_grad_(False)
    return model


WORDS = ("the of is in a capital city country language official located France Paris Germany Berlin Italy Rome "
         "Spain Madrid Japan Tokyo Europe Asia French German Italian Spanish Japanese part continent seat "
         "government spoken belongs to 's , . '").split()


def tiny_tokenizer():
    """A word-level tokenizer over a small vocabulary (ids < 256), with pad/eos/bos/unk tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, "<s>": 2, "</s>": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", padding_side="left")


@pytest.fixture
def model():
    return tiny_model("llama")


@pytest.fixture
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared datasets, from QDIAG_DATA or ../shared/datasets beside the checkout."""
    root = Path(os.environ.get("QDIAG_DATA", SHARED))
    if not (root / "pararel").is_dir():
        pytest.fail(f"datasets not found at {root}: set QDIAG_DATA to the shared/datasets folder")
    return root


def calib_ids(n: int = 4, length: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 256, (n, length), generator=g)
