import importlib.util
import json
import os
import subprocess
import sys

import pytest

from rwkv2rknn.runtime import tokenizer as tkmod
from rwkv2rknn.errors import BadInput, MissingDependency
from rwkv2rknn.runtime.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    StreamDecoder,
    WorldTokenizer,
    find_world_vocab,
    load_tokenizer,
    tokenizer_for_vocab,
)

TEXTS = [
    "",
    "Hello, world!",
    "café naïve façade Ångström",
    "東京タワーは高い。中文测试",
    "emoji 😀👍🏽 family 👨‍👩‍👧",
    "mixed\n\tws  \r\n  double  spaces   and tabs\t\t",
    "\x00\x01 control \x7f chars",
    "Ελληνικά русский עברית العربية",
]

HAVE_RWKV = importlib.util.find_spec("rwkv") is not None


@pytest.fixture(scope="module")
def world():
    if not HAVE_RWKV:
        pytest.skip("rwkv package not installed")
    return load_tokenizer("world")


def _reference_world_tokenizer():
    """The rwkv package's own tokenizer, loaded from its file without importing the rwkv package."""
    path = os.path.join(os.path.dirname(find_world_vocab()), "rwkv_tokenizer.py")
    if not os.path.isfile(path):
        return None
    spec = importlib.util.spec_from_file_location("_rwkv_reference_tokenizer", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.TRIE_TOKENIZER(find_world_vocab())


# --- module hygiene ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_import_needs_only_numpy_and_stdlib():
    code = (
        "import sys, rwkv2rknn.runtime.tokenizer, rwkv2rknn.runtime.generate\n"
        "bad = [m for m in ('tokenizers', 'rwkv', 'torch') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "rwkv2rknn.runtime.tokenizer.load_tokenizer('world')\n"
        "bad = [m for m in ('tokenizers', 'rwkv', 'torch') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# --- bytes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_bytes_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")


def test_bytes_basics():
    tok = load_tokenizer("bytes")
    assert isinstance(tok, ByteTokenizer)
    assert tok.vocab_size == 256 and tok.name == "bytes"
    assert tok.decode([0xE6, 0x9D]) == "\ufffd"  # invalid UTF-8 is replaced, not an error
    with pytest.raises(ValueError):
        tok.decode([256])


# --- world ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_world_round_trip(world, text):
    ids = world.encode(text)
    assert all(1 <= i < world.vocab_size for i in ids)
    assert world.decode(ids) == text
    assert world.decode_bytes(ids) == text.encode("utf-8")


def test_world_vocab_and_known_tokens(world):
    assert world.vocab_size == 65536
    assert os.path.basename(find_world_vocab()) == "rwkv_vocab_v20230424.txt"
    assert world.encode("\x00") == [1]  # id 0 is end-of-text; bytes start at 1
    assert world.decode([0]) == ""
    assert world.encode(" the") == [world.token_id(b" the")]


def test_world_every_single_byte_is_a_token(world):
    for b in range(256):
        tid = world.token_id(bytes([b]))
        assert tid is not None, f"byte {b} has no token"
        assert world.encode_bytes(bytes([b])) == [tid]
        assert world.decode_bytes([tid]) == bytes([b])
    data = bytes(range(256)) * 3
    assert world.decode_bytes(world.encode_bytes(data)) == data


def test_world_every_byte_encodable_in_text(world):
    # All 256 byte values appear via the latin-1 range and multi-byte characters.
    text = "".join(chr(c) for c in range(0, 0x800, 3)) + "".join(chr(c) for c in range(0x10000, 0x10100))
    ids = world.encode(text)
    assert world.decode(ids) == text


def test_world_longest_match_wins(world):
    pairs = []
    for tid in range(1, world.vocab_size):
        tok = world.token_bytes(tid)
        if len(tok) >= 4 and tok.isascii() and tok.isalpha():
            shorter = world.token_id(tok[:-1])
            if shorter is not None:
                pairs.append((tok, tid, tok[:-1], shorter))
        if len(pairs) >= 50:
            break
    assert pairs
    for longer, lid, prefix, pid in pairs:
        assert world.encode(longer.decode()) == [lid]
        assert world.encode(prefix.decode()) == [pid]


@pytest.mark.slow
def test_world_matches_reference_implementation(world):
    ref = _reference_world_tokenizer()
    if ref is None:
        pytest.skip("rwkv_tokenizer.py not shipped")
    with open(tkmod.__file__, encoding="utf-8") as f:
        source = f.read()
    for text in TEXTS + [source]:
        assert world.encode(text) == ref.encode(text)


def test_world_is_fast(world):
    import time

    text = ("The quick brown fox — café 東京 😀 jumps.\n" * 4000)[:100_000]
    t = time.perf_counter()
    ids = world.encode(text)
    assert time.perf_counter() - t < 2.0
    assert world.decode(ids) == text


def _write_vocab(path, entries):
    with open(path, "w", encoding="utf-8") as f:
        for tid, lit, n in entries:
            f.write(f"{tid} {lit} {n}\n")


def test_world_small_vocab_file(tmp_path):
    entries = [(i + 1, repr(bytes([i])) if i >= 128 else repr(chr(i)), 1) for i in range(256)]
    entries += [(300, repr("ab"), 2), (301, repr("abc"), 3), (302, repr("abcde"), 5), (303, repr("é"), 2)]
    entries += [(304, repr("x y"), 3), (305, repr(b"\xe6\x9d"), 2)]
    path = tmp_path / "vocab.txt"
    _write_vocab(path, entries)
    tok = load_tokenizer(f"world:{path}")
    assert isinstance(tok, WorldTokenizer)
    assert tok.encode("abcdef") == [302, ord("f") + 1]
    assert tok.encode("abcd") == [301, ord("d") + 1]
    assert tok.encode("ab") == [300]
    assert tok.encode("x y é") == [304, ord(" ") + 1, 303]
    assert tok.decode([305]) == "\ufffd"  # half a character
    assert tok.decode_bytes([305]) == b"\xe6\x9d"


@pytest.mark.parametrize(
    "line, why",
    [
        ("1 'a' 2", "has 1 bytes"),
        ("1 __import__('os') 1", "not a Python literal"),
        ("x 'a' 1", "not a number"),
        ("1 5 1", "neither str nor bytes"),
        ("1'a'", "too few fields"),
    ],
)
def test_world_bad_vocab_line(tmp_path, line, why):
    path = tmp_path / "vocab.txt"
    path.write_text(line + "\n", encoding="utf-8")
    with pytest.raises(BadInput) as e:
        WorldTokenizer.from_file(str(path))
    assert "line 1" in str(e.value) and why in str(e.value)


def test_world_missing_file():
    with pytest.raises(BadInput) as e:
        load_tokenizer("world:/no/such/rwkv_vocab_v20230424.txt")
    assert "/no/such/rwkv_vocab_v20230424.txt" in str(e.value)
    assert "pip install rwkv" in str(e.value)


def test_find_world_vocab_without_rwkv(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingDependency) as e:
        find_world_vocab()
    assert "pip install rwkv" in str(e.value)


# --- Hugging Face -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_json(tmp_path_factory):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = ["The quick brown fox jumps over the lazy dog.", "Café au lait, 東京タワー, 😀 emoji."] * 5
    tok.train_from_iterator(corpus, trainer=trainer)
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.mark.parametrize("text", [t for t in TEXTS if "\x00" not in t])
def test_hf_round_trip(hf_json, text):
    for spec in (str(hf_json), f"hf:{hf_json}", str(hf_json.parent)):
        tok = load_tokenizer(spec)
        assert isinstance(tok, HFTokenizer)
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
        assert tok.decode_bytes(ids) == text.encode("utf-8")


def test_hf_matches_library_decode(hf_json):
    import tokenizers

    ref = tokenizers.Tokenizer.from_file(str(hf_json))
    tok = load_tokenizer(str(hf_json))
    assert tok.supports_bytes
    text = "The lazy café 東京 😀"
    ids = tok.encode(text)
    assert ids == ref.encode(text, add_special_tokens=False).ids
    assert tok.decode([0] + ids) == ref.decode([0] + ids)  # special tokens are skipped


def test_hf_stream(hf_json):
    tok = load_tokenizer(str(hf_json))
    text = "Le café 東京タワー 😀👍🏽!"
    sd = StreamDecoder(tok)
    pieces = [sd.feed(i) for i in tok.encode(text)]
    pieces.append(sd.flush())
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_hf_invalid_json(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(BadInput) as e:
        load_tokenizer(str(bad))
    assert str(e.value).startswith(f"cannot read tokenizer '{bad}'")
    bad.write_text(json.dumps({"model": {"type": "Nonsense"}}), encoding="utf-8")
    with pytest.raises(BadInput) as e:
        load_tokenizer(f"hf:{bad}")
    assert "cannot read tokenizer" in str(e.value)


def test_hf_missing_package(hf_json, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` fail
    with pytest.raises(MissingDependency) as e:
        load_tokenizer(str(hf_json))
    assert "pip install tokenizers" in str(e.value)


# --- streaming ----------------------------------------------------------------------------------------


def test_stream_decoder_split_character():
    tok = ByteTokenizer()
    sd = StreamDecoder(tok)
    ids = list("a東😀b".encode("utf-8"))
    out = [sd.feed(i) for i in ids]
    assert out == ["a", "", "", "東", "", "", "", "😀", "b"]
    assert sd.flush() == ""


def test_stream_decoder_incomplete_tail_and_invalid_bytes():
    sd = StreamDecoder(ByteTokenizer())
    assert sd.feed(0xFF) == "\ufffd"  # can never be valid: replaced at once
    assert sd.feed(0xE6) == ""
    assert sd.feed(0x9D) == ""
    assert sd.flush() == "\ufffd"  # incomplete at the end
    assert sd.feed(ord("x")) == "x"  # usable again after flush


def test_stream_decoder_world(world):
    text = "Grüße aus 東京 😀👍🏽 — fin."
    ids = world.encode(text)
    sd = StreamDecoder(world)
    pieces = [sd.feed(i) for i in ids] + [sd.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_stream_decoder_split_across_world_tokens(world):
    # A character whose bytes are two tokens: its first bytes alone, then the rest.
    ch = "😀"
    data = ch.encode("utf-8")
    a, b = world.token_id(data[:2]), world.token_id(data[2:])
    if a is None or b is None:
        a = world.token_id(data[:1])
        rest = [world.token_id(data[i : i + 1]) for i in range(1, len(data))]
        ids = [a] + rest
    else:
        ids = [a, b]
    sd = StreamDecoder(world)
    out = [sd.feed(i) for i in ids]
    assert out[:-1] == [""] * (len(ids) - 1) and out[-1] == ch


# --- specs and errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, message",
    [
        ("nonsense", "unknown tokenizer 'nonsense': give 'bytes', 'world'"),
        ("", "no tokenizer given"),
        ("/no/such/dir/tokenizer.json", "cannot find the tokenizer file '/no/such/dir/tokenizer.json'"),
        ("missing.json", "cannot find the tokenizer file 'missing.json'"),
        ("hf:/no/such/tokenizer.json", "cannot find the tokenizer file '/no/such/tokenizer.json'"),
        ("world:", "no path after 'world:'"),
        ("hf:", "no path after 'hf:'"),
    ],
)
def test_bad_specs(spec, message):
    with pytest.raises(BadInput) as e:
        load_tokenizer(spec)
    assert message in str(e.value)


def test_tokenizer_for_vocab():
    assert tokenizer_for_vocab(256) == "bytes"
    assert tokenizer_for_vocab(65536) == "world"
    assert tokenizer_for_vocab(50277) is None
    assert tokenizer_for_vocab(50304) is None
