"""The chat format RWKV World and G1 models were trained with (BlinkDL's chat code):

    System: {system prompt}\\n\\n          (optional)
    User: {message}\\n\\n
    Assistant: {reply}\\n\\n
    User: {message}\\n\\n
    Assistant:                            <- the model continues from here

A reply ends where the model writes a blank line ("\\n\\n", which also ends "\\n\\nUser:"), so
no message may hold one: blank lines inside a message become single line breaks and the
message is trimmed, as BlinkDL's chat demo does. The model writes a space after "Assistant:";
a reply is shown without it.
"""

from __future__ import annotations

import re
from typing import Iterable, List, Tuple

TURN_END = "\n\n"  # what ends every turn, and the stop string of a reply
REPLY_START = "Assistant:"
ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}


def clean(text: str) -> str:
    """A message as the model may see it: CRLF as LF, trimmed, no blank lines inside."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").strip()
    return re.sub(r"\n\s*\n+", "\n", text)


def turn(role: str, text: str) -> str:
    """One finished turn: 'User: hi\\n\\n'."""
    return f"{ROLES[role]}: {clean(text)}{TURN_END}"


def user_turn(text: str) -> str:
    """What a chat feeds for one message: the user's turn and the start of the reply."""
    return turn("user", text) + REPLY_START


def render(messages: Iterable[Tuple[str, str]]) -> str:
    """A whole conversation [(role, text)] as the prompt for the next reply."""
    return "".join(turn(role, text) for role, text in messages) + REPLY_START


def reply_text(text: str) -> str:
    """A reply as shown: without the space the model writes after 'Assistant:'."""
    return text.lstrip()


class ReplyStream:
    """Streamed reply pieces without the leading space(s): what :func:`reply_text` gives for
    the whole reply, piece by piece."""

    def __init__(self):
        self._started = False

    def feed(self, piece: str) -> str:
        if not self._started:
            piece = piece.lstrip()
            self._started = bool(piece)
        return piece


def roles() -> List[str]:
    return list(ROLES)
