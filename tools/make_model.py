"""Build random-weight rerankers and tokenizers that FlagEmbedding loads like the real ones.

Tests and benchmarks run offline, so they make their own model instead of downloading one:
`python -m tools.make_model DIR --shape tiny|base` (an XLM-RoBERTa cross-encoder like bge-reranker), or
`--kind gemma|qwen2|layerwise|lightweight` for a tiny decoder-only reranker (FlagLLMReranker,
LayerWiseFlagLLMReranker, LightWeightFlagLLMReranker),
`--kind qwen3-reranker` for a tiny Qwen3 causal LM with a tokenizer like Qwen3-Reranker's,
`--kind mxbai-v2` for a tiny Qwen2 "1"/"0" reranker with the chat tokens (like mxbai-rerank v2), or
`--kind bert` for a tiny BERT cross-encoder with a WordPiece tokenizer and token type ids (like ms-marco-MiniLM),
`--kind modernbert` (like gte-reranker-modernbert-base), `--kind deberta-v2` (like mxbai-rerank v1).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

SENTENCES = [
    "what is panda?",
    "hi",
    "The giant panda (Ailuropoda melanoleuca), sometimes called a panda bear or simply panda, "
    "is a bear species endemic to China.",
    "A reranker scores how relevant a passage is to a query.",
    "Retrieval augmented generation finds passages and then asks a language model.",
    "The quick brown fox jumps over the lazy dog.",
    "gRPC is a remote procedure call framework; protobuf describes its messages.",
    "什么是函数计算",
    "函数计算是阿里云Serverless计算服务，提供专业的Serverless架构服务托管",
    "今天天气怎么样",
    "Numbers like 3.14159 and 2026 appear in text too.",
]

SHAPES = {
    # layers, hidden, heads, intermediate, vocab
    "tiny": (2, 32, 2, 64, 1000),
    "base": (12, 768, 12, 3072, 250002),  # bge-reranker-base
}


def build_tokenizer(vocab_size: int = 400):  # -> XLMRobertaTokenizerFast
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import XLMRobertaTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>", show_progress=False
    )
    tok.train_from_iterator(SENTENCES * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))],
    )
    return XLMRobertaTokenizerFast(tokenizer_object=tok, model_max_length=512)


def _save(directory: str | Path, model_class: Any, config: Any, tokenizer: Any, seed: int) -> Path:
    """Random weights of `model_class` for `config` (seeded), written with the tokenizer to `directory`."""
    import torch
    from transformers.utils import logging as hf_logging

    torch.manual_seed(seed)
    model = model_class(config)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one shard of a test model: a "Writing model shards" bar says nothing
    try:
        model.save_pretrained(out)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(out)
    return _readable(out)


def _readable(out: Path) -> Path:
    """Mode 0644 for every file: safetensors writes 0600, which the image's user (uid 10001) could not read."""
    for f in out.iterdir():
        if f.is_file():
            f.chmod(0o644)
    return out


def build_model(directory: str | Path, shape: str = "tiny", seed: int = 0) -> Path:
    """Write a random cross-encoder of the given shape and its tokenizer to `directory`."""
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification

    layers, hidden, heads, intermediate, vocab = SHAPES[shape]
    tokenizer = build_tokenizer()
    config = XLMRobertaConfig(
        vocab_size=max(vocab, len(tokenizer)),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=514,
        type_vocab_size=1,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        architectures=["XLMRobertaForSequenceClassification"],
        # Wide initial weights spread the tiny model's logits (about -10..0), so ordering and
        # sigmoid checks mean something; the base shape keeps the usual 0.02.
        initializer_range=0.5 if shape == "tiny" else 0.02,
    )
    return _save(directory, XLMRobertaForSequenceClassification, config, tokenizer, seed)


