"""Tiny, seeded, randomly initialised models of several families, built in code (no hub), a
word-level tokenizer, and facts such a model "knows" (its own greedy predictions): what the tests,
the benchmarks and users calibrating a diagnosis on their own cases start from.

    from qdiag.testing import knowing_model
    hf, tokenizer, facts = knowing_model("qwen2", seed=1)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from .core.arch import resolve
from .core.data import Fact
from .measure.evaluate import encode_prompts

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


def tiny_model(family: str = "llama", seed: int = 0, layers: int = 2, scale: float = 1.0) -> torch.nn.Module:
    """A fresh model (2 layers unless asked) with hidden size 64 and grouped-query attention, in eval mode.

    ``scale`` multiplies every decoder-layer weight matrix: at the default initialisation the
    layers add little to the embeddings and attention is near uniform; at ``scale=4`` attention
    focuses and the answers depend on what the layers compute (as in a trained model)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, layers), attn_implementation="eager")
    model.eval().requires_grad_(False)
    if scale != 1.0:
        for name in resolve(model).linear_names():
            model.get_submodule(name).weight.mul_(scale)
    return model


WORDS = ("the of is in a capital city country language official located France Paris Germany Berlin Italy Rome "
         "Spain Madrid Japan Tokyo Europe Asia French German Italian Spanish Japanese part continent seat "
         "government spoken belongs to 's , . '").split()


def tiny_tokenizer(bos: bool = False):
    """A word-level tokenizer over a small vocabulary (ids < 256), with pad/eos/bos/unk tokens;
    ``bos=True`` puts ``<s>`` at the start of every text, as Gemma's and Llama 3's tokenizers do."""
    vocab = {"<unk>": 0, "<pad>": 1, "<s>": 2, "</s>": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    if bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                          special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", padding_side="left")


# Two facts with several templates, for tests that need prompts but not a model that knows them.
FACTS = [Fact("P36", "France", "Paris", ("The capital of [X] is [Y].", "[X] 's capital city is [Y]")),
         Fact("P36", "Germany", "Berlin", ("The capital of [X] is [Y].",))]

# Random-weight configs of real models' shapes: what costs as much as the real model on a GPU.
REAL_SHAPES = {
    "llama-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=32000),
    "llama-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    # Llama-3.1-70B's layer shapes, 48 of its 80 layers: 43B parameters, 80 GiB in bfloat16, more
    # than one 80 GB card holds and less than two
    "llama-70b-48l": dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=48,
                          num_attention_heads=64, num_key_value_heads=8, vocab_size=128256),
}


def calib_ids(n: int = 4, length: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 256, (n, length), generator=g)


TEMPLATES = ["The capital of [X] is [Y]", "[X] 's capital city is [Y]", "[X] is located in [Y]"]
SUBJECTS = ["France", "Germany", "Italy", "Spain", "Japan"]
# More prompts, for tests that need many known facts (the diagnosis's ground truth).
MORE_TEMPLATES = TEMPLATES + ["The official language of [X] is [Y]", "[X] is part of [Y]",
                              "The seat of government of [X] is [Y]", "[X] belongs to [Y]"]
MORE_SUBJECTS = SUBJECTS + ["Paris", "Berlin", "Rome", "Madrid", "Tokyo", "Europe", "Asia"]


def known_facts(model, tok, subjects: list[str] = SUBJECTS, templates: list[str] = TEMPLATES):
    """Facts whose object is what the tiny random model predicts, so the reference is right."""
    facts = []
    for s in subjects:
        for j, t in enumerate(templates):
            prompt = t.replace("[X]", s)[: -len(" [Y]")]
            batch = encode_prompts(tok, [prompt], device=next(model.parameters()).device)
            top = model(**batch).logits[0, -1].argmax().item()
            word = tok.convert_ids_to_tokens(top)
            if word and word.isalpha():
                facts.append(Fact(f"T{j}", s, word, (t,)))  # one relation per template: unique fact ids
    return facts


def knowing_model(family: str = "llama", seed: int = 0, layers: int = 2, min_facts: int = 5, scale: float = 1.0,
                  many: bool = False):
    """A tiny model, the tokenizer, and the facts it answers itself: ``(hf_model, tokenizer, facts)``.
    Ids the tokenizer does not have are never predicted. ``many`` asks for every subject and
    template of ``MORE_SUBJECTS`` x ``MORE_TEMPLATES``. Raises if it knows fewer than ``min_facts``."""
    model, tok = tiny_model(family, seed=seed, layers=layers, scale=scale), tiny_tokenizer()
    unembed = model.get_output_embeddings().weight
    unembed.data[len(tok):] = -1 if family not in ("gpt2",) else 0
    facts = known_facts(model, tok, *((MORE_SUBJECTS, MORE_TEMPLATES) if many else ()))
    if len(facts) < min_facts:
        raise ValueError(f"the tiny {family} model (seed {seed}) knows {len(facts)} facts, fewer than {min_facts}")
    return model, tok, facts


