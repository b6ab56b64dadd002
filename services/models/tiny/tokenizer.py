"""A byte-level BPE tokenizer trained on the built-in corpus, in Llama 3's or Qwen2's shape."""

from __future__ import annotations

from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from services.models.tiny.archs import TokenizerSpec
from services.models.tiny.corpus import training_corpus

BPE_VOCAB = 1024


def train_tokenizer(spec: TokenizerSpec) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    if spec.nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(spec.split_regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_corpus(), trainer)
    # Appended after the learnt vocabulary, as Llama 3 and Qwen2 do.
    tok.add_special_tokens(list(spec.special_tokens))
    byte_level = processors.ByteLevel(trim_offsets=False)
    if spec.bos is None:
        tok.post_processor = byte_level
    else:
        bos = spec.bos
        template = processors.TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, tok.token_to_id(bos))],
        )
        tok.post_processor = processors.Sequence([byte_level, template])
    return tok
