"""How a report, the CLI and a notebook write one number: an estimate with its interval, a p-value, a share.

These are the filters of the report templates (``fmt``, ``ci``, ``pval``, ``pct``, ``sci``), usable outside
them, so that the command line prints the same text as the report does.
"""

from __future__ import annotations

import math

__all__ = ["format_ci", "format_number", "format_p_value", "format_percent", "format_sci"]


def format_number(x, digits: int = 3) -> str:
    """A float with ``digits`` decimals; ``'n/a'`` for a missing value (None or NaN); anything else as ``str``."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def format_ci(block: dict | None, digits: int = 3) -> str:
    """An audit estimate block (``{"estimate", "ci_low", "ci_high", ...}``) as ``'0.812 (0.774 to 0.850)'``;
    the estimate alone when the block has no interval, ``'n/a'`` when the block or its estimate is missing."""
    if not block or block.get("estimate") is None:
        return "n/a"
    text = format_number(block["estimate"], digits)
    if block.get("ci_low") is not None and block.get("ci_high") is not None:
        text += f" ({format_number(block['ci_low'], digits)} to {format_number(block['ci_high'], digits)})"
    return text


def format_p_value(p) -> str:
    """A p-value with three decimals, ``'<0.001'`` below that, ``'n/a'`` when missing."""
    if p is None:
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def format_percent(x, digits: int = 1) -> str:
    """A share (0.123) as a percentage (``'12.3%'``); ``'n/a'`` when missing."""
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"


def format_sci(x) -> str:
    """Scientific notation with one decimal (a delta: ``'1.0e-05'``); ``'n/a'`` when missing."""
    return "n/a" if x is None else f"{x:.1e}"