def build_bert_model(directory: str | Path, seed: int = 0) -> Path:
    """A tiny BERT cross-encoder: WordPiece, lower-casing, and token type ids 0 for the query and 1 for the passage."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(
        SENTENCES * 4, trainer=trainers.WordPieceTrainer(vocab_size=400, special_tokens=specials, show_progress=False)
    )
    tok.post_processor = processors.BertProcessing(
        ("[SEP]", tok.token_to_id("[SEP]")), ("[CLS]", tok.token_to_id("[CLS]"))
    )
    tokenizer = BertTokenizer(tokenizer_object=tok, model_max_length=512)
    layers, hidden, heads, intermediate, _ = SHAPES["tiny"]
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=512,
        type_vocab_size=2,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
        architectures=["BertForSequenceClassification"],
        initializer_range=0.5,
        # As the ms-marco cross-encoders' config.json says: sentence-transformers' CrossEncoder returns raw logits.
        sbert_ce_default_activation_function="torch.nn.modules.linear.Identity",
    )
    return _save(directory, BertForSequenceClassification, config, tokenizer, seed)


def build_modernbert_model(directory: str | Path, seed: int = 0) -> Path:
    """A tiny ModernBERT cross-encoder like gte-reranker-modernbert-base: byte-level BPE, no token type ids, mean
    pooling, a global-attention layer then a sliding-window one (a window of 16 tokens, so short texts cross it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import ModernBertConfig, ModernBertForSequenceClassification, PreTrainedTokenizerFast

    specials = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES * 4, trainer=trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        mask_token="[MASK]",
        model_input_names=["input_ids", "attention_mask"],  # as ModernBERT's tokenizer_config.json says
        model_max_length=8192,
    )
    config = ModernBertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        global_attn_every_n_layers=2,
        local_attention=16,
        classifier_pooling="mean",
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
        cls_token_id=cls,
        sep_token_id=sep,
        bos_token_id=cls,
        eos_token_id=sep,
        architectures=["ModernBertForSequenceClassification"],
        initializer_range=0.5,
    )
    return _save(directory, ModernBertForSequenceClassification, config, tokenizer, seed)


def build_deberta_model(directory: str | Path, seed: int = 0) -> Path:
    """A tiny DeBERTa-v2 cross-encoder like mxbai-rerank v1 (a DeBERTa-v3): a SentencePiece unigram model (spm.model,
    converted by transformers as for the real checkpoint), relative position buckets, no token type embeddings."""
    import tempfile

    import sentencepiece as spm
    from transformers import AutoTokenizer, DebertaV2Config, DebertaV2ForSequenceClassification

    with tempfile.TemporaryDirectory() as tmp:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(SENTENCES * 4),
            model_prefix=f"{tmp}/spm",
            vocab_size=140,
            hard_vocab_limit=False,
            model_type="unigram",
            character_coverage=1.0,
            pad_id=0,
            unk_id=1,
            bos_id=-1,
            eos_id=-1,
            pad_piece="[PAD]",
            unk_piece="[UNK]",
            control_symbols=["[CLS]", "[SEP]", "[MASK]"],
            minloglevel=2,
        )
        settings = {"tokenizer_class": "DebertaV2Tokenizer", "do_lower_case": False, "model_max_length": 512}
        Path(tmp, "tokenizer_config.json").write_text(json.dumps(settings))
        tokenizer = AutoTokenizer.from_pretrained(tmp)
        sentencepiece_model = Path(tmp, "spm.model").read_bytes()
    config = DebertaV2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        type_vocab_size=0,
        relative_attention=True,
        position_buckets=16,  # the real model's 256, scaled down so the test texts reach the log-scaled buckets
        max_relative_positions=-1,
        norm_rel_ebd="layer_norm",
        share_att_key=True,
        pos_att_type=["p2c", "c2p"],
        position_biased_input=False,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
        architectures=["DebertaV2ForSequenceClassification"],
        initializer_range=0.5,
    )
    out = _save(directory, DebertaV2ForSequenceClassification, config, tokenizer, seed)
    (out / "spm.model").write_bytes(sentencepiece_model)  # shipped beside tokenizer.json, as by the real checkpoint
    return _readable(out)


# FlagEmbedding's decoder-only prompt and instructions: the tokenizer learns them so the tests' ids stay short.
LLM_TEXTS = [
    "Given a query A and a passage B, determine whether the passage contains an answer to the query by providing "
    "a prediction of either 'Yes' or 'No'.",
    "A: ",
    "B: ",
    "Yes",
    "No",
]
LLM_SHAPE = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1}
# Weights wide enough to spread the scores, narrow enough that compute_score's own padding (which shifts the
# rotary positions, see server/engine/llm_model.py) moves them by float rounding only.
LLM_INIT = 0.2


