"""How untrusted model output is shown: always as literal text, with invisible tricks made visible.

Responses are displayed in non-interactive text boxes (never as HTML), so ``<script>`` or
``<img onerror=...>`` is shown, not run. Two kinds of characters can still mislead a reader of
plain text: bidirectional controls (which reorder what is displayed, "Trojan Source",
CVE-2021-42574), zero-width characters (which hide differences) and control characters. :func:`visible_text`
replaces each with a visible ``⟦U+XXXX⟧`` marker for display; the stored text is unchanged.

:func:`safe_markdown` prepares the optional rendered view: HTML is escaped and Markdown images
become plain links, so rendering never loads a remote resource or runs markup.
"""

from __future__ import annotations

import html
import re

# Bidi embedding/override/isolate controls and marks, zero-width and other invisible format chars.
# Also C0/C1 control characters other than tab and newline (model output can contain them).
_INVISIBLE = re.compile(
    "[\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\u061c\ufeff\u00ad"
    "\x00-\x08\x0b-\x0c\x0e-\x1f\x7f-\x9f]"
)
_MD_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)]*)\)")


def visible_text(text: str) -> str:
    """``text`` with every bidi control and zero-width character shown as ``⟦U+XXXX⟧``."""
    return _INVISIBLE.sub(lambda m: f"⟦U+{ord(m.group(0)):04X}⟧", text)


def safe_markdown(text: str) -> str:
    """Markdown with HTML escaped and images turned into links (nothing is fetched or executed)."""
    escaped = html.escape(visible_text(text), quote=False)
    # The address goes in a code span: shown, never fetched, not even turned into a link.
    return _MD_IMAGE.sub(
        lambda m: f"[image: {m.group(1) or 'no description'}] (`{m.group(2).replace('`', '')}`)", escaped
    )
