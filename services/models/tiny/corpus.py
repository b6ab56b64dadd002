"""The text the tiny tokenizer learns from: fixed prose plus seeded generated sentences."""

from __future__ import annotations

import random

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
