"""Printing text that comes from data with rich, safely.

Group, model, label and file names, and the error messages that quote them, come from the user's files. rich
reads ``[...]`` in a printed string as markup, so a group called ``[/x]`` raises ``MarkupError`` (and
``[bold]`` would restyle the line). Everything interpolated from data therefore goes through :func:`safe`
(for an f-string that also holds markup) or :func:`plain` (a table cell or a whole line: never parsed). Both
also put the text on one line, so that a name holding a newline or a terminal control sequence cannot break
the "one line on stderr" promise of an error or forge a line of output.
"""

from __future__ import annotations

import re

from rich.markup import escape
from rich.text import Text

# C0 and C1 control characters, DEL, and the Unicode line and paragraph separators
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def one_line(text) -> str:
    """``str(text)`` with newlines, tabs and other control characters written as escapes (``\\n``, ``\\x1b``)."""
    return _CONTROL.sub(lambda m: _NAMED.get(m.group(), f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100
                                              else f"\\u{ord(m.group()):04x}"), str(text))


def safe(text) -> str:
    """``text`` on one line with rich markup escaped: for interpolating data into a string that is printed with
    markup on, e.g. ``console.print(f"written to [bold]{safe(path)}[/]")``."""
    return escape(one_line(text))


def plain(text, style: str = "") -> Text:
    """``text`` on one line as a rich ``Text``, which is never parsed as markup: for table cells and titles."""
    return Text(one_line(text), style=style)


def error_line(message) -> Text:
    """The CLI's error line: ``error: <message>`` with the message on one line and never parsed as markup."""
    return Text.assemble(("error:", "bold red"), " ", one_line(message))


def print_error(console, message) -> None:
    """Print :func:`error_line` on ``console`` (the CLI's stderr console) without wrapping it."""
    console.print(error_line(message), highlight=False, soft_wrap=True)
