"""verify-dp's instrument for the tf backend (``TfBackend.train(instrument=...)``), image- and patient-level DP.

The same gradient canaries as on the opacus backend (``verify_dp.GradientCanaries``: the same rows, inclusion
and directions), reaching the tf pipeline at its own per-example gradients:

* **Rows.** The included canaries are appended to the training set (``plan_training``'s ``extra_rows``) and
  drawn by the backend's ``tf.data`` Poisson sampler like any other row; N, delta and q count them.
* **Injection.** ``DPStep`` hands every example's gradients to :meth:`TfGradientCanaries.per_example` inside its
  ``tf.vectorized_map``, before TF-Privacy's ``GaussianSumQuery`` clips them. A canary example (its marker
  pixel) gets ``CANARY_NORM * C`` times its direction instead (its own loss gradient is zero: its labels are
  unknown); every other example's gradients pass unchanged. The marker is read from the image in graph, so the
  injection follows the sampler's draw, whatever it is.
* **Patient-level DP** (``PatientDPStep``): each included canary is a patient of its own, ``ROWS_PER_CANARY``
  rows sharing one unit id (``plan_training``'s extra-row owners), each row carrying 1/ROWS_PER_CANARY of the
  canary's gradient, drawn by the patient Poisson sampler at the patient rate q. ``PatientDPStep`` hands each example's gradients to the same ``per_example`` *before* it sums
  them by patient (``unsorted_segment_sum``) and the query clips each patient's sum, so a canary patient is
  summed, clipped and noised like any other. A logical step may span several physical batches; the step adds
  the noise once, after its last one, and the projection below is taken from that one noised sum, the tensor the
  optimizer applies. Scoring uses the patient-level q, sigma, C and steps of the run, as the accountant does.
* **Observation.** The optimizer's ``apply_gradients`` is wrapped (before the step is traced): in graph, the
  gradient it is about to apply (TF-Privacy's noised sum, divided by the expected batch size) is multiplied back
  by that constant, projected on every canary's direction in units of C and stored in a variable, which is read
  after each step. Scoring is ``whitebox``'s, as on the opacus backend.

**Faults, for tests only** (``verify_dp.parse_fault``): ``no-clipping`` makes the query's ``preprocess_record``
(the per-example clipping) return the gradients unclipped; ``per-image-clipping`` (patient level) clips each
example's gradients to C in ``per_example``, before the per-patient sum, and the query then leaves the patient's
sum unclipped; ``low-noise:F`` gives ``get_noised_result`` a noise
standard deviation F sigma C while it keeps reporting the accounted sigma to the accountant; ``double-rate``
(patient level only) makes the patient sampler draw at twice the accounted rate. ``rank-noise``, and
``double-rate`` at the image level (whose Poisson draws happen inside ``poisson_batches``), need ranks or a
sampler this harness does not reach on tf and are refused.
"""

from __future__ import annotations

import numpy as np

from privaudit.backends.verify_dp import CANARY_NORM, MARK, ROWS_PER_CANARY, GradientCanaries
from privaudit.errors import ConfigError

TF_FAULTS = ("no-clipping", "low-noise", "double-rate", "per-image-clipping")


