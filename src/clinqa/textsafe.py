"""Outside text (data, records, paths, ids, error messages) made safe to print with Rich.

Two hazards: Rich reads ``[...]`` as markup, so an answer of ``"[/]"`` raises MarkupError and
``[bold]`` in an id silently vanishes; and control characters (an ESC sequence in a patient's name)
reach the terminal raw, where they can recolour, move the cursor or retitle the window. ``plain``
removes the control characters (keeping newline and tab); ``safe`` also escapes markup, for text
that is interpolated into a markup string. Every print of outside text goes through one of them.
"""

from __future__ import annotations

import re

from rich.markup import escape

# ANSI CSI / OSC / other ESC sequences first (so their parameters go too), then single C0/C1 controls
# except tab and newline, DEL, and the bidirectional overrides that reorder what a reader sees.
_CONTROL = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"  # CSI: ESC [ params final
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"  # OSC: ESC ] ... BEL or ST
    r"|\x1b[@-Z\\-_]"  # other two-byte ESC sequences
    r"|[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]"
)


def plain(text: object) -> str:
    """``text`` as a string without terminal control characters (newline and tab are kept)."""
    return _CONTROL.sub("", str(text))


def safe(text: object) -> str:
    """``text`` ready to interpolate into a Rich markup string: controls stripped, markup escaped."""
    return escape(plain(text))
