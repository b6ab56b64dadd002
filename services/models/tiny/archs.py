"""The architectures and tokenizers a tiny model can have: shapes as the real families use them."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any


def _template(name: str) -> str:
    return (files(__package__) / "templates" / name).read_text(encoding="utf-8")


# ChatML with a BOS in front; Qwen2's shape, written without "-" so that it renders right
# only with trim_blocks and lstrip_blocks (what transformers sets); Mistral's [INST] shape:
# strict user/assistant alternation, eos_token after answers.
CHATML_TEMPLATE = _template("chatml.jinja")
QWEN_TEMPLATE = _template("qwen2.jinja")
INST_TEMPLATE = _template("mistral-inst.jinja")


IM_START, IM_END = "<|im_start|>", "<|im_end|>"


# Pre-tokenizer regexes of Llama 3 and Qwen2 (they differ in digit grouping).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 256,
}


@dataclass(frozen=True)
class TokenizerSpec:
    special_tokens: tuple[str, ...]
    bos: str | None  # put in front of every encoding when set
    eos: str  # tokenizer_config's eos_token
    model_eos: str  # config.json's eos_token_id
    pad: str | None
    split_regex: str
    nfc: bool
    tokenizer_class: str


LLAMA3_TOKENIZER = TokenizerSpec(
    special_tokens=("<|begin_of_text|>", "<|end_of_text|>", IM_START, IM_END),
    bos="<|begin_of_text|>",
    eos="<|end_of_text|>",
    model_eos="<|end_of_text|>",
    pad=None,
    split_regex=LLAMA3_SPLIT,
    nfc=False,
    tokenizer_class="PreTrainedTokenizerFast",
)


# As Qwen2-Instruct: no BOS, NFC normalisation; transformers rebuilds this pipeline itself
# for "Qwen2Tokenizer", so tokenizer.json has to hold the same one.
QWEN2_TOKENIZER = TokenizerSpec(
    special_tokens=("<|endoftext|>", IM_START, IM_END),
    bos=None,
    eos=IM_END,
    model_eos="<|endoftext|>",
    pad="<|endoftext|>",
    split_regex=QWEN2_SPLIT,
    nfc=True,
    tokenizer_class="Qwen2Tokenizer",
)


@dataclass(frozen=True)
class ArchSpec:
    architecture: str
    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    max_positions: int
    rope_theta: float
    rms_norm_eps: float
    tied: bool
    qkv_bias: bool
    tokenizer: TokenizerSpec
    chat_template: str
    # Round the embedding rows up to this multiple, past the tokenizer (as Qwen does).
    vocab_multiple: int = 1
    write_head_dim: bool = True
    extra_config: dict[str, Any] = field(default_factory=dict)


ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec(
        architecture="LlamaForCausalLM",
        model_type="llama",
        hidden=128,
        layers=4,
        heads=4,
        kv_heads=2,
        head_dim=32,
        intermediate=352,
        max_positions=2048,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tied=False,
        qkv_bias=False,
        tokenizer=LLAMA3_TOKENIZER,
        chat_template=CHATML_TEMPLATE,
        extra_config={"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1},
    ),
    "qwen2": ArchSpec(
        architecture="Qwen2ForCausalLM",
        model_type="qwen2",
        hidden=192,
        layers=3,
        heads=6,
        kv_heads=2,
        head_dim=32,
        intermediate=512,
        max_positions=1024,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tied=True,
        qkv_bias=True,
        tokenizer=QWEN2_TOKENIZER,
        chat_template=QWEN_TEMPLATE,
        vocab_multiple=64,
        write_head_dim=False,
        extra_config={"use_sliding_window": False, "sliding_window": 1024, "max_window_layers": 3},
    ),
    # head_dim * heads (256) != hidden (128), as in Mistral Nemo.
    "mistral": ArchSpec(
        architecture="MistralForCausalLM",
        model_type="mistral",
        hidden=128,
        layers=4,
        heads=8,
        kv_heads=2,
        head_dim=32,
        intermediate=352,
        max_positions=2048,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tied=False,
        qkv_bias=False,
        tokenizer=LLAMA3_TOKENIZER,
        chat_template=INST_TEMPLATE,
        extra_config={"sliding_window": None},
    ),
}
