"""Write a small random Llama-family model in Hugging Face format, for demos and tests.

    python scripts/make_tiny_model.py models/tiny-llama [--arch llama|qwen2|mistral] [--seed 0]

The directory holds config.json, generation_config.json, model.safetensors, tokenizer.json
(byte-level BPE trained here on a built-in corpus), tokenizer_config.json and a chat template.
Transformers is not needed. Same arguments, same bytes.

Weights are scaled so that attention and MLP change the residual stream as much as the
embedding does (a model whose output ignores the context would hide KV cache bugs), and so
that the top two logits are far apart (float reorderings across engines keep greedy argmax).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
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

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
BPE_VOCAB = 1024

# Files this script writes; --force removes exactly these (never the whole directory).
OUTPUT_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)

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

# ChatML with a BOS in front; written with "-" whitespace control.
CHATML_TEMPLATE = """{{- bos_token }}
{%- for message in messages %}
    {%- if message['role'] not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('Unsupported role: ' + message['role']) }}
    {%- endif %}
    {%- if message['role'] == 'system' and not loop.first %}
        {{- raise_exception('The system message must come first') }}
    {%- endif %}
    {{- '<|im_start|>' + message['role'] + '\\n' }}
    {%- if message['content'] is string %}
        {{- message['content'] }}
    {%- else %}
        {%- for part in message['content'] if part['type'] == 'text' %}
            {{- part['text'] }}
        {%- endfor %}
    {%- endif %}
    {{- '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Qwen2's shape, written without "-" so that it renders right only with trim_blocks and
# lstrip_blocks (what transformers sets).
QWEN_TEMPLATE = """{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('Unsupported role: ' + message['role']) }}
    {% endif %}
    {% if loop.first and message['role'] != 'system' %}
<|im_start|>system
You are a helpful assistant.<|im_end|>
    {% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""

# Mistral's [INST] shape: strict user/assistant alternation, eos_token after answers.
INST_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}{% endfor %}"
)


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

_PROSE = """\
The quick brown fox jumps over the lazy dog. A small model can still tell a story.
Once upon a time there was a little robot who lived in a quiet town by the sea.
Every morning the robot walked to the harbour and counted the boats, one by one.
Some days there were seven boats, and some days there were twelve.
"Why do you count them?" asked the baker. "Because numbers keep me company," it said.
Servers answer requests. Prefill reads the prompt; decode writes one token at a time.
The cache holds keys and values for every layer, so the next token is cheap to compute.
Hello, world! How are you today? I am fine, thank you. What time is it? It's 10:45.
Please write a short poem about the moon, the stars, and the silent night.
def add(a, b):
    return a + b
for i in range(10):
    print(i * i)
{"name": "tiny", "layers": 4, "ok": true}
Café, naïve, résumé, jalapeño, Zürich, São Paulo, smörgåsbord.
Привет, мир! Как дела? 你好，世界！今天天气很好。こんにちは世界。안녕하세요.
Emoji travel too: 🙂 🚀 🌍 ✨ — and so do dashes, “quotes” and ‘apostrophes’…
"""

_WORDS = {
    "det": "the a my our your their this that every one some no another each",
    "adj": "red blue green small large old new quiet loud bright dark warm cold happy sad "
    "quick slow gentle strange simple long short heavy light early late busy empty full "
    "careful clever brave tired lucky golden silver wooden tiny huge",
    "noun": "cat dog bird fish horse teacher student doctor farmer painter robot model server "
    "request token cache layer garden river mountain forest city village station harbour boat "
    "train window door table chair book letter story song poem question answer morning evening "
    "night winter summer spring autumn apple bread coffee tea water stone flower tree road "
    "bridge house kitchen market school library computer program number memory machine friend "
    "family child mother father brother sister king queen castle island ocean cloud star moon",
    "verb": "sees likes finds builds reads writes carries paints remembers follows answers opens "
    "closes watches makes takes gives sends keeps leaves moves brings holds loves needs wants "
    "counts cleans fixes draws sings plays visits chooses explains forgets learns teaches",
    "tail": "today yesterday tomorrow at night in the garden after lunch near the station "
    "with great care again before dinner by the river in the morning under the old bridge "
    "without a word for a long time every day on the hill",
}
_GRAMMAR = {kind: words.split() for kind, words in _WORDS.items()}


def training_corpus() -> list[str]:
    """The text the tokenizer learns from: fixed prose plus seeded generated sentences."""
    rng = random.Random(1234)
    lines = _PROSE.splitlines()
    g = _GRAMMAR

    def phrase() -> str:
        return f"{rng.choice(g['det'])} {rng.choice(g['adj'])} {rng.choice(g['noun'])}"

    for _ in range(3000):
        sentence = f"{phrase()} {rng.choice(g['verb'])} {phrase()}"
        if rng.random() < 0.5:
            sentence += " " + " ".join(rng.sample(g["tail"], 2))
        lines.append(sentence[0].upper() + sentence[1:] + rng.choice(".!?"))
        lines.append(f"{rng.randint(0, 9999)} + {rng.randint(0, 999)} = {rng.randint(0, 99999)}")
    return lines


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


def init_weights(spec: ArchSpec, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    def linear(out_features: int, in_features: int) -> torch.Tensor:
        return normal(out_features, in_features, std=1 / math.sqrt(in_features))

    def norm(scale: float = 1.0) -> torch.Tensor:
        # Not all ones, so a norm weight that fails to load changes the output.
        return scale * (1 + normal(spec.hidden, std=0.1))

    q_size, kv_size = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
    # Tied weights: a large embedding would make each token's own logit dominate (the model
    # would echo its input), so keep it small and widen the logits with the final norm.
    embed_std, final_norm_scale = (0.1, 3.0) if spec.tied else (1.0, 1.0)
    w = {"model.embed_tokens.weight": normal(vocab, spec.hidden, std=embed_std)}
    for i in range(spec.layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm()
        w[p + "self_attn.q_proj.weight"] = linear(q_size, spec.hidden)
        w[p + "self_attn.k_proj.weight"] = linear(kv_size, spec.hidden)
        w[p + "self_attn.v_proj.weight"] = linear(kv_size, spec.hidden)
        if spec.qkv_bias:
            w[p + "self_attn.q_proj.bias"] = normal(q_size, std=0.2)
            w[p + "self_attn.k_proj.bias"] = normal(kv_size, std=0.2)
            w[p + "self_attn.v_proj.bias"] = normal(kv_size, std=0.2)
        w[p + "self_attn.o_proj.weight"] = linear(spec.hidden, q_size)
        w[p + "post_attention_layernorm.weight"] = norm()
        w[p + "mlp.gate_proj.weight"] = linear(spec.intermediate, spec.hidden)
        w[p + "mlp.up_proj.weight"] = linear(spec.intermediate, spec.hidden)
        w[p + "mlp.down_proj.weight"] = linear(spec.hidden, spec.intermediate)
    w["model.norm.weight"] = norm(final_norm_scale)
    if not spec.tied:
        # Logits with a standard deviation of about 4: top-1 and top-2 rarely come close.
        w["lm_head.weight"] = normal(vocab, spec.hidden, std=4 / math.sqrt(spec.hidden))
    return w


def model_config(
    spec: ArchSpec, vocab: int, tok: Tokenizer, rope_scaling: dict[str, Any] | None, dtype: str
) -> dict[str, Any]:
    bos = spec.tokenizer.bos
    config: dict[str, Any] = {
        "architectures": [spec.architecture],
        "model_type": spec.model_type,
        "vocab_size": vocab,
        "hidden_size": spec.hidden,
        "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_positions,
        "rms_norm_eps": spec.rms_norm_eps,
        "rope_theta": spec.rope_theta,
        "rope_scaling": rope_scaling,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": spec.tied,
        "use_cache": True,
        "bos_token_id": tok.token_to_id(bos) if bos else None,
        "eos_token_id": tok.token_to_id(spec.tokenizer.model_eos),
        "torch_dtype": dtype,
    }
    if spec.write_head_dim:
        config["head_dim"] = spec.head_dim
    config.update(spec.extra_config)
    return config


def generation_config(spec: TokenizerSpec, tok: Tokenizer) -> dict[str, Any]:
    eos = dict.fromkeys([spec.model_eos, spec.eos, IM_END])
    config: dict[str, Any] = {"eos_token_id": [tok.token_to_id(t) for t in eos]}
    if spec.bos:
        config["bos_token_id"] = tok.token_to_id(spec.bos)
    return config


def tokenizer_config(spec: TokenizerSpec, tok: Tokenizer, max_positions: int) -> dict[str, Any]:
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    added = {
        str(tok.token_to_id(t)): {"content": t, **flags, "special": True}
        for t in spec.special_tokens
    }
    return {
        "added_tokens_decoder": added,
        "bos_token": spec.bos,
        "eos_token": spec.eos,
        "pad_token": spec.pad,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_positions,
        "tokenizer_class": spec.tokenizer_class,
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def make_tiny_model(
    out_dir: str | Path,
    arch: str = "llama",
    seed: int = 0,
    chat_template_in: str = "jinja",
    rope_scaling: str | None = None,
    dtype: str = "float32",
    force: bool = False,
) -> Path:
    """Write the model into `out_dir` and return its path.

    chat_template_in: "jinja" writes chat_template.jinja (transformers >= 4.50);
    "tokenizer_config" puts it under tokenizer_config.json's "chat_template" (older layout).
    rope_scaling: None or "llama3".
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose from {sorted(ARCHS)}")
    if chat_template_in not in ("jinja", "tokenizer_config"):
        raise ValueError(
            f"chat_template_in must be 'jinja' or 'tokenizer_config', not {chat_template_in!r}"
        )
    if rope_scaling not in (None, "llama3"):
        raise ValueError(f"rope_scaling must be None or 'llama3', not {rope_scaling!r}")
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, not {dtype!r}")
    spec = ARCHS[arch]
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not force:
            raise FileExistsError(f"{out} is not empty; pass force=True (--force) to overwrite")
        for name in OUTPUT_FILES:
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    tok = train_tokenizer(spec.tokenizer)
    n_tokens = tok.get_vocab_size(with_added_tokens=True)
    vocab = -(-n_tokens // spec.vocab_multiple) * spec.vocab_multiple
    tok.save(str(out / "tokenizer.json"))

    scaling = dict(LLAMA3_ROPE_SCALING) if rope_scaling == "llama3" else None
    _write_json(out / "config.json", model_config(spec, vocab, tok, scaling, dtype))
    _write_json(out / "generation_config.json", generation_config(spec.tokenizer, tok))
    tok_config = tokenizer_config(spec.tokenizer, tok, spec.max_positions)
    if chat_template_in == "jinja":
        (out / "chat_template.jinja").write_text(spec.chat_template, encoding="utf-8")
    else:
        tok_config["chat_template"] = spec.chat_template
    _write_json(out / "tokenizer_config.json", tok_config)

    weights = init_weights(spec, vocab, seed)
    target = getattr(torch, dtype)
    weights = {name: t.to(target).contiguous() for name, t in weights.items()}
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)  # safetensors writes 0600; containers read it
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--arch", choices=sorted(ARCHS), default="llama")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--chat-template-in", choices=["jinja", "tokenizer_config"], default="jinja"
    )
    parser.add_argument("--rope-scaling", choices=["llama3"], default=None)
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--force", action="store_true", help="overwrite this script's files")
    args = parser.parse_args(argv)
    try:
        out = make_tiny_model(
            args.out_dir,
            arch=args.arch,
            seed=args.seed,
            chat_template_in=args.chat_template_in,
            rope_scaling=args.rope_scaling,
            dtype=args.dtype,
            force=args.force,
        )
    except (FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote a tiny {args.arch} model to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