def knowing(tmp_path: Path, layers: int = 2, family: str = "llama", seed: int = 0) -> tuple[str, Path]:
    """A tiny model saved with a data folder of facts it answers correctly (its own predictions)."""
    model, tok, facts = knowing_model(family, seed, layers)
    path = tmp_path / "model"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    data = tmp_path / "data"
    for sub in ("patterns", "facts"):
        (data / "pararel" / sub).mkdir(parents=True)
    patterns = sorted({t for f in facts for t in f.templates})
    (data / "pararel" / "patterns" / "P36.jsonl").write_text("\n".join(json.dumps({"pattern": p}) for p in patterns))
    (data / "pararel" / "facts" / "P36.jsonl").write_text(
        "\n".join(json.dumps({"sub_label": f.subject, "obj_label": f.obj}) for f in facts))
    (data / "wikitext-2").mkdir()
    text = " ".join(["the capital of France is Paris ."] * 200)
    for split in ("test", "valid"):
        (data / "wikitext-2" / f"{split}.txt").write_text(text)
    return str(path), data


def _permute_for_gguf(w: np.ndarray, n_head: int, n_kv: int | None = None) -> np.ndarray:
    # llama.cpp's convert_hf_to_gguf.py interleaves the rotary halves of Llama's q and k rows
    if n_kv is not None and n_head != n_kv:
        n_head = n_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, tokenizer, path: str | Path, qtype: str = "Q8_0", norm_scale: float = 1.0) -> Path:
    """A tiny Llama or Qwen2 written as llama.cpp's converter would, with the ``gguf`` package: names
    from its tensor map, Llama's q and k rows permuted (Qwen2's are not), the decoder's matrices in
    ``qtype`` and everything else in float32 (``qtype="F32"``: everything). ``norm_scale``
    multiplies every norm weight (as AWQ folds scales into norms)."""
    import gguf

    cfg = model.config
    archs = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}
    if cfg.model_type not in archs:
        raise ValueError(f"write_gguf writes {', '.join(archs)} models, not {cfg.model_type}")
    permute = cfg.model_type == "llama"
    path = Path(path)
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[archs[cfg.model_type]])
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(getattr(cfg, "rope_theta", None) or 10000.0)
    writer.add_tokenizer_model("gpt2")
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    # padded to the embedding's rows, as llama.cpp's converter pads a vocabulary smaller than the model's
    writer.add_token_list(tokens + [f"[PAD{i}]" for i in range(len(tokens), cfg.vocab_size)])
    names = gguf.get_tensor_name_map(archs[cfg.model_type], cfg.num_hidden_layers)
    t = gguf.GGMLQuantizationType[qtype.upper()]
    for name, p in model.state_dict().items():
        base, _, suffix = name.rpartition(".")
        w = p.detach().float().cpu().numpy()
        if permute and name.endswith("q_proj.weight"):
            w = _permute_for_gguf(w, cfg.num_attention_heads)
        elif permute and name.endswith("k_proj.weight"):
            w = _permute_for_gguf(w, cfg.num_attention_heads, cfg.num_key_value_heads)
        if "norm" in name:
            w = w * norm_scale
        gname = f"{names.get_name(base)}.{suffix}"
        if w.ndim == 2 and ".layers." in name and t != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gname, gguf.quants.quantize(np.ascontiguousarray(w), t), raw_dtype=t)
        else:
            writer.add_tensor(gname, np.ascontiguousarray(w, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def requantize_gguf(source: str | Path, path: str | Path, qtype: str) -> Path:
    """A copy of a GGUF file (every key and tensor) with the decoder's matrices (``blk.*``) de-quantized
    and quantized again to ``qtype`` by the ``gguf`` package: a lower-bit file of the same model."""
    import gguf

    reader = gguf.GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(Path(path), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)
    t = gguf.GGMLQuantizationType[qtype.upper()]
    for tensor in reader.tensors:
        data = tensor.data
        if tensor.name.startswith("blk.") and len(tensor.shape) == 2:
            w = gguf.quants.dequantize(data, tensor.tensor_type)
            writer.add_tensor(tensor.name, gguf.quants.quantize(np.ascontiguousarray(w), t), raw_dtype=t)
        else:
            writer.add_tensor(tensor.name, np.array(data), raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
