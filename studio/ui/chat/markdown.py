"""Markdown for chat messages: Qt's own Markdown for prose, our own boxes for fenced code with a Copy link.

Qt's Markdown renders code blocks as plain preformatted text with no way to
act on them, so fenced blocks are cut out first and drawn as shaded boxes whose
header holds a `copy:N` link; the view copies block N when it is clicked.
An unclosed fence (a code block still streaming in) renders as code to the end.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass

from PySide6.QtGui import QTextCursor, QTextDocument

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([\w+#.-]*)[^\n]*$", re.MULTILINE)


@dataclass
class Segment:
    kind: str  # "text" or "code"
    body: str
    lang: str = ""


def split_code(text: str) -> list[Segment]:
    """Prose and fenced code blocks, in order. A closing fence must use the same character, at least as long."""
    out: list[Segment] = []
    pos = 0
    while True:
        m = FENCE.search(text, pos)
        if m is None:
            break
        if m.start() > pos:
            out.append(Segment("text", text[pos:m.start()]))
        fence, lang = m.group(1), m.group(2)
        body_start = m.end() + 1
        close = re.compile(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$", re.MULTILINE)
        c = close.search(text, body_start)
        if c is None:  # still streaming, or never closed: code to the end
            out.append(Segment("code", text[body_start:].rstrip("\n"), lang))
            return out
        out.append(Segment("code", text[body_start:c.start()].rstrip("\n"), lang))
        pos = c.end() + 1
    if pos < len(text):
        out.append(Segment("text", text[pos:]))
    return out


def code_blocks(text: str) -> list[str]:
    return [s.body for s in split_code(text) if s.kind == "code"]


def render(doc: QTextDocument, text: str, dark: bool) -> None:
    """Replace the document's content with `text` rendered: prose via Qt Markdown, code as boxes."""
    doc.clear()
    cur = QTextCursor(doc)
    shade, head, muted = ("#17181b", "#26282d", "#9a9da3") if dark else ("#f1f1f4", "#e4e4ea", "#6b6e75")
    n = 0
    first = True
    for seg in split_code(text):
        if not first:
            cur.movePosition(QTextCursor.MoveOperation.End)
            cur.insertBlock()
        first = False
        if seg.kind == "text":
            if seg.body.strip():
                # Escape raw HTML the model writes: a chat answer is text, never markup for our widgets.
                cur.insertMarkdown(seg.body.strip("\n"), QTextDocument.MarkdownFeature.MarkdownNoHTML)
            continue
        label = html.escape(seg.lang or "code")
        code = html.escape(seg.body) or "&nbsp;"
        # No borders: Qt draws table borders around every cell, which splits the header; shades alone read well.
        cur.insertHtml(
            f"<table width='100%' border='0' cellspacing='0' cellpadding='6' bgcolor='{shade}' "
            "style='margin-top: 4px; margin-bottom: 4px'>"
            f"<tr><td bgcolor='{head}'><span style='color:{muted}; font-size: small'>{label}</span></td>"
            f"<td bgcolor='{head}' align='right'><a href='copy:{n}' style='text-decoration: none; "
            "font-size: small'>Copy</a></td></tr>"
            f"<tr><td colspan='2' style='white-space: pre-wrap; font-family: monospace'>{code}</td></tr></table>")
        n += 1
