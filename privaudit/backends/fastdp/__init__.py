"""Fast per-sample clipping for DP-SGD: Opacus' clipping, noise and accounting at close to non-private cost.

``FastGradSampleModule`` computes every sample's gradient norm in the ordinary backward pass (per layer,
the cheaper of the ghost norm and materialised per-sample gradients) and the clipped gradient sum by
book-keeping, without a second backward pass. ``FastPrivacyEngine`` is Opacus' ``PrivacyEngine`` with
``grad_sample_mode="fast"``; its ``FastDPOptimizer`` is Opacus' ``DPOptimizer`` with only the clipping step
replaced, so Poisson sampling, noise, ``BatchMemoryManager`` and the accountant stay Opacus'.

Supported trainable layers: ``Linear``, ``Conv1d/2d/3d`` (any stride, padding and padding mode, dilation,
groups), ``GroupNorm`` and ``Embedding``. ``FastPrivacyEngine`` falls back to Opacus' hooks mode, with a
:class:`FastDPFallbackWarning`, for a model with any other trainable layer.

Patient-level DP: with :class:`Units` (which patient each image of a batch belongs to), the clipped unit is the
patient, whose gradient is the sum of its images'; the engine computes that sum's norm exactly, cross-image
terms included (``_layers``), and in Opacus' hooks mode :func:`sum_grad_samples` sums the per-sample gradient
rows by patient before the optimizer clips them.
"""

from privaudit.backends.fastdp._layers import GHOST_RATIO, SUPPORTED_TYPES, Units, use_ghost
from privaudit.backends.fastdp._module import (
    FastDPError,
    FastGradSampleModule,
    UnsupportedModelError,
    unsupported_layers,
)
from privaudit.backends.fastdp._opacus import (
    GRAD_SAMPLE_MODES,
    FastDPFallbackWarning,
    FastDistributedDPOptimizer,
    FastDPOptimizer,
    FastPrivacyEngine,
    PerSampleLoss,
    forward_backward,
    sum_grad_samples,
)

__all__ = [
    "GHOST_RATIO", "GRAD_SAMPLE_MODES", "SUPPORTED_TYPES", "FastDPError", "FastDPFallbackWarning",
    "FastDPOptimizer", "FastDistributedDPOptimizer", "FastGradSampleModule", "FastPrivacyEngine",
    "PerSampleLoss", "Units", "UnsupportedModelError", "forward_backward", "sum_grad_samples", "unsupported_layers",
    "use_ghost",
]
