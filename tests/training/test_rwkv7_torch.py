"""The torch RWKV-7 the byte model is trained with (training/rwkv7_torch.py): its logits against
the `rwkv` package's RWKV-7 (a child process), its chunked wkv against the token-by-token
recurrence, and the training script's checkpoint against the official layout."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from rwkv7_torch import RWKV7, init_weights, wkv_chunked, wkv_seq  # noqa: E402  (training/)


@pytest.mark.slow
def test_logits_match_the_rwkv_package(slot_models):
    """3 layers x 192, vocab 301, LoRA widths 40/36/20/56: the window form (chunked wkv, T not a
    multiple of the chunk) and one token per call both give the package's teacher-forced logits."""
    v7 = slot_models("7")
    sd, tokens, want = v7.sd, v7.tokens, v7.reference
    for chunk in (16, 0):
        model = RWKV7.from_state_dict(sd, chunk=chunk)
        with torch.no_grad():
            got = model(torch.tensor([tokens]))[0][0].numpy()
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), chunk
    with torch.no_grad():
        got = RWKV7.from_state_dict(sd).steps(tokens[:12])[0].numpy()
    assert np.abs(got - want[:12]).max() <= 1e-4 * np.abs(want).max()


@pytest.mark.parametrize("T, chunk", [(37, 16), (37, 5), (8, 16), (1, 16)])
def test_chunked_wkv_equals_the_recurrence_in_float64(T, chunk):
    """Random r, k, v, a, unit kk, decays over RWKV-7's whole range, a nonzero start state."""
    g = torch.Generator().manual_seed(T * 100 + chunk)
    B, H, N = 2, 3, 8
    d = torch.float64
    r, k, v = (torch.randn(B, T, H, N, dtype=d, generator=g) for _ in range(3))
    lw = -0.606531 * torch.rand(B, T, H, N, dtype=d, generator=g)
    kk = torch.nn.functional.normalize(torch.randn(B, T, H, N, dtype=d, generator=g), dim=-1)
    a = torch.rand(B, T, H, N, dtype=d, generator=g)
    s0 = torch.randn(B, H, N, N, dtype=d, generator=g)
    y1, s1 = wkv_seq(r, lw.exp(), k, v, kk, a, s0)
    y2, s2 = wkv_chunked(r, lw, k, v, kk, a, s0, chunk)
    assert (y1 - y2).abs().max() <= 1e-12 * y1.abs().max()
    assert (s1 - s2).abs().max() <= 1e-12 * s1.abs().max()


@pytest.mark.slow
def test_windows_carry_the_state(slot_models):
    """Two windows with the state carried equal one window (what training and --eval rely on)."""
    sd, tokens = slot_models("7").sd, slot_models("7").tokens
    model = RWKV7.from_state_dict(sd, dtype=torch.float64)
    ids = torch.tensor([tokens[:20], tokens[10:30]])
    with torch.no_grad():
        whole, _ = model(ids)
        a, st = model(ids[:, :13])
        b, _ = model(ids[:, 13:], st)
    assert (torch.cat([a, b], 1) - whole).abs().max() <= 1e-10 * whole.abs().max()


@pytest.mark.slow
def test_the_training_script_writes_an_official_rwkv7_checkpoint(tmp_path):
    import train
    from rwkv2rknn.models import rwkv7
    from rwkv2rknn.models.checkpoint import load_checkpoint

    model = init_weights(RWKV7(2, 128, train.VOCAB, 64, lora={"w": 24, "a": 40, "v": 16, "g": 56}), 0)
    path = str(tmp_path / "m.pth")
    train.save(model, path)
    sd = torch.load(path, weights_only=True)
    assert {v.dtype for v in sd.values()} == {torch.float16}
    shape = rwkv7.check_state_dict(load_checkpoint(path))
    assert (shape.layers, shape.width, shape.head_size, dict(shape.lora)) == (
        2,
        128,
        64,
        {"w": 24, "a": 40, "v": 16, "g": 56},
    )
    assert "blocks.0.att.v1" not in sd and sd["blocks.1.att.v1"].shape == (128, 16)
    assert isinstance(train.load_model(path), RWKV7)
