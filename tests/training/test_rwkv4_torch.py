"""The torch RWKV-4 the bundled model was trained with (training/rwkv4_torch.py): its token form
against the reference implementation, its sequence form (training) against its token form."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from rwkv4_torch import RWKV4  # noqa: E402  (training/, on the path by conftest.py)


@pytest.mark.slow
def test_token_form_matches_the_rwkv_package(small_sd, small_pth, tokens):
    from helpers.rwkv_package import package_logits  # tests/: the package in a child process

    want = package_logits(small_pth, tokens[:24], "4")
    model = RWKV4.from_state_dict(small_sd)
    with torch.no_grad():
        got = model.steps(tokens[:24])[0].numpy()
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


@pytest.mark.slow
@pytest.mark.parametrize("T, chunk, cut", [(23, 4, 9), (16, 16, 5), (7, 8, 1)])
def test_sequence_form_equals_token_by_token(small_sd, tokens, T, chunk, cut):
    """What training optimises (chunked WKV over windows, state carried between calls) is the
    per-token recurrence, in float64 to rounding."""
    model = RWKV4.from_state_dict(small_sd, chunk=chunk, dtype=torch.float64)
    ids = torch.tensor([tokens[:T], tokens[-T:]])
    with torch.no_grad():
        whole, _ = model(ids)
        a, st = model(ids[:, :cut])
        b, st = model(ids[:, cut:], st)
        for row in range(2):
            ref, state = model.steps(ids[row])
            assert (whole[row] - ref).abs().max() <= 1e-9 * ref.abs().max()
            assert (torch.cat([a[row], b[row]]) - ref).abs().max() <= 1e-9 * ref.abs().max()
            # the carried state is the recurrence's (pp may differ by the choice of maximum)
            for (f, x, aa, bb, pp), (f2, x2, aa2, bb2, pp2) in zip(
                [tuple(s[row] for s in lay) for lay in st], state
            ):
                assert torch.allclose(f, f2) and torch.allclose(x, x2)
                assert torch.allclose(aa * torch.exp(pp), aa2 * torch.exp(pp2))
                assert torch.allclose(bb * torch.exp(pp), bb2 * torch.exp(pp2))


def test_the_training_script_writes_an_official_checkpoint(tmp_path):
    import train
    from rwkv2rknn.models import bundled, rwkv4
    from rwkv2rknn.models.checkpoint import load_checkpoint

    model = train.init_weights(RWKV4(2, 32, train.VOCAB), seed=0)
    path = str(tmp_path / "m.pth")
    train.save(model, path)
    sd = torch.load(path, weights_only=True)
    assert {v.dtype for v in sd.values()} == {torch.float16}
    assert rwkv4.check_state_dict(load_checkpoint(path)) == rwkv4.Shape(2, 32, 128, 256)
    shipped = torch.load(bundled.checkpoint_path(), weights_only=True)
    assert {k for k in shipped if not k.startswith(("blocks.2.", "blocks.3."))} == set(sd)