class TfGradientCanaries(GradientCanaries):
    """The tf backend's instrument: ``rows`` (inherited), ``attach``, ``per_example``; ``projections`` as on
    the opacus backend, one (m,) array per step in units of C."""

    def __init__(self, m: int, *, seed: int, fault: tuple[str, float] | None = None):
        if fault is not None and fault[0] not in TF_FAULTS:
            raise ConfigError(f"fault {fault[0]} is not available on the tf backend; use one of {', '.join(TF_FAULTS)}")
        super().__init__(m, seed=seed, fault=fault)
        self.grad_sample_mode = "tf.vectorized_map"

    def attach(self, *, model, optimizer, step, dp, sampler=None) -> None:
        """Watch the DP ``step``; ``sampler``: the patient-level run's ``PatientSampler`` (None at the image
        level), which only the ``double-rate`` fault touches."""
        from privaudit.backends._tf_env import import_tf
        from privaudit.backends.tf_backend import PIXEL_MEAN, PIXEL_STD

        from privaudit.backends.tf_backend import PatientDPStep

        tf = import_tf()
        if not dp.enabled or not hasattr(step, "query"):
            raise ConfigError("verify-dp tests a DP training run; it needs DP (leave out --no-dp)")
        self.privacy_unit = "patient" if isinstance(step, PatientDPStep) else "image"
        self.rows_per_canary = ROWS_PER_CANARY if self.privacy_unit == "patient" else 1
        if self.fault is not None and self.fault[0] == "per-image-clipping" and self.privacy_unit != "patient":
            raise ConfigError("fault per-image-clipping needs privacy_unit 'patient' (at the image level it is the "
                              "correct pipeline)")
        if self.fault is not None and self.fault[0] == "double-rate":
            if sampler is None or self.privacy_unit != "patient":
                raise ConfigError("fault double-rate on the tf backend needs privacy_unit 'patient' (the image-level "
                                  "Poisson draws are not reachable); use no-clipping or low-noise")
            sampler.sample_rate = min(1.0, 2 * sampler.sample_rate)   # the accountant keeps the accounted q
        self.clip_norm = float(dp.max_grad_norm)   # the accounted C
        variables = list(step.variables)
        sizes = [int(np.prod(v.shape)) for v in variables]
        d = int(sum(sizes))
        owner, vals = self.directions(d)
        self.n_params = d
        offsets = np.r_[0, np.cumsum(sizes)]
        # per variable: which canary owns each entry, and the direction's value there
        spans = list(zip(variables, offsets[:-1], offsets[1:]))
        self._owner = [tf.constant(owner[a:b].reshape(v.shape), tf.int32) for v, a, b in spans]
        self._vals = [tf.constant(vals[a:b].reshape(v.shape), tf.float32) for v, a, b in spans]
        self._owner_flat = tf.constant(owner, tf.int32)
        self._vals_flat = tf.constant(vals, tf.float32)
        self._mark = (MARK - PIXEL_MEAN) / PIXEL_STD
        self._pixel = (PIXEL_MEAN, PIXEL_STD)
        self._variables = variables
        self._last = tf.Variable(tf.zeros([self.m], tf.float32), trainable=False, name="verify_dp_projections")
        # how many times the optimizer applied a gradient: exactly once per DP step, the one projected
        self._applied = tf.Variable(0, dtype=tf.int64, trainable=False, name="verify_dp_applied")
        self._denominator = float(step.global_state.denominator)   # the expected batch size q N
        self._wrap_optimizer(optimizer)
        self._wrap_step(step)
        self._faults(step)
        step.instrument = self

    # ---- inside the traced DP step -------------------------------------------------------------------------
    def per_example(self, x, grads):
        """One example's gradients (a list, one per variable), canary or not: a canary's are replaced by
        ``CANARY_NORM * C`` times its direction. ``x`` is the example as the model reads it (normalised,
        channels last): the marker is its first value, the canary's number its second pixel's first channel."""
        from privaudit.backends._tf_env import import_tf

        tf = import_tf()
        flat = tf.reshape(x, [-1])
        channels = int(x.shape[-1])
        mean, std = self._pixel
        is_canary = tf.cast(flat[0] < self._mark / 2, tf.float32)
        cid = tf.clip_by_value(tf.cast(tf.round(flat[channels] * std + mean), tf.int32), 0, self.m - 1)
        scale = CANARY_NORM * self.clip_norm / self.rows_per_canary   # a canary patient's rows share its gradient
        out = []
        for g, own, val in zip(grads, self._owner, self._vals):
            vec = tf.where(tf.equal(own, cid), val * scale, tf.zeros_like(val))
            out.append(g * (1.0 - is_canary) + vec * is_canary)
        if self.fault is not None and self.fault[0] == "per-image-clipping":   # each image clipped before the sum
            out = tf.clip_by_global_norm(out, self.clip_norm)[0]
        return out

    def _wrap_optimizer(self, optimizer) -> None:
        from privaudit.backends._tf_env import import_tf

        tf = import_tf()
        apply = optimizer.apply_gradients
        factor = self._denominator / self.clip_norm

        def observed(grads_and_vars, *args, **kwargs):
            pairs = list(grads_and_vars)
            if [id(v) for _, v in pairs] != [id(v) for v in self._variables]:
                raise RuntimeError("verify-dp expects the DP step to update every trainable variable, in order")
            g = tf.concat([tf.reshape(tf.convert_to_tensor(gr), [-1]) for gr, _ in pairs], axis=0) * factor
            proj = tf.math.unsorted_segment_sum(self._vals_flat * g, self._owner_flat, self.m)
            with tf.control_dependencies([self._last.assign(proj), self._applied.assign_add(1)]):
                pairs = [(tf.identity(gr), v) for gr, v in pairs]
            return apply(pairs, *args, **kwargs)

        optimizer.apply_gradients = observed

    def _wrap_step(self, step) -> None:
        apply = step._apply

        def observed_step(grad_sum):
            before = int(self._applied.numpy())
            out = apply(grad_sum)
            if int(self._applied.numpy()) != before + 1:   # the noised sum read is the one update applied
                raise RuntimeError("verify-dp expects one optimizer update per DP step, the noised sum it reads")
            self.projections.append(self._last.numpy().copy())
            return out

        step._apply = observed_step

    def _faults(self, step) -> None:
        if self.fault is None:
            return
        query = step.query
        name, factor = self.fault
        if name in ("no-clipping", "per-image-clipping"):   # the latter clipped each image in per_example
            query.preprocess_record = lambda params, record: record
        elif name == "low-noise":
            noised = query.get_noised_result

            def less_noise(sample_state, global_state):
                inner = global_state.numerator_state
                weaker = global_state._replace(numerator_state=inner._replace(stddev=inner.stddev * factor))
                result, new_state, event = noised(sample_state, weaker)
                # the accountant is told the accounted noise, as a pipeline with this bug would
                return result, new_state, type(event)(noise_multiplier=inner.stddev / inner.l2_norm_clip)

            query.get_noised_result = less_noise
