"""Reports rendered from ``audit.json`` alone (Jinja2, autoescaped). No torch or tensorflow imports."""

from privaudit.reports.render import render_html, write_report

__all__ = ["render_html", "write_report"]
