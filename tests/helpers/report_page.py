"""Helpers for the report tests: read a report page's elements, and alter an artifact the way
other versions of the compiler would write it (a fallback segment, an int8 segment with
accuracy figures)."""

import json
import os
import re
import shutil
from html.parser import HTMLParser

from rwkv2rknn.artifact.plan import MANIFEST


class Elements(HTMLParser):
    """Every start tag as (tag, attrs, text until the next tag) in page order."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.items = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.items.append([tag, dict(attrs), ""])

    def handle_startendtag(self, tag, attrs):
        self.items.append([tag, dict(attrs), ""])

    def handle_data(self, data):
        if self.items:
            self.items[-1][2] += data

    def find(self, tag=None, **want):
        return [
            a
            for t, a, _ in self.items
            if (tag is None or t == tag) and all(a.get(k.replace("_", "-")) == v for k, v in want.items())
        ]

    def with_class(self, tag, cls):
        return [a for t, a, _ in self.items if t == tag and cls in (a.get("class") or "").split()]

    def titles(self, cls, key):
        """{element's ``key`` attribute: its <title> text} for the elements of class ``cls``."""
        out = {}
        for (t, a, _), nxt in zip(self.items, self.items[1:]):
            if cls in (a.get("class") or "").split() and nxt[0] == "title":
                out[a[key]] = nxt[2]
        return out

    def text_of(self, tag, **want):
        return [
            x
            for t, a, x in self.items
            if t == tag and all(a.get(k.replace("_", "-")) == v for k, v in want.items())
        ]


EXTERNAL = [
    r"https?:",
    r"@import",
    r"\bsrc\s*=",
    r"url\((?!\s*['\"]?data:)",
    r"<script",
    r"<link",
    r"<iframe",
    r"<object",
    r"<embed",
    r"\bhref\s*=\s*['\"]?(?!#)",
    r"//[a-z0-9.-]+\.[a-z]{2,}/",
    r"file:",
]


def external_references(html: str):
    return [m.group(0) for pat in EXTERNAL for m in re.finditer(pat, html, re.I)]


def copy_artifact(src: str, dst: str) -> str:
    shutil.copytree(src, dst)
    return dst


def alter_segments(artifact: str, fallback: int, int8: int, accuracy: dict) -> None:
    """Segment ``fallback`` becomes an NPU candidate that fell back to the CPU; segment ``int8``
    gets a precision and accuracy figures (fields plan.Segment does not have)."""
    path = os.path.join(artifact, MANIFEST)
    with open(path) as f:
        d = json.load(f)
    segs = d["segments"]
    segs[fallback].update(backend="cpu", fallback="rknn build failed: test", rknn=None)
    segs[int8].update(precision="int8", accuracy=accuracy)
    with open(path, "w") as f:
        json.dump(d, f)
