"""privaudit: train and audit medical-imaging models for privacy, fairness and accuracy.

Importing the package imports neither torch nor tensorflow; the backends load them lazily.
"""

import os

# TensorFlow-Privacy (the tf backend) is written for Keras 2, which TensorFlow >= 2.16 serves as tf.keras only
# when TF_USE_LEGACY_KERAS=1 is set before TensorFlow first loads Keras. That can happen outside the tf backend
# (aif360 imports TensorFlow when it is installed), so the variable is set here, the first thing any privaudit
# import runs. setdefault: an explicit setting wins; the tf backend then checks it and says how to fix it.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

__version__ = "0.1.0"

__all__ = ["__version__"]
