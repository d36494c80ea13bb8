"""Reports rendered from ``audit.json`` alone (Jinja2, autoescaped). No torch or tensorflow imports."""

from privaudit.reports.format import format_ci, format_number, format_p_value, format_percent, format_sci
from privaudit.reports.render import render_html, write_report

__all__ = ["format_ci", "format_number", "format_p_value", "format_percent", "format_sci", "render_html",
           "write_report"]
