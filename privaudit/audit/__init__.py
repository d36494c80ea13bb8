"""The audit engine: utility, fairness and privacy from prediction tables (numpy/pandas/scipy only).

Importing this package imports neither torch nor tensorflow. ``privaudit/__init__.py`` makes the package
callable as the public API's ``audit`` function: ``privaudit.audit(source, ...)`` calls
:func:`privaudit.study.api.audit`.
"""

from privaudit.audit.engine import run_audit
from privaudit.audit.results import SCHEMA_VERSION, AuditReport

__all__ = ["run_audit", "AuditReport", "SCHEMA_VERSION"]
