"""Token steps and prompts on a HybridModel, and the check that two runs agree: what the ort
loading tests share."""

import numpy as np


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