def build_causal_tokenizer(bos: bool = True, padding_side: str = "left", vocab_size: int = 400):  # -> fast tokenizer
    """A byte-level BPE tokenizer like a causal LM's: optional bos, eos, pad; "Yes" and "\\n" tokenize."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((SENTENCES + LLM_TEXTS) * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>" if bos else None,
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side=padding_side,
        model_max_length=2048,
    )


def build_llm_model(directory: str | Path, seed: int = 0, arch: str = "gemma") -> Path:
    """A tiny decoder-only reranker for FlagLLMReranker.

    gemma: like bge-reranker-v2-gemma (bos before the query, left padding); qwen2: no bos, right padding.
    """
    from transformers import GemmaConfig, GemmaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    gemma = arch == "gemma"
    tokenizer = build_causal_tokenizer(bos=gemma, padding_side="left" if gemma else "right")
    config_class, model_class = (GemmaConfig, GemmaForCausalLM) if gemma else (Qwen2Config, Qwen2ForCausalLM)
    config = config_class(
        vocab_size=len(tokenizer),
        num_hidden_layers=2,
        head_dim=16,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        initializer_range=LLM_INIT,
        **LLM_SHAPE,
    )
    return _save(directory, model_class, config, tokenizer, seed)


QWEN3_TEXTS = [  # Qwen3-Reranker's template (server/tokenize/chat.py), so that its words are tokens
    "Judge whether the Document meets the requirements based on the Query and the Instruct provided. "
    'Note that the answer can only be "yes" or "no".',
    "<Instruct>: Given a web search query, retrieve relevant passages that answer the query\n<Query>: \n<Document>: ",
    "yes no yes no",
]
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]  # special, as in Qwen's tokenizer
THINK_TOKENS = ["<think>", "</think>"]  # added, not special, as in Qwen3's


QWEN3_SHAPES = {
    # layers, hidden, heads, kv heads, intermediate, the model's vocabulary (the tokenizer's: 502 tokens)
    "tiny": (2, 32, 2, 1, 64, 0),
    "small": (4, 256, 4, 2, 768, 151_669),  # Qwen3-Reranker's vocabulary: what full logits cost per position
}


def build_qwen3_reranker(directory: str | Path, seed: int = 0, shape: str = "tiny", vocab_size: int = 500) -> Path:
    """A tiny Qwen3 causal LM with a tokenizer like Qwen3-Reranker's: byte-level BPE, no bos, left padding, the chat
    tokens, and "yes" and "no" as single tokens. `small`: wider, with Qwen3's full vocabulary size in the model (the
    embedding and output head), for measuring what the vocabulary costs."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=CHAT_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((SENTENCES + LLM_TEXTS + QWEN3_TEXTS * 8) * 4, trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        model_max_length=2048,
    )
    for word in ("yes", "no"):
        if tok.token_to_id(word) is None:
            raise RuntimeError(f"the tiny Qwen3 tokenizer did not learn {word!r} as a token")
    layers, hidden, heads, kv_heads, inter, vocab = QWEN3_SHAPES[shape]
    config = Qwen3Config(
        vocab_size=max(vocab, len(tokenizer)),
        num_hidden_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=inter,
        head_dim=16 if shape == "tiny" else hidden // heads,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        initializer_range=LLM_INIT if shape == "tiny" else 0.02,
        tie_word_embeddings=False,
    )
    return _save(directory, Qwen3ForCausalLM, config, tokenizer, seed)


def build_lightweight_model(directory: str | Path, seed: int = 0) -> Path:
    """A tiny CostWiseGemma (6 layers, scoring heads from layer 2) like bge-reranker-v2.5-gemma2-lightweight."""
    from FlagEmbedding.inference.reranker.decoder_only.models.gemma_config import CostWiseGemmaConfig
    from FlagEmbedding.inference.reranker.decoder_only.models.gemma_model import CostWiseGemmaForCausalLM

    from server.engine.lightweight import lightweight_compat

    tokenizer = build_causal_tokenizer(bos=True, padding_side="right")
    with lightweight_compat():  # the model's code predates transformers 5
        config = CostWiseGemmaConfig(
            vocab_size=len(tokenizer),
            num_hidden_layers=6,
            start_layer=2,
            layer_sep=1,
            layer_wise=True,
            head_dim=16,
            max_position_embeddings=2048,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            initializer_range=LLM_INIT,
            architectures=["CostWiseGemmaForCausalLM"],
            **LLM_SHAPE,
        )
        out = _save(directory, CostWiseGemmaForCausalLM, config, tokenizer, seed)
    return out


