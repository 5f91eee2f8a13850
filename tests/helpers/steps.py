"""Token steps and prompts on a HybridModel, the check that two runs agree, and a record of the
onnxruntime sessions it makes: what the ort loading tests share."""

from typing import NamedTuple

import numpy as np


class Made(NamedTuple):
    """One onnxruntime session made: its name, whether it prepacks, whether it has an arena, and
    the initializers given to it ({name: OrtValue}, a store's)."""

    what: str
    prepack: bool
    arena: bool
    initializers: dict


def spy_sessions(monkeypatch) -> list:
    """Every onnxruntime session made from now on, as ``Made`` records."""
    from rwkv2rknn.runtime import ort as ort_mod

    made = []
    real = ort_mod.make_session

    def spy(model, threads=0, what="model", prepack=True, initializers=None, arena=True, **more):
        made.append(Made(what, prepack, arena, dict(initializers or {})))
        return real(
            model, threads=threads, what=what, prepack=prepack, initializers=initializers, arena=arena, **more
        )

    monkeypatch.setattr(ort_mod, "make_session", spy)
    return made


def run_steps(model, tokens, state=None):
    """Logits [T, V] of one step a token, and the state after them."""
    state = model.init_state() if state is None else state
    return np.stack([model.step(int(t), state) for t in tokens]), state


def steps_then_prompt(model, tokens, k: int):
    """The first ``k`` tokens as token steps, the rest as one prompt: logits [T, V], state."""
    got, state = run_steps(model, tokens[:k])
    return np.concatenate([got, model.prefill(tokens[k:], state)]), state


def assert_same_run(got, state, want, want_state, tol: float) -> None:
    """Logits and state within ``tol`` of the largest logit."""
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * scale)
    np.testing.assert_allclose(state, want_state, rtol=0, atol=tol * scale)
