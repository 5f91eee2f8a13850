"""The one generation path: Session (prefill of new ids only, stop strings, cancel, state files)
and the server's state cache, on a small compiled artifact run by onnxruntime."""

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rwkv2rknn.errors import BadInput
from rwkv2rknn.runtime.sampler import Sampler
from rwkv2rknn.runtime.session import Session, StopText
from rwkv2rknn.runtime.statecache import StateCache, prefix_key
from rwkv2rknn.runtime.tokenizer import ByteTokenizer

VOCAB = 97  # conftest SMALL


@pytest.fixture(scope="module")
def model(fp32_plan_artifact):
    from rwkv2rknn.runtime.hybrid import HybridModel

    m = HybridModel(fp32_plan_artifact, backend="ort")
    yield m
    m.close()


def ids_of(seed, n):
    return [int(t) for t in np.random.default_rng(seed).integers(32, VOCAB, n)]


def greedy():
    return Sampler(temperature=0)


@pytest.mark.slow
def test_prefill_in_pieces_is_prefill_at_once_is_token_by_token(model):
    ids = ids_of(1, 45)
    a, b = Session(model, ByteTokenizer()), Session(model, ByteTokenizer())
    a.feed(ids[:20])
    a.feed(ids[20:21])
    a.feed(ids[21:])
    b.feed(ids)
    ref = model.logits(ids)[-1]
    assert a.tokens == b.tokens == ids
    np.testing.assert_allclose(a.logits, b.logits, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(a.logits, ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(a.state, b.state, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_a_second_turn_from_the_kept_state_is_the_whole_transcript_from_scratch(model):
    s = Session(model, ByteTokenizer())
    first = s.generate(ids_of(2, 12), greedy(), 15, stop_ids=())
    turn2 = ids_of(3, 9)
    second = s.generate(turn2, greedy(), 15, stop_ids=())
    assert second.prompt_tokens == 9  # only its own tokens were prefilled
    assert s.tokens == ids_of(2, 12) + first.ids + turn2 + second.ids

    fresh = Session(model, ByteTokenizer())
    again = fresh.generate(ids_of(2, 12) + first.ids + turn2, greedy(), 15, stop_ids=())
    assert again.ids == second.ids
    np.testing.assert_allclose(fresh.state, s.state, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_snapshot_restore_and_reset(model):
    s = Session(model, ByteTokenizer())
    s.feed(ids_of(4, 10))
    snap = s.snapshot()
    r1 = s.generate([40], greedy(), 8, stop_ids=())
    s.restore(snap)
    assert s.tokens == ids_of(4, 10)
    r2 = s.generate([40], greedy(), 8, stop_ids=())
    assert r1.ids == r2.ids
    s.reset()
    assert s.tokens == [] and s.logits is None


@pytest.mark.slow
def test_stop_strings_stop_ids_cancel_and_deadline(model):
    import time

    s = Session(model, ByteTokenizer())
    free = s.generate(ids_of(5, 10), greedy(), 30, stop_ids=())
    text = ByteTokenizer().decode(free.ids)
    assert free.finish_reason == "length" and len(free.ids) == 30
    # a stop string taken from the middle of what greedy writes: the reply ends before it
    stop = text[10:13]
    s.reset()
    seen = []
    r = s.generate(ids_of(5, 10), greedy(), 30, stop=[stop], stop_ids=(), on_text=seen.append)
    assert r.finish_reason == "stop" and r.text == text[: text.find(stop)]
    assert "".join(seen) == r.text
    assert len(s.tokens) == 10 + len(r.ids)  # the tokens of the stop string were fed too
    s.reset()
    r = s.generate(ids_of(5, 10), greedy(), 30, stop_ids=[free.ids[4]])
    assert r.finish_reason == "stop" and r.stop_id and r.ids == free.ids[: free.ids.index(free.ids[4])]
    s.reset()
    n = []
    r = s.generate(ids_of(5, 10), greedy(), 30, stop_ids=(), on_text=n.append, cancel=lambda: len(n) >= 3)
    assert r.finish_reason == "cancelled" and len(r.ids) == 3
    s.reset()
    r = s.generate(ids_of(5, 10), greedy(), 30, stop_ids=(), deadline=time.monotonic() - 1)
    assert r.finish_reason == "time" and r.ids == []


@pytest.mark.slow
def test_save_load_round_trip_and_refusals(model, fp32_dir, tmp_path):
    from rwkv2rknn.runtime.reference import PerLayerModel

    s = Session(model, ByteTokenizer())
    s.generate(ids_of(6, 20), greedy(), 5, stop_ids=())
    path = str(tmp_path / "chat.state")
    s.save(path)
    assert os.listdir(tmp_path) == ["chat.state"]  # no temporary file left
    want = s.generate([50], greedy(), 10, stop_ids=())

    t = Session(model, ByteTokenizer())
    t.load(path)
    assert len(t.tokens) == 25
    assert t.generate([50], greedy(), 10, stop_ids=()).ids == want.ids

    data = open(path, "rb").read()
    bad = tmp_path / "bad.state"
    bad.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(BadInput, match="damaged"):
        t.load(str(bad))
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadInput, match="damaged"):
        t.load(str(bad))
    bad.write_bytes(b"hello")
    with pytest.raises(BadInput, match="not an rwkv2rknn state file"):
        t.load(str(bad))
    with pytest.raises(BadInput, match="does not exist"):
        t.load(str(tmp_path / "missing.state"))

    other = Session(PerLayerModel(fp32_dir), ByteTokenizer())
    before = other.snapshot()
    with pytest.raises(BadInput) as e:
        other.load(path)
    assert "another model" in str(e.value) and "\n" not in str(e.value)
    assert other.tokens == before.tokens  # unchanged


@pytest.mark.slow
@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet="ab\n:U", max_size=40),
    stop=st.text(alphabet="ab\n:U", min_size=1, max_size=4),
    cuts=st.lists(st.integers(0, 40), max_size=8),
)
def test_stop_text_cuts_before_the_first_stop_whatever_the_pieces(text, stop, cuts):
    m = StopText([stop])
    bounds = sorted({0, len(text), *[c for c in cuts if c <= len(text)]})
    out = "".join(m.feed(text[a:b]) for a, b in zip(bounds, bounds[1:])) + m.flush()
    i = text.find(stop)
    assert out == (text if i < 0 else text[:i])
    assert m.stopped == (i >= 0)


# ------------------------------------------------------------------------------ the state cache


def arrays(value, logits=False):
    a = {"state": np.full(100, value, np.float32)}
    if logits:
        a["logits"] = np.full(VOCAB, value, np.float32)
    return a


def test_cache_finds_the_longest_prefix_and_evicts_the_least_recently_used():
    c = StateCache(max_bytes=3 * 420, identity="m")
    c.put([1, 2, 3], arrays(1))
    c.put([1, 2, 3, 4, 5], arrays(2))
    c.put([9, 9], arrays(3))
    k, a = c.lookup([1, 2, 3, 4, 5, 6], 6)
    assert k == 5 and a["state"][0] == 2
    assert c.lookup([1, 2, 3, 7], 4)[0] == 3
    assert c.lookup([1, 2], 2) == (0, None)
    assert c.lookup([1, 2, 3, 4, 5], 5)[0] == 3  # all of it only with its logits
    c.put([1, 2, 3, 4, 5, 6, 7], arrays(4, logits=True))  # evicts [9, 9], the least recently used
    assert c.lookup([9, 9, 1], 3) == (0, None)
    assert c.lookup([1, 2, 3, 4, 5, 6, 7], 7)[0] == 7
    assert c.bytes <= c.max_bytes


def test_cache_folder_survives_a_restart_and_skips_damaged_and_foreign_files(tmp_path, caplog):
    import logging

    d = str(tmp_path)
    c = StateCache(1 << 20, identity="m", folder=d)
    c.put([1, 2, 3], arrays(1))
    c.put([4, 5, 6, 7], arrays(2))
    c.put([8, 9], arrays(5))
    StateCache(1 << 20, identity="other", folder=str(tmp_path / "x")).put([5], arrays(0))
    files = sorted(n for n in os.listdir(d) if n.endswith(".state"))
    assert len(files) == 3 and prefix_key([1, 2, 3]) + ".state" in files
    damaged = os.path.join(d, prefix_key([4, 5, 6, 7]) + ".state")
    data = open(damaged, "rb").read()
    open(damaged, "wb").write(data[:-3])
    os.replace(
        os.path.join(d, "x", os.listdir(os.path.join(d, "x"))[0]), os.path.join(d, prefix_key([5]) + ".state")
    )
    with caplog.at_level(logging.WARNING, logger="rwkv2rknn.runtime.statecache"):
        again = StateCache(1 << 20, identity="m", folder=d)
    assert len(again) == 2
    assert again.lookup([1, 2, 3, 0], 4)[0] == 3
    assert again.lookup([4, 5, 6, 7, 0], 5) == (0, None)
    msgs = " | ".join(r.getMessage() for r in caplog.records)
    assert "damaged" in msgs and "another model" in msgs