def build_mxbai_v2_model(directory: str | Path, seed: int = 0) -> Path:
    """A tiny Qwen2 causal LM like mxbai-rerank-base-v2: the chat tokens, "0" and "1" single tokens, left padding."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_causal_tokenizer(bos=False, padding_side="left")
    tokenizer.add_special_tokens({"additional_special_tokens": CHAT_TOKENS})
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        num_hidden_layers=2,
        head_dim=16,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        initializer_range=LLM_INIT,
        architectures=["Qwen2ForCausalLM"],
        **LLM_SHAPE,
    )
    return _save(directory, Qwen2ForCausalLM, config, tokenizer, seed)


def build_layerwise_model(directory: str | Path, seed: int = 0) -> Path:
    """A tiny MiniCPM layer-wise reranker (4 layers, heads from layer 2) like bge-reranker-v2-minicpm-layerwise."""
    import torch
    from FlagEmbedding.inference.reranker.decoder_only.models.configuration_minicpm_reranker import (
        LayerWiseMiniCPMConfig,
    )
    from FlagEmbedding.inference.reranker.decoder_only.models.modeling_minicpm_reranker import (
        LayerWiseMiniCPMForCausalLM,
    )
    from safetensors.torch import save_file

    from server.engine.llm_model import layerwise_compat

    tokenizer = build_causal_tokenizer(bos=True, padding_side="left")
    with layerwise_compat():  # the model's code predates transformers 5
        config = LayerWiseMiniCPMConfig(
            vocab_size=len(tokenizer),
            num_hidden_layers=4,
            start_layer=2,
            head_multi=True,
            head_type="simple",
            scale_emb=12,
            dim_model_base=32,
            scale_depth=1.4,
            max_position_embeddings=2048,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            initializer_range=LLM_INIT,
            architectures=["LayerWiseMiniCPMForCausalLM"],
            **LLM_SHAPE,
        )
        torch.manual_seed(seed)
        model = LayerWiseMiniCPMForCausalLM(config)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    # save_pretrained trips on the model's list of tied weights under transformers 5: write the file directly.
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return _readable(out)


BUILDERS = {"modernbert": build_modernbert_model, "deberta-v2": build_deberta_model, "mxbai-v2": build_mxbai_v2_model}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("directory")
    parser.add_argument(
        "--shape",
        choices=sorted({*SHAPES, *QWEN3_SHAPES}),
        default="tiny",
        help="cross-encoder: tiny, base; qwen3-reranker: tiny, small",
    )
    kinds = ("cross-encoder", "bert", "gemma", "qwen2", "layerwise", "lightweight", "qwen3-reranker", *BUILDERS)
    parser.add_argument("--kind", choices=kinds, default="cross-encoder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.kind == "cross-encoder":
        if args.shape not in SHAPES:
            parser.error(f"a cross-encoder takes --shape {' or '.join(SHAPES)}")
        print(build_model(args.directory, args.shape, args.seed))
    elif args.kind == "bert":
        print(build_bert_model(args.directory, args.seed))
    elif args.kind == "layerwise":
        print(build_layerwise_model(args.directory, args.seed))
    elif args.kind == "lightweight":
        print(build_lightweight_model(args.directory, args.seed))
    elif args.kind == "qwen3-reranker":
        if args.shape not in QWEN3_SHAPES:
            parser.error(f"--kind qwen3-reranker takes --shape {' or '.join(QWEN3_SHAPES)}")
        print(build_qwen3_reranker(args.directory, args.seed, args.shape))
    elif args.kind in BUILDERS:
        print(BUILDERS[args.kind](args.directory, args.seed))
    else:
        print(build_llm_model(args.directory, args.seed, args.kind))


if __name__ == "__main__":
    main()
