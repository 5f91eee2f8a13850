"""`rwkv2rknn chat` as a person uses it: the real command in a pseudo-terminal (pexpect)."""

import os
import re
import sys

import pytest
from helpers.robustness import as_from_a_terminal

pytestmark = pytest.mark.slow  # every test here takes more than a few seconds

pexpect = pytest.importorskip("pexpect")

STATS = re.compile(
    r"\[(\d+) tokens, ([\d.]+) tokens/s; prompt (\d+) tokens in \d+ ms; (\d+) in the conversation\]"
)


def spawn(artifact, *extra):
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    child = pexpect.spawn(
        sys.executable,
        ["-m", "rwkv2rknn", "chat", artifact, "--backend", "ort", "--temperature", "0", *extra],
        env=env,
        encoding="utf-8",
        timeout=60,
        dimensions=(40, 200),
        preexec_fn=as_from_a_terminal,  # Ctrl-C at the prompt as in a terminal, whoever runs the test
    )
    child.expect_exact("User: ")
    return child


def say(child, line):
    """Send a message; (reply text, stats match) once the next prompt is there."""
    child.sendline(line)
    child.expect_exact("Assistant:")
    child.expect(STATS)
    stats = child.match
    reply = child.before
    child.expect_exact("User: ")
    return reply.strip(), stats


def test_chat_keeps_the_state_between_turns_and_saves_resets_and_loads_it(bundled_artifact, tmp_path):
    from rwkv2rknn.runtime.chatformat import user_turn

    child = spawn(bundled_artifact, "--max-tokens", "40")
    try:
        r1, s1 = say(child, "Hello there")
        assert int(s1.group(1)) >= 1 and float(s1.group(2)) > 0  # tokens/s after each reply
        assert int(s1.group(3)) == len(user_turn("Hello there").encode())  # byte tokens
        n1 = int(s1.group(4))
        r2, s2 = say(child, "How are you?")
        # the second turn prefills only its own tokens, whatever came before
        assert int(s2.group(3)) == len(user_turn("How are you?").encode())
        assert int(s2.group(4)) == n1 + int(s2.group(3)) + int(s2.group(1)) + (
            0 if int(s2.group(1)) < 40 else 2
        )  # a cut reply is closed with a blank line

        saved = str(tmp_path / "talk.state")
        child.sendline(f"/save {saved}")
        child.expect(r"saved (\d+) tokens")
        assert int(child.match.group(1)) == int(s2.group(4))
        child.expect_exact("User: ")

        child.sendline("/reset")
        child.expect_exact("forgotten")
        child.expect_exact("User: ")
        again, s3 = say(child, "Hello there")
        assert again == r1 and int(s3.group(4)) == n1  # greedy from the same start

        child.sendline(f"/load {saved}")
        child.expect(r"loaded (\d+) tokens")
        assert int(child.match.group(1)) == int(s2.group(4))
        child.expect_exact("User: ")

        junk = tmp_path / "junk.state"
        junk.write_bytes(b"not a state")
        child.sendline(f"/load {junk}")
        child.expect(r"error: [^\n]*not an rwkv2rknn state file")
        child.expect_exact("User: ")
        child.sendline("/nonsense")
        child.expect_exact("unknown command")
        child.expect_exact("User: ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    assert os.path.getsize(saved) > 0


def test_ctrl_c_stops_the_reply_not_the_chat(bundled_artifact):
    child = spawn(bundled_artifact, "--max-tokens", "65536")
    try:
        child.sendline("Tell me a long story")
        child.expect_exact("Assistant:")
        child.expect(r"\w{3}")  # it is writing
        child.sendintr()
        child.expect(STATS, timeout=30)
        n, prompt, total = int(child.match.group(1)), int(child.match.group(3)), int(child.match.group(4))
        assert n < 65536
        assert total == prompt + n + 2  # the cut reply is closed with a blank line in the state
        child.expect_exact("(stopped)")
        child.expect_exact("User: ")
        # At the prompt: a hint, the chat goes on. Python's readline loses a Ctrl-C that lands
        # after the prompt is drawn but before it waits for keys (a narrow window, wide under
        # load); a person presses again, and so does the test.
        for _ in range(10):
            child.sendintr()
            if child.expect_exact(["/quit", pexpect.TIMEOUT], timeout=6) == 0:
                break
        else:
            raise AssertionError("Ctrl-C at the prompt never showed the hint")
        child.expect_exact("User: ")
        child.sendline("/reset")
        child.expect_exact("forgotten")
        child.expect_exact("User: ")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
