"""Streaming detokenization: pieces join to the full decode, never a U+FFFD the full decode lacks, and every
character is emitted with the id that completes it (no holding back)."""

from __future__ import annotations

import random

import pytest

from tokenizer_fixture import load_tokenizer, special_ids
from qwen_native.chat import IncrementalDecoder

TEXTS = [
    "你好，世界！今天天气很好。",
    "日本語のテキスト：こんにちは、元気ですか？",
    "😀🎉👍🏽🚀❤️👨‍👩‍👧🇫🇷🇯🇵 emoji in a row",
    "Combining: e\u0301 a\u0308 o\u0302 n\u0303 then Z\u0335\u0321\u0327a\u0334l\u0336g\u0337o\u0338",
    "Mixed: café 😀 中文 naïve 🎉 résumé Ω≈ç√ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢!",
    "plain ascii text, punctuation: ()[]{}!?.,;:",
    "\U0010FFFF\U0001F9D1\u200d\U0001F91D\u200d\U0001F9D1 edge code points",
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def stream(tok, ids):
    dec = IncrementalDecoder(tok)
    pieces = [dec.push(i) for i in ids]
    return pieces, dec.flush()


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_join_to_full_text(tok, text):
    ids = tok.encode(text).ids
    pieces, tail = stream(tok, ids)
    full = tok.decode(ids)
    assert "".join(pieces) + tail == full
    assert tail == ""
    assert "\ufffd" not in "".join(pieces)


@pytest.mark.parametrize("text", TEXTS)
def test_no_holding_back(tok, text):
    """After each id, everything whose bytes are complete has been emitted."""
    ids = tok.encode(text).ids
    dec = IncrementalDecoder(tok)
    emitted = ""
    for i in range(len(ids)):
        emitted += dec.push(ids[i])
        complete = tok.decode(ids[:i + 1]).rstrip("\ufffd")  # trailing U+FFFD = bytes still missing
        assert emitted == complete, (i, emitted, complete)


def test_multibyte_characters_really_are_split(tok):
    """The fixture's small vocabulary spells CJK and emoji in byte tokens, so the tests above do hold text."""
    ids = tok.encode("😀中").ids
    assert len(ids) > 2
    pieces, _ = stream(tok, ids)
    assert "" in pieces and "".join(pieces) == "😀中"


def test_emoji_and_punctuation_flow_immediately(tok):
    ids = tok.encode("Hi! 😀.").ids
    dec = IncrementalDecoder(tok)
    out = []
    for i in ids:
        out.append(dec.push(i))
    assert out[-1] == "."  # the final punctuation is emitted with its own id
    assert "".join(out) == "Hi! 😀."


def test_special_tokens_are_skipped(tok):
    sp = special_ids()
    ids = tok.encode("ab").ids + [sp["<|im_end|>"]] + tok.encode("你").ids + [sp["<|endoftext|>"]]
    pieces, tail = stream(tok, ids)
    assert "".join(pieces) + tail == "ab你" == tok.decode(ids)
    dec = IncrementalDecoder(tok, skip_special_tokens=False)
    assert "".join(dec.push(i) for i in ids) + dec.flush() == "ab<|im_end|>你<|endoftext|>"


def byte_ids(tok, data: bytes):
    """Ids of single-byte tokens spelling `data` (byte-level alphabet)."""
    from tokenizers.pre_tokenizers import ByteLevel  # noqa: F401 - the mapping below is GPT-2's

    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = {b: chr(c) for b, c in zip(bs, cs)}
    return [tok.token_to_id(table[b]) for b in data]


def test_invalid_bytes_match_the_full_decode(tok):
    """Bytes that are not UTF-8 come out as U+FFFD exactly where the full decode has them, no more."""
    cases = [
        b"ok \x80 lone continuation",
        b"cut \xe4\xb8 then ascii",
        b"\xf0\x9f\x98 three of four, then a complete \xf0\x9f\x98\x80",
        b"ends mid-character \xe4\xb8",
        b"\xff\xfe invalid leads",
    ]
    for data in cases:
        ids = byte_ids(tok, data)
        assert None not in ids
        pieces, tail = stream(tok, ids)
        full = tok.decode(ids)
        assert "".join(pieces) + tail == full
        assert ("".join(pieces) + tail).count("\ufffd") == full.count("\ufffd")
    # an incomplete character at the very end is only released by flush(), as the full decode shows it
    ids = byte_ids(tok, b"abc\xe4\xb8")
    pieces, tail = stream(tok, ids)
    assert "".join(pieces) == "abc" and tail == "\ufffd" == tok.decode(ids)[3:]


def test_random_id_sequences(tok):
    rng = random.Random(1234)
    n = tok.get_vocab_size()
    for _ in range(300):
        ids = [rng.randrange(n) for _ in range(rng.randrange(1, 40))]
        pieces, tail = stream(tok, ids)
        full = tok.decode(ids, skip_special_tokens=True)
        assert "".join(pieces) + tail == full
        assert ("".join(pieces) + tail).count("\ufffd") == full.count("\ufffd")


def test_ids_beyond_the_tokenizer_are_ignored(tok):
    """A padded embedding (Qwen2: 151,936 rows, 151,665 tokens) can produce ids the tokenizer lacks."""
    ids = tok.encode("ab").ids + [tok.get_vocab_size() + 5] + tok.encode("c").ids
    pieces, tail = stream(tok, ids)
    assert "".join(pieces) + tail == "abc"
