"""Importing TensorFlow, Keras 2 and TensorFlow-Privacy the one way that works beside torch and numpy 2.

Facts behind this module (tensorflow-cpu 2.21, tf-keras 2.21, tensorflow-privacy 0.9.0):

* ``tf.keras`` is Keras 3 unless ``TF_USE_LEGACY_KERAS=1`` is in the environment when TensorFlow first resolves
  it; TF-Privacy is written for Keras 2 (the ``tf-keras`` package). ``privaudit/__init__.py`` sets the variable
  (``setdefault``) before anything can import TensorFlow, aif360 included; :func:`import_tf` checks that it
  took effect and says how to fix it when it did not.
* ``import tensorflow_privacy`` runs a package ``__init__`` that imports the removed ``tensorflow_estimator``.
  TF-Privacy skips those imports when ``sys.skip_tf_privacy_import`` exists (its switch for standalone
  scripts), so the submodules (``tensorflow_privacy.privacy.dp_query...``) are imported with it set.
"""

from __future__ import annotations

import functools
import os
import sys

from privaudit.errors import ConfigError, MissingDependencyError

INSTALL_HINT = ("pip install 'privaudit[tf]' && pip install --no-deps tf-keras==2.21.0 tensorflow-privacy==0.9.0 "
                "(or: make install-tf)")
LEGACY_KERAS_FIX = ("TensorFlow-Privacy needs Keras 2 (tf-keras), but tf.keras is Keras 3 here because "
                    "TF_USE_LEGACY_KERAS={value} when TensorFlow loaded it; start privaudit with TF_USE_LEGACY_KERAS=1 "
                    "in the environment (and import privaudit before TensorFlow)")


def _missing(name: str) -> MissingDependencyError:
    return MissingDependencyError(f"backend 'tf' needs {name!r}, which is not installed; install it with: "
                                  f"{INSTALL_HINT}")


@functools.cache
def import_tf():
    """TensorFlow, with Keras 2 behind ``tf.keras`` and its C++ start-up chatter quietened."""
    from privaudit._quiet import quiet_imports

    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    with quiet_imports():   # absl's oneDNN / CPU-feature notices on every start; TF_CPP_MIN_LOG_LEVEL=2 too
        try:
            import tensorflow as tf
        except ModuleNotFoundError as e:
            raise _missing(e.name or "tensorflow") from None
        try:
            import tf_keras  # noqa: F401
        except ModuleNotFoundError:
            raise _missing("tf_keras") from None
    if not tf.keras.__name__.startswith("tf_keras"):
        raise ConfigError(LEGACY_KERAS_FIX.format(value=os.environ.get("TF_USE_LEGACY_KERAS", "<unset>")))
    return tf


def import_keras():
    """Keras 2 (the ``tf-keras`` package), the Keras that TF-Privacy is written for."""
    import_tf()
    import tf_keras

    return tf_keras


@functools.cache
def import_dp_query():
    """TF-Privacy's ``gaussian_query`` and ``normalized_query`` modules (without the package's top level)."""
    import_tf()
    added = not hasattr(sys, "skip_tf_privacy_import")
    sys.skip_tf_privacy_import = True
    try:
        from tensorflow_privacy.privacy.dp_query import gaussian_query, normalized_query
    except ModuleNotFoundError as e:
        raise _missing(e.name or "tensorflow_privacy") from None
    finally:
        if added:
            del sys.skip_tf_privacy_import
    return gaussian_query, normalized_query


def versions() -> dict:
    tf = import_tf()
    import tf_keras
    from importlib.metadata import version

    return {"tensorflow": tf.__version__, "tf_keras": tf_keras.__version__,
            "tensorflow_privacy": version("tensorflow-privacy"), "dp_accounting": version("dp-accounting")}
