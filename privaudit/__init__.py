"""privaudit: train and audit medical-imaging models for privacy, fairness and accuracy.

Importing the package imports neither torch nor tensorflow; the backends load them lazily.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
