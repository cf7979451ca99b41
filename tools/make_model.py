"""Build a random-weight XLM-RoBERTa cross-encoder and tokenizer that FlagEmbedding loads like bge-reranker.

Tests and benchmarks run offline, so they make their own model instead of downloading one:
`python -m tools.make_model DIR --shape tiny|base`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

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
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>")
    tok.train_from_iterator(SENTENCES * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))],
    )
    return XLMRobertaTokenizerFast(tokenizer_object=tok, model_max_length=512)


def build_model(directory: str | Path, shape: str = "tiny", seed: int = 0) -> Path:
    """Write a random cross-encoder of the given shape and its tokenizer to `directory`."""
    import torch
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
    torch.manual_seed(seed)
    model = XLMRobertaForSequenceClassification(config)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("directory")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    args = parser.parse_args()
    print(build_model(args.directory, args.shape))


if __name__ == "__main__":
    main()
