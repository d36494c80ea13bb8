"""privaudit: train and audit medical-imaging models for privacy, fairness and accuracy.

The Python API (the same functions the CLI calls; nothing is printed unless ``progress=True``)::

    import privaudit
    study = privaudit.train_and_audit("cxr", out="runs/s", n_samples=600, image_size=32, epochs=1, width=8)
    study.to_frame()                                       # every estimate of the audit, one row each
    res = privaudit.audit({"mine": df}, attributes=["sex"], n_boot=200)

``train``, ``audit``, ``train_and_audit``, ``sweep``, ``attack``, ``report`` and ``load_audit``; ``privaudit.audit``
is also the audit package (``privaudit.audit.run_audit``), callable as the API function. ``audit_model`` audits a
model trained elsewhere (an ``nn.Module``, a callable, an ``.onnx`` file or library weights), with a
preprocessing card from ``load_preprocess_card``.
Importing the package imports neither torch nor tensorflow; the backends load them lazily.
"""

import os

# TensorFlow-Privacy (the tf backend) is written for Keras 2, which TensorFlow >= 2.16 serves as tf.keras only
# when TF_USE_LEGACY_KERAS=1 is set before TensorFlow first loads Keras. That can happen outside the tf backend
# (aif360 imports TensorFlow when it is installed), so the variable is set here, the first thing any privaudit
# import runs. setdefault: an explicit setting wins; the tf backend then checks it and says how to fix it.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

from privaudit._version import __version__  # noqa: E402

import types as _types  # noqa: E402

from privaudit import audit  # noqa: E402  (the audit package, made callable below)
from privaudit.audit.results import AuditReport  # noqa: E402
from privaudit.byom import audit_model  # noqa: E402  (imports neither torch nor onnxruntime until it runs)
from privaudit.config import AuditConfig, DPConfig, TrainConfig  # noqa: E402
from privaudit.preprocess import load_preprocess_card  # noqa: E402
from privaudit.study.api import (attack, load_audit, report, sweep, train, train_and_audit,  # noqa: E402
                                 verify_dp)
from privaudit.study.data import DataSpec  # noqa: E402
from privaudit.study.dirs import RunDir, StudyDir  # noqa: E402
from privaudit.study.api import audit as _audit_api  # noqa: E402


class _CallableModule(_types.ModuleType):
    """``privaudit.audit`` stays the audit package (``privaudit.audit.run_audit``, ``import
    privaudit.audit.engine``) and is also callable as the API function, so neither name shadows the other."""

    def __call__(self, *args, **kwargs):
        return _audit_api(*args, **kwargs)

    __call__.__doc__ = _audit_api.__doc__


audit.__class__ = _CallableModule

__all__ = ["__version__", "train", "audit", "train_and_audit", "sweep", "attack", "report", "load_audit", "verify_dp",
           "audit_model", "load_preprocess_card",
           "TrainConfig", "DPConfig", "AuditConfig", "DataSpec", "RunDir", "StudyDir", "AuditReport"]
