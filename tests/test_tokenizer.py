"""services/hf/tokenizer.py against transformers' AutoTokenizer on the tiny models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import transformers  # the oracle (a test dependency)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models

from services.hf.text_stream import IncrementalDetokenizer, StopStringMatcher
from services.hf.tokenizer import ChatTemplateError, Tokenizer
from services.models import tiny

ARCHS = sorted(tiny.ARCHS)
FUZZ = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

TEXTS = [
    "",
    "Hello, world!",
    "  leading spaces and trailing   ",
    "Numbers 1234567 and 3.14159",
    "Café naïve 你好世界 🙂🚀 e\u0301",
    "<|im_start|>user\nhi<|im_end|>",
    "<|begin_of_text|>text<|end_of_text|><|endoftext|>",
    "line one\n\n\tline two\r\n",
    "don't I'LL we've",
]

CHATS = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "Café? 你好 🙂"},
    ],
    [
        {"role": "user", "content": "one", "name": None},
        {"role": "assistant", "content": "two"},
        {"role": "user", "content": "three"},
    ],
]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tok")
    dirs = {arch: tiny.make_tiny_model(root / arch, arch) for arch in ARCHS}
    dirs["llama-tc"] = tiny.make_tiny_model(
        root / "llama-tc", "llama", chat_template_in="tokenizer_config"
    )
    return dirs


@pytest.fixture(scope="module")
def pairs(model_dirs: dict[str, Path]) -> dict[str, tuple[Tokenizer, object]]:
    return {
        name: (Tokenizer.from_model_dir(d), transformers.AutoTokenizer.from_pretrained(d))
        for name, d in model_dirs.items()
    }


@pytest.mark.parametrize("arch", ARCHS)
def test_encode_decode_match_transformers(pairs: dict, arch: str) -> None:
    ours, hf = pairs[arch]
    for text in TEXTS:
        for special in (True, False):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == hf.encode(text, add_special_tokens=special), (text, special)
            for skip in (True, False):
                assert ours.decode(ids, skip) == hf.decode(ids, skip_special_tokens=skip)
    assert (ours.bos_token_id, ours.vocab_size) == (hf.bos_token_id, len(hf))


@pytest.mark.parametrize("arch", ARCHS)
@FUZZ
@given(text=st.text(max_size=40))
def test_encode_fuzz_matches_transformers(pairs: dict, arch: str, text: str) -> None:
    ours, hf = pairs[arch]
    assert ours.encode(text) == hf.encode(text)


@pytest.mark.parametrize("arch", ARCHS)
@FUZZ
@given(data=st.data())
def test_decode_fuzz_matches_transformers(pairs: dict, arch: str, data: st.DataObject) -> None:
    ours, hf = pairs[arch]
    ids = data.draw(st.lists(st.integers(0, ours.vocab_size - 1), max_size=20))
    skip = data.draw(st.booleans())
    assert ours.decode(ids, skip) == hf.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("arch", ARCHS)
def test_special_token_ids(model_dirs: dict, pairs: dict, arch: str) -> None:
    ours, hf = pairs[arch]
    generation = json.loads((model_dirs[arch] / "generation_config.json").read_text())
    assert hf.eos_token_id in ours.eos_token_ids
    assert set(generation["eos_token_id"]) <= set(ours.eos_token_ids)
    assert ours.token_to_id("<|im_end|>") in ours.eos_token_ids
    assert len(set(ours.eos_token_ids)) == len(ours.eos_token_ids)
    if arch == "qwen2":
        assert ours.bos_token_id is None
    else:
        assert ours.encode("x")[0] == ours.bos_token_id == ours.token_to_id("<|begin_of_text|>")


@pytest.mark.parametrize("name", [*ARCHS, "llama-tc"])
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_chat_template_matches_transformers(
    pairs: dict, name: str, generation_prompt: bool
) -> None:
    ours, hf = pairs[name]
    chats = CHATS if name != "mistral" else [CHATS[0], CHATS[2]]  # [INST]: no system role
    for chat in chats:
        expected = hf.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=generation_prompt
        )
        assert ours.apply_chat_template(chat, add_generation_prompt=generation_prompt) == expected


def test_chat_template_details(pairs: dict) -> None:
    llama, _ = pairs["llama"]
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    ]
    assert llama.apply_chat_template(parts) == (
        "<|begin_of_text|><|im_start|>user\nab<|im_end|>\n<|im_start|>assistant\n"
    )
    # Rendered without "-" markers: only right with trim_blocks and lstrip_blocks.
    qwen, _ = pairs["qwen2"]
    assert qwen.apply_chat_template([{"role": "user", "content": "hi"}]) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    mistral, _ = pairs["mistral"]
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert mistral.apply_chat_template(chat) == "<|begin_of_text|>[INST] q [/INST]a<|end_of_text|>"


@pytest.mark.parametrize(
    ("name", "chat", "message"),
    [
        ("llama", [{"role": "robot", "content": "x"}], "Unsupported role"),
        ("llama", [{"role": "user", "content": "x"}, {"role": "system", "content": "y"}], "first"),
        ("mistral", [{"role": "assistant", "content": "x"}], "alternate"),
        ("qwen2", [], "at least one message"),
    ],
)
def test_chat_template_refusals(pairs: dict, name: str, chat: list, message: str) -> None:
    ours, hf = pairs[name]
    with pytest.raises(ChatTemplateError, match=message):
        ours.apply_chat_template(chat)
    with pytest.raises(Exception):  # noqa: B017 - transformers raises TemplateError or ValueError
        hf.apply_chat_template(chat, tokenize=False)


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_tokenizer_config(path: Path, **changes: object) -> None:
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.update(changes)
    (path / "tokenizer_config.json").write_text(json.dumps(config))


def test_template_sources(model_dirs: dict, tmp_path: Path) -> None:
    jinja_dir, tc_dir = model_dirs["llama"], model_dirs["llama-tc"]
    template = (jinja_dir / "chat_template.jinja").read_text()
    assert Tokenizer.from_model_dir(tc_dir).chat_template == template

    named = _copy_model(tc_dir, tmp_path / "named")
    _edit_tokenizer_config(
        named,
        chat_template=[
            {"name": "tool_use", "template": "TOOLS"},
            {"name": "default", "template": "{{ messages[0]['content'] }}!"},
        ],
    )
    assert Tokenizer.from_model_dir(named).apply_chat_template(
        [{"role": "user", "content": "x"}]
    ) == ("x!")

    # chat_template.jinja takes precedence over tokenizer_config.json.
    both = _copy_model(tc_dir, tmp_path / "both")
    (both / "chat_template.jinja").write_text("J{{ bos_token }}")
    assert Tokenizer.from_model_dir(both).apply_chat_template(CHATS[0]) == "J<|begin_of_text|>"

    none = _copy_model(tc_dir, tmp_path / "none")
    _edit_tokenizer_config(none, chat_template=None)
    tok = Tokenizer.from_model_dir(none)
    assert tok.encode("still encodes")
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tok.apply_chat_template(CHATS[0])

    with pytest.raises(ValueError, match="no tokenizer.json"):
        Tokenizer.from_model_dir(tmp_path)


def test_template_sandbox_and_extras(model_dirs: dict, tmp_path: Path) -> None:
    path = _copy_model(model_dirs["llama"], tmp_path / "m")
    (path / "chat_template.jinja").write_text(
        "{% generation %}{{ tools | tojson }}{% endgeneration %}|{{ extra }}|"
        "{{ messages.__class__.__mro__ }}"
    )
    tok = Tokenizer.from_model_dir(path)
    with pytest.raises(ChatTemplateError):
        tok.apply_chat_template(CHATS[0])  # the sandbox refuses dunder access
    (path / "chat_template.jinja").write_text(
        "{% generation %}{{ tools | tojson }}{% endgeneration %}|{{ extra }}"
    )
    tok = Tokenizer.from_model_dir(path)
    out = tok.apply_chat_template(CHATS[0], tools=[{"name": "é<>"}], extra=3)
    assert out == '[{"name": "é<>"}]|3'


# --- incremental detokenization -------------------------------------------------------------


def _chunks(draw: st.DrawFn, ids: list[int]) -> list[list[int]]:
    chunks, i = [], 0
    while i < len(ids):
        n = draw(st.integers(1, 4))
        chunks.append(ids[i : i + n])
        i += n
    return chunks


@pytest.mark.parametrize("arch", ARCHS)
@FUZZ
@given(data=st.data())
def test_incremental_detokenizer_fuzz(pairs: dict, arch: str, data: st.DataObject) -> None:
    tok, _ = pairs[arch]
    ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=40))
    skip = data.draw(st.booleans())
    full = tok.decode(ids, skip)
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    emitted = ""
    for chunk in _chunks(data.draw, ids):
        emitted += detok.feed(chunk)
        # Nothing emitted is ever taken back.
        assert full.startswith(emitted)
    assert emitted + detok.flush() == full


@pytest.mark.parametrize("arch", ARCHS)
@FUZZ
@given(prompt=st.text(max_size=20), answer=st.text(max_size=20))
def test_incremental_detokenizer_after_prompt(
    pairs: dict, arch: str, prompt: str, answer: str
) -> None:
    tok, _ = pairs[arch]
    prompt_ids = tok.encode(prompt)
    answer_ids = tok.encode(answer, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, prompt_ids)
    text = "".join(detok.feed([i]) for i in answer_ids) + detok.flush()
    full = tok.decode(prompt_ids + answer_ids)
    assert text == full[len(tok.decode(prompt_ids)) :]


def test_incremental_detokenizer_holds_split_characters(pairs: dict) -> None:
    tok, _ = pairs["llama"]
    text = "ok 😀 ☃ 𝄞 done"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # the rare characters span several byte tokens
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.feed([i]) for i in ids]
    assert "" in deltas  # held while a character was incomplete
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + detok.flush() == text


def test_incremental_detokenizer_gives_the_first_token_context() -> None:
    """SentencePiece-style decoders drop the leading space of the first token decoded, so a
    reply's first word must be decoded after some prompt tokens to keep its space."""
    backend = BackendTokenizer(
        models.WordLevel(vocab={"▁hello": 0, "▁world": 1, "<unk>": 2}, unk_token="<unk>")
    )
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok = Tokenizer(backend, eos_token_ids=[])
    assert IncrementalDetokenizer(tok, prompt_ids=[0]).feed([1]) == " world"
    fresh = IncrementalDetokenizer(tok)
    assert fresh.feed([0]) + fresh.feed([1]) == "hello world"


# --- stop strings ---------------------------------------------------------------------------


def test_stop_string_within_one_delta() -> None:
    m = StopStringMatcher(["STOP"])
    r = m.feed("hello STOP world")
    assert (r.text, r.stop, m.stopped) == ("hello ", "STOP", "STOP")
    assert m.feed("more").text == "" and m.flush() == ""


def test_stop_string_across_deltas_is_held_then_cut() -> None:
    m = StopStringMatcher(["</end>"])
    assert m.feed("abc<").text == "abc"
    assert m.feed("/e").text == ""
    r = m.feed("nd> tail")
    assert (r.text, r.stop) == ("", "</end>")


def test_false_alarm_is_released() -> None:
    m = StopStringMatcher(["</end>"])
    assert m.feed("x </e").text == "x "
    assert m.feed("nx").text == "</enx"
    assert m.feed("</").text == ""
    assert m.flush() == "</"


def test_first_completed_stop_wins() -> None:
    m = StopStringMatcher(["abcd", "c"])
    r = m.feed("xabcd")
    assert (r.text, r.stop) == ("xab", "c")
    m = StopStringMatcher(["bc", "abc"])
    assert m.feed("zabc") == type(r)("z", "abc")  # both end together: the longer


def test_empty_stop_string_is_refused() -> None:
    with pytest.raises(ValueError):
        StopStringMatcher(["ok", ""])


@FUZZ
@given(data=st.data())
def test_stop_matcher_fuzz(data: st.DataObject) -> None:
    alphabet = "abc"
    text = data.draw(st.text(alphabet, max_size=30))
    stops = data.draw(st.lists(st.text(alphabet, min_size=1, max_size=4), min_size=1, max_size=3))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=6)))
    deltas = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]

    m = StopStringMatcher(stops)
    out, stop = "", None
    for delta in deltas:
        r = m.feed(delta)
        out += r.text
        if r.stop:
            stop = r.stop
            break
    else:
        out += m.flush()

    # Reference: at the end of each delta, look for stops in all text so far; the one that
    # completes first wins, and of two ending together the longer.
    expected_out, expected_stop = text, None
    for end in [*cuts, len(text)]:
        seen = text[:end]
        hits = [(seen.find(s) + len(s), seen.find(s), s) for s in stops if s in seen]
        if hits:
            _, start, expected_stop = min(hits)
            expected_out = text[:start]
            break
    assert (out, stop) == (expected_out, expected_stop)
