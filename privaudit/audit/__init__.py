"""The audit engine: utility, fairness and privacy from prediction tables (numpy/pandas/scipy only).

Importing this package imports neither torch nor tensorflow. The package is also the public API's ``audit``
function: ``privaudit.audit(source, ...)`` calls :func:`privaudit.study.api.audit`.
"""

import sys as _sys
import types as _types

from privaudit.audit.engine import run_audit
from privaudit.audit.results import SCHEMA_VERSION, AuditReport

__all__ = ["run_audit", "AuditReport", "SCHEMA_VERSION"]


class _CallableModule(_types.ModuleType):
    """``privaudit.audit`` stays this package (``privaudit.audit.run_audit``, ``import privaudit.audit.engine``)
    and is callable as the API function, so neither name shadows the other."""

    def __call__(self, *args, **kwargs):
        from privaudit.study.api import audit

        return audit(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallableModule
