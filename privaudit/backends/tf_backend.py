"""TensorFlow + TensorFlow-Privacy backend: DP-SGD-style NAdam with Poisson sampling and per-example clipping.

The run directory has the same contract as the opacus backend's (``model/``, ``train.json``,
``predictions.csv``, ``canaries.csv``), so the audit cannot tell the backends apart except by the ``backend``
field. What is TensorFlow-specific:

* **Sampling**: each step draws its batch in the ``tf.data`` pipeline by Poisson sampling (every training
  sample joins independently with probability q = batch / N, from a stateless RNG keyed by (seed, step)), so
  batch sizes vary and a batch can be empty, as the accountants assume.
* **The DP step** is built from TF-Privacy's DP query classes: per-example gradients (one microbatch per
  example) are clipped by ``GaussianSumQuery`` (clip to C, sum, add N(0, (sigma C)^2) noise), and
  ``NormalizedQuery`` divides the noised sum by the *expected* batch size q N, a constant, never by the
  realised size (which would leak it). An empty batch still gets its noise and its step. TF-Privacy's Keras
  optimisers divide by the number of microbatches instead, which is data-dependent under Poisson sampling,
  hence the queries.
* **Patient-level DP** (``privacy_unit="patient"``): the pipeline draws *patients*, each training patient
  joining a logical step independently with probability q = batch / training patients, with every training image
  of a drawn patient (``backends._units.PatientSampler``, the opacus backend's sampler: the same law, and at the
  same seed the same draws), and yields physical batches of whole patients. Per-example loss gradients are
  summed by patient (``tf.math.unsorted_segment_sum``) before ``GaussianSumQuery`` clips each patient's summed
  gradient to C as one record; noise sigma C is added once per logical step and ``NormalizedQuery`` divides by
  the expected number of patients, q times the training patients.
* **Accounting** uses dp_accounting (TF-Privacy's accounting library) on the Poisson-subsampled Gaussian
  event that the query reports: ``--accountant prv`` (the default, Opacus-specific) maps to dp_accounting's
  PLD accountant, the tight one, and ``rdp`` to its RDP accountant; train.json records which ran. ``gdp``
  has no dp_accounting counterpart and is refused.
* **The model** is saved as a ``.keras`` file (Keras' zip format: JSON config + weights, no pickle) and is
  loaded back with ``safe_mode=True`` after refusing Lambda / TF-op layers and modules outside Keras.
"""

from __future__ import annotations

import json
import math
import platform
import time
import zipfile
from pathlib import Path

import numpy as np

from privaudit._version import __version__
from privaudit._fs import private_mkdir, write_json
from privaudit.backends._device import pick_device
from privaudit.backends._tf_env import import_dp_query, import_keras, import_tf
from privaudit.backends._tf_env import versions as tf_versions
from privaudit.backends._plan import (non_private_block, plan_training, progress_bars, recorded_path, sha256,
                                     unit_record,
                                     write_canaries)
from privaudit.config import TrainConfig
from privaudit.data.inputs import load_inputs
from privaudit.data.manifest import Manifest
from privaudit.errors import CheckpointError, ConfigError
from privaudit.predictions import build_predictions, write_predictions
from privaudit.tasks import create_task

# The same preprocessing as the opacus backend: images in [0, 1], the network sees (x - MEAN) / STD.
PIXEL_MEAN, PIXEL_STD = 0.5, 0.25
# Keras' NAdam, with torch.optim.NAdam's eps (1e-8; betas are the same). Its momentum schedule differs from
# torch's: mu_t = beta1 (1 - 0.5 * 0.96 ** t) in Keras, 0.96 ** (0.004 t) in torch (momentum_decay=4e-3).
NADAM_EPS = 1e-8
# --accountant -> the dp_accounting accountant that runs it, recorded in train.json under "accountant".
# Both are registered in privaudit.audit.accounting, whose PLD resolution (1e-3) the cross-check uses too.
ACCOUNTANTS = {"prv": "dp_accounting_pld", "rdp": "dp_accounting_rdp"}
PATIENT_MICROBATCHES = ("per patient (per-example gradients summed by patient with unsorted_segment_sum, one "
                        "record per patient)")
UNSAFE_CLASSES = {
    "Lambda": "a Lambda layer, which runs Python code stored in the file",
    "__lambda__": "a serialised Python lambda, which is code stored in the file",
    "TFOpLambda": "a TF-op layer, which calls a TensorFlow function named by the file (file I/O included)",
    "SlicingOpLambda": "a TF-op layer, which calls a TensorFlow function named by the file",
}


def versions() -> dict:
    return {"privaudit": __version__, "python": platform.python_version(), "numpy": np.__version__, **tf_versions()}


def to_channels_last(x: np.ndarray) -> np.ndarray:
    """(N, C, *spatial) -> (N, *spatial, C), the layout Keras' convolutions use."""
    return np.ascontiguousarray(np.moveaxis(x, 1, -1))


def masked_bce(logits, targets):
    """Per-sample BCE averaged over the sample's known labels (NaN = unknown, masked out), as the opacus backend."""
    tf = import_tf()
    known = tf.logical_not(tf.math.is_nan(targets))
    loss = tf.nn.sigmoid_cross_entropy_with_logits(labels=tf.where(known, targets, 0.0), logits=logits)
    loss = tf.where(known, loss, 0.0)
    n_known = tf.reduce_sum(tf.cast(known, loss.dtype), axis=1)
    return tf.reduce_sum(loss, axis=1) / tf.maximum(n_known, 1.0)


def peak_memory(device: str) -> dict:
    """Peak memory, in the opacus backend's train.json shape: the process's CPU resident set (getrusage, since the
    process started) and, on a GPU, TensorFlow's peak allocation on it."""
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    out = {"cpu_rss_peak_mb": round(rss / 2**20 if sys.platform == "darwin" else rss / 2**10, 1),
           "cpu_scope": "process peak (getrusage ru_maxrss)", "cuda_max_allocated_mb": None}
    if device.startswith("/GPU"):
        info = import_tf().config.experimental.get_memory_info(device.strip("/"))
        out["cuda_max_allocated_mb"] = round(info["peak"] / 2**20, 1)
    return out


def make_optimizer(lr: float):
    """NAdam with a constant learning rate, the same for DP and non-private training.

    ``jit_compile=False``: XLA-compiling the update costs seconds per run on CPU and gains nothing at this size.
    """
    return import_keras().optimizers.Nadam(learning_rate=lr, epsilon=NADAM_EPS, jit_compile=False)


# ---- accounting ----------------------------------------------------------------------------------------------
def _accountant(accountant: str):
    """The registered dp_accounting accountant that runs ``--accountant accountant`` here (see ACCOUNTANTS)."""
    from privaudit.audit.accounting import create_accountant

    if accountant not in ACCOUNTANTS:
        raise ConfigError(f"accountant {accountant!r} is not available in the tf backend (dp_accounting has no GDP "
                          "accountant); use --accountant prv (dp_accounting's PLD, tight) or rdp")
    return create_accountant(ACCOUNTANTS[accountant])


def compute_epsilon(accountant: str, *, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon of ``steps`` Poisson-subsampled Gaussian steps with the dp_accounting accountant for ``accountant``."""
    return _accountant(accountant).epsilon(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps,
                                           delta=delta)


def noise_for_epsilon(accountant: str, *, epsilon: float, sample_rate: float, steps: int, delta: float) -> float:
    """The noise multiplier whose epsilon is at most ``epsilon`` and within 1e-3 (in sigma) of it, with the
    dp_accounting accountant for ``accountant`` (its calibration, see ``privaudit.audit.accounting``)."""
    return _accountant(accountant).noise_multiplier(epsilon=epsilon, sample_rate=sample_rate, steps=steps,
                                                    delta=delta)


# ---- data pipelines ------------------------------------------------------------------------------------------
def poisson_batches(x: np.ndarray, y: np.ndarray, *, sample_rate: float, first_step: int, steps: int, seed: int):
    """``tf.data`` pipeline of ``steps`` Poisson-sampled batches: sample i joins step s iff U(seed, s)_i < q.

    Batch sizes vary (Binomial(N, q)) and may be 0. The draw of step s depends only on (seed, s), so a run is
    reproducible and its epochs differ.
    """
    tf = import_tf()
    n = len(x)
    xs, ys = tf.constant(x), tf.constant(y)
    q = tf.constant(sample_rate, tf.float64)

    def draw(step):
        u = tf.random.stateless_uniform([n], seed=tf.stack([tf.constant(seed, tf.int64), step]), dtype=tf.float64)
        idx = tf.where(u < q)[:, 0]
        return tf.gather(xs, idx), tf.gather(ys, idx)

    return tf.data.Dataset.range(first_step, first_step + steps).map(draw).prefetch(2)


def patient_batches(x: np.ndarray, y: np.ndarray, sampler, *, steps: int):
    """``tf.data`` pipeline of ``steps`` logical steps of patient-level Poisson sampling, as physical batches
    ``(x, y, units, n_units, last)`` of whole patients.

    ``sampler`` is a :class:`privaudit.backends._units.PatientSampler` over the rows of ``x``: each step it
    includes every patient independently with probability q, with all its rows, and packs them into physical
    batches (``units``: each row's patient within the batch, 0 .. n_units - 1; ``last``: the step's last batch,
    after which the update is applied). An empty draw is one empty batch, so the step still adds its noise.
    The draws happen as the pipeline is read, from the sampler's one seeded generator.
    """
    tf = import_tf()
    xs, ys = tf.constant(x), tf.constant(y)

    def physical():
        for _ in range(steps):
            for b in sampler.pack(sampler.draw()):
                yield b.items, b.units, b.n_units, b.last

    def gather(items, units, n_units, last):
        return tf.gather(xs, items), tf.gather(ys, items), tf.cast(units, tf.int32), tf.cast(n_units, tf.int32), last

    signature = (tf.TensorSpec([None], tf.int64), tf.TensorSpec([None], tf.int64), tf.TensorSpec([], tf.int64),
                 tf.TensorSpec([], tf.bool))
    return tf.data.Dataset.from_generator(physical, output_signature=signature).map(gather).prefetch(2)


def shuffled_batches(x: np.ndarray, y: np.ndarray, *, batch_size: int, seed: int):
    """Non-private training: a fresh shuffle each epoch, fixed-size batches (the last one smaller)."""
    tf = import_tf()
    ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(2)


# ---- the training steps --------------------------------------------------------------------------------------
def quiet_vectorized_map(fn, elems):
    """``tf.vectorized_map``, quietly: pfor logs (python logging) each op it vectorises with a while_loop
    fallback, e.g. the per-example Conv2DBackpropFilter or the clipping's L2Loss; that is expected here, so keep
    it off the user's console while tracing."""
    tf = import_tf()
    logger = tf.get_logger()
    level = logger.level
    logger.setLevel("ERROR")
    try:
        return tf.vectorized_map(fn, elems)
    finally:
        logger.setLevel(level)


class DPStep:
    """One DP update of ``model`` with ``optimizer``: TF-Privacy's Gaussian sum query over per-example gradients,
    normalised by the expected batch size.

    ``clipped_sum(x, y)`` returns the sum of the clipped per-example gradients of a (physical) batch and its loss
    sum; ``__call__`` accumulates them over physical batches, adds the noise once and applies the update.
    ``instrument`` is verify-dp's white-box hook (``backends.verify_dp_tf``), set before the first step: its
    ``per_example(x, grads)`` sees each example's gradients before they are clipped. None outside verify-dp.
    """

    instrument = None

    def __init__(self, model, optimizer, *, l2_norm_clip: float, noise_multiplier: float, expected_batch_size: float,
                 physical_batch_size: int):
        tf = import_tf()
        gaussian_query, normalized_query = import_dp_query()
        self.model, self.optimizer = model, optimizer
        self.variables = model.trainable_variables
        optimizer.build(self.variables)  # slot variables now, not inside the traced step (which would retrace)
        self.physical_batch_size = physical_batch_size
        self.query = normalized_query.NormalizedQuery(
            gaussian_query.GaussianSumQuery(l2_norm_clip=l2_norm_clip, stddev=noise_multiplier * l2_norm_clip),
            denominator=expected_batch_size)
        self.global_state = self.query.initial_global_state()
        self.events = []  # the DpEvent each noised step reports
        # the model's float type (float32; float64 in the tests that compare with torch)
        self.dtype = model.inputs[0].dtype
        self.batch_spec = [tf.TensorSpec([None, *model.inputs[0].shape[1:]], self.dtype),
                           tf.TensorSpec([None, model.outputs[0].shape[-1]], self.dtype)]
        # autograph=False: these functions have no tensor-dependent Python control flow to convert
        self.clipped_sum = tf.function(self._clipped_sum, autograph=False, input_signature=self.batch_spec)
        self._apply = tf.function(self._noise_and_apply, autograph=False)

    def _clip_params(self):
        """The query's sample parameters (the clipping norm C, float32 in TF-Privacy) in the model's type."""
        return import_tf().cast(self.query.derive_sample_params(self.global_state), self.dtype)

    def _clipped_sum(self, x, y):
        tf = import_tf()
        params = self._clip_params()

        def one(args):
            xi, yi = args
            with tf.GradientTape() as tape:
                loss = masked_bce(self.model(xi[None], training=True), yi[None])[0]
            grads = tape.gradient(loss, self.variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            if self.instrument is not None:   # verify-dp: its gradient canaries join here, before clipping
                grads = self.instrument.per_example(xi, grads)
            return self.query.preprocess_record(params, grads), loss  # clip this example's gradient to C

        # pfor logs (python logging) each op it vectorises with a while_loop fallback, e.g. the per-example
        # Conv2DBackpropFilter; that is expected here, so keep it off the user's console while tracing.
        logger = tf.get_logger()
        level = logger.level
        logger.setLevel("ERROR")
        try:
            clipped, losses = tf.vectorized_map(one, (x, y))
        finally:
            logger.setLevel(level)
        return [tf.reduce_sum(g, axis=0) for g in clipped], tf.reduce_sum(losses)

    def _noise_and_apply(self, grad_sum):
        state = self.query.accumulate_preprocessed_record(self.query.initial_sample_state(grad_sum), grad_sum)
        noised, _, event = self.query.get_noised_result(state, self.global_state)
        self.optimizer.apply_gradients(zip(noised, self.variables))
        return event.noise_multiplier

    def noised_mean(self, x, y):
        """The noised, normalised gradient of one logical batch (without applying it); for tests."""
        grad_sum, _ = self._accumulate(x, y)
        state = self.query.accumulate_preprocessed_record(self.query.initial_sample_state(grad_sum), grad_sum)
        return self.query.get_noised_result(state, self.global_state)[0]

    def _accumulate(self, x, y):
        tf = import_tf()
        total = [tf.zeros_like(v) for v in self.variables]
        loss = 0.0
        for i in range(0, len(x), self.physical_batch_size):
            part, part_loss = self.clipped_sum(x[i:i + self.physical_batch_size], y[i:i + self.physical_batch_size])
            total = [a + b for a, b in zip(total, part)]
            loss += float(part_loss)
        return total, loss

    def __call__(self, x, y) -> float | None:
        """Apply one step on batch (x, y) (possibly empty); returns the batch's mean loss, None when empty."""
        grad_sum, loss = self._accumulate(x, y)
        self.events.append(float(self._apply(grad_sum)))
        return loss / len(x) if len(x) else None


class PatientDPStep(DPStep):
    """One patient-level DP update from physical batches of whole patients (see :func:`patient_batches`).

    ``unit_clipped_sum(x, y, units, n_units)`` sums each patient's per-example loss gradients
    (``tf.math.unsorted_segment_sum`` by ``units``), clips each patient's summed gradient to C as one record with
    the query's ``preprocess_record`` (``GaussianSumQuery``) and returns the sum over patients, with the loss
    sum. ``__call__`` accumulates physical batches; after a step's last one it adds the noise sigma C once,
    divides by ``expected_batch_size`` (the expected number of patients) and applies the update.
    """

    def __init__(self, model, optimizer, *, l2_norm_clip: float, noise_multiplier: float, expected_batch_size: float):
        tf = import_tf()
        super().__init__(model, optimizer, l2_norm_clip=l2_norm_clip, noise_multiplier=noise_multiplier,
                         expected_batch_size=expected_batch_size, physical_batch_size=0)
        self.unit_clipped_sum = tf.function(self._unit_clipped_sum, autograph=False, input_signature=[
            *self.batch_spec, tf.TensorSpec([None], tf.int32), tf.TensorSpec([], tf.int32)])
        self._reset()

    def _reset(self):
        self._sum, self._loss, self._images = None, 0.0, 0

    def _unit_clipped_sum(self, x, y, units, n_units):
        tf = import_tf()
        params = self._clip_params()

        def one(args):   # one example's loss gradient, not clipped
            xi, yi = args
            with tf.GradientTape() as tape:
                loss = masked_bce(self.model(xi[None], training=True), yi[None])[0]
            grads = tape.gradient(loss, self.variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            instrument = getattr(self, "instrument", None)   # verify-dp's hook, if any: before the patient sum
            return (grads if instrument is None else instrument.per_example(xi, grads)), loss

        grads, losses = quiet_vectorized_map(one, (x, y))
        # one record per patient, the sum of its images' loss gradients, clipped to C as one by the query
        records = [tf.math.unsorted_segment_sum(g, units, n_units) for g in grads]
        clipped = quiet_vectorized_map(lambda record: self.query.preprocess_record(params, record), records)
        return [tf.reduce_sum(g, axis=0) for g in clipped], tf.reduce_sum(losses)

    def _add(self, x, y, units, n_units):
        if len(x):   # an empty draw adds nothing but still steps (with noise alone)
            part, loss = self.unit_clipped_sum(x, y, units, n_units)
            self._sum = part if self._sum is None else [a + b for a, b in zip(self._sum, part)]
            self._loss += float(loss)
            self._images += len(x)

    def noised_mean(self, x, y, units=None, n_units=None):
        """The noised, normalised gradient of one logical batch of patients (not applied); for tests."""
        tf = import_tf()
        self._reset()
        self._add(x, y, units, n_units)
        grad_sum = self._sum or [tf.zeros_like(v) for v in self.variables]
        self._reset()
        state = self.query.accumulate_preprocessed_record(self.query.initial_sample_state(grad_sum), grad_sum)
        return self.query.get_noised_result(state, self.global_state)[0]

    def __call__(self, x, y, units=None, n_units=None, last=True) -> float | None:
        """Add one physical batch; after the step's ``last`` one, noise and apply the update and return the step's
        mean loss per image (None for an empty step, and before the last batch)."""
        tf = import_tf()
        self._add(x, y, units, n_units)
        if not last:
            return None
        grad_sum = self._sum or [tf.zeros_like(v) for v in self.variables]
        loss = self._loss / self._images if self._images else None
        self._reset()
        self.events.append(float(self._apply(grad_sum)))
        return loss


class PlainStep:
    """One non-private update: the gradient of the batch's mean loss, the same optimiser."""

    def __init__(self, model, optimizer):
        tf = import_tf()
        self.model, self.optimizer = model, optimizer
        optimizer.build(model.trainable_variables)
        spec = model.inputs[0].shape[1:]
        self._step = tf.function(self._fn, autograph=False, input_signature=[
            tf.TensorSpec([None, *spec], tf.float32), tf.TensorSpec([None, model.outputs[0].shape[-1]], tf.float32)])

    def _fn(self, x, y):
        tf = import_tf()
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(masked_bce(self.model(x, training=True), y))
        variables = self.model.trainable_variables
        self.optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    def __call__(self, x, y) -> float:
        return float(self._step(x, y))


def predict_arrays(model, x: np.ndarray, y: np.ndarray, *, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and per-sample masked BCE for channels-last, normalised inputs."""
    tf = import_tf()
    probs, losses = [], []
    for i in range(0, len(x), batch):
        logits = model(x[i:i + batch], training=False)
        probs.append(tf.sigmoid(logits).numpy())
        losses.append(masked_bce(logits, tf.constant(y[i:i + batch])).numpy())
    if not probs:
        n_out = model.outputs[0].shape[-1]
        return np.zeros((0, n_out), np.float32), np.zeros(0, np.float32)
    return np.concatenate(probs), np.concatenate(losses)


def _prepare(x: np.ndarray) -> np.ndarray:
    return ((to_channels_last(x) - PIXEL_MEAN) / PIXEL_STD).astype(np.float32)


# ---- safe loading of .keras files ----------------------------------------------------------------------------
def _keras_config(path: Path) -> dict:
    if path.suffix != ".keras":
        raise CheckpointError(f"{path}: the tf backend reads Keras' .keras files only (HDF5 and SavedModel files can "
                              "hold code); save the model with model.save('model.keras')")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a .keras file (a .keras file is a zip archive); save the model with "
                              "model.save('model.keras')")
    try:
        with zipfile.ZipFile(path) as z:
            return json.loads(z.read("config.json"))
    except (KeyError, ValueError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: no readable config.json inside ({type(e).__name__}); save the model with "
                              "model.save('model.keras')") from None


def check_keras_config(config, path: Path) -> None:
    """Refuse configs that would run code from the file or import modules outside Keras, before loading."""

    def walk(node, layer: str | None):
        if isinstance(node, dict):
            cls = node.get("class_name")
            inner = node.get("config")
            layer = (inner.get("name") if isinstance(inner, dict) else None) or node.get("name") or layer
            if cls in UNSAFE_CLASSES:
                raise CheckpointError(f"{path}: layer {layer!r} is {UNSAFE_CLASSES[cls]}; privaudit loads only models "
                                      "built from Keras' own layers (safe_mode=True); rebuild the model without it")
            module = node.get("module")
            if isinstance(module, str) and module not in ("keras", "tf_keras", "builtins") \
                    and not module.startswith(("keras.", "tf_keras.")):
                raise CheckpointError(f"{path}: layer {layer!r} needs {cls!r} from module {module!r}, i.e. code outside "
                                      "Keras; privaudit loads only models built from Keras' own layers")
            registered = node.get("registered_name")
            if isinstance(registered, str) and ">" in registered:
                raise CheckpointError(f"{path}: layer {layer!r} uses the custom object {registered!r}, i.e. code outside "
                                      "Keras; privaudit loads only models built from Keras' own layers")
            for v in node.values():
                walk(v, layer)
        elif isinstance(node, list):
            for v in node:
                walk(v, layer)

    walk(config, None)


def load_keras_model(path: Path):
    """Load a .keras model with ``safe_mode=True`` after :func:`check_keras_config`; errors are one line."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    check_keras_config(_keras_config(path), path)
    keras = import_keras()
    try:
        return keras.models.load_model(path, safe_mode=True, compile=False)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"{path}: not a loadable Keras 2 (tf-keras) model ({type(e).__name__}: {first})") from None


class TfBackend:
    name = "tf"

    def __init__(self):
        import_tf()  # fail here, in the registry, when TensorFlow / tf-keras / TF-Privacy are missing
        import_dp_query()

    def load_data(self, manifest: Manifest, size: int, *, task, console=None, quiet=False):
        with progress_bars(console, quiet) as prog:
            t = prog.add_task("loading images", total=len(manifest.frame), info="")
            return load_inputs(manifest, task, size, progress=lambda k: prog.update(t, completed=k))

    def train(self, manifest: Manifest, config: TrainConfig, out: Path, *, console=None, quiet: bool = False,
              instrument=None) -> dict:
        """Train and write the run directory ``out``. ``instrument``: verify-dp's white-box hook, as in the opacus
        backend (``rows`` adds its canary rows to the training set, ``attach`` watches the DP step)."""
        tf = import_tf()
        keras = import_keras()
        from privaudit.backends.tf_models import create_model

        task = create_task(config.task)
        arch = config.arch or task.default_arch
        size = config.image_size or task.input_size
        frame = manifest.frame
        extra_rows = instrument.rows(task=task, size=size, n_labels=len(manifest.labels)) if instrument else None
        plan = plan_training(manifest, config, task, size, extra_rows=extra_rows)
        train_mask, canaries, n_train, dp, sample_rate = (plan.train_mask, plan.canaries, plan.n_train, plan.dp,
                                                          plan.sample_rate)
        patient = dp.enabled and plan.privacy_unit == "patient"
        if dp.enabled:
            _accountant(dp.accountant)  # refuse gdp before any work
        if console is not None and not quiet:
            for w in plan.warnings:
                console.print(f"[yellow]warning:[/] {w}")
        steps_per_epoch = math.ceil(plan.n_units / config.batch_size)   # units: patients or images
        total_steps = steps_per_epoch * config.epochs
        device = pick_device(config.device, framework="tf")
        sampler = None
        if patient:   # the opacus backend's patient sampler, at the same seed: the same patient draws
            from privaudit.backends._units import PatientSampler

            sampler = PatientSampler(plan.units, plan.n_units, sample_rate, steps=steps_per_epoch,
                                     physical=plan.physical_batch_size, seed=config.seed)

        keras.utils.set_random_seed(config.seed)
        x, y = self.load_data(manifest, size, task=task, console=console, quiet=quiet)
        x_train, y_train = x[train_mask], y[train_mask]
        if canaries is not None:
            cx, cy, included = canaries
            x_train, y_train = np.concatenate([x_train, cx[included]]), np.concatenate([y_train, cy[included]])
        if plan.extra_rows is not None:   # verify-dp's gradient canaries: ordinary rows of the training set
            x_train = np.concatenate([x_train, plan.extra_rows[0]])
            y_train = np.concatenate([y_train, plan.extra_rows[1]])
        xt = _prepare(x_train)

        noise_multiplier = None
        with tf.device(device):
            model = create_model(arch, in_channels=task.in_channels, num_classes=len(manifest.labels),
                                 width=config.width, spatial_dims=task.spatial_dims, size=size)
            init_info = None
            if config.init:
                init_info = self._load_init(model, Path(config.init))
                init_info["path"] = recorded_path(Path(config.init), out)
            optimizer = make_optimizer(config.lr)
            if dp.enabled:
                noise_multiplier = dp.noise_multiplier
                if noise_multiplier is None:
                    noise_multiplier = noise_for_epsilon(dp.accountant, epsilon=dp.epsilon, sample_rate=sample_rate,
                                                         steps=total_steps, delta=dp.delta)
                if patient:
                    step = PatientDPStep(model, optimizer, l2_norm_clip=dp.max_grad_norm,
                                         noise_multiplier=noise_multiplier,
                                         expected_batch_size=sample_rate * plan.n_units)
                else:
                    step = DPStep(model, optimizer, l2_norm_clip=dp.max_grad_norm, noise_multiplier=noise_multiplier,
                                  expected_batch_size=sample_rate * plan.n_units,
                                  physical_batch_size=plan.physical_batch_size)
            else:
                step = PlainStep(model, optimizer)
            if instrument is not None:
                instrument.attach(model=model, optimizer=optimizer, step=step, dp=dp, sampler=sampler)
            history, steps, train_seconds = self._fit(step, x_train=xt, y_train=y_train, x=x, y=y, frame=frame,
                                                      config=config, dp=dp, sample_rate=sample_rate, sampler=sampler,
                                                      steps_per_epoch=steps_per_epoch,
                                                      noise_multiplier=noise_multiplier, console=console, quiet=quiet)
            probs, losses = predict_arrays(model, _prepare(x), y)
        preds = build_predictions(frame, manifest.labels, probs, losses)

        private_mkdir(out)
        model_dir = private_mkdir(out / "model")
        weights = model_dir / "model.keras"
        model.save(weights)
        model_json = {
            "backend": self.name, "architecture": arch, "task": task.name, "width": config.width,
            "input_shape": [task.in_channels] + [size] * task.spatial_dims, "labels": list(manifest.labels),
            "weights": "model.keras", "weights_format": "Keras .keras zip (load with safe_mode=True)",
            "weights_sha256": sha256(weights), "input_layout": "channels_last",
            "keras_input_shape": [size] * task.spatial_dims + [task.in_channels],
            "preprocessing": {"range": [0, 1], "mean": PIXEL_MEAN, "std": PIXEL_STD, "image_size": size},
        }
        write_json(model_dir / "model.json", model_json)
        write_predictions(preds, out / "predictions.csv")
        canary_info = None
        if canaries is not None:
            cx, cy, _ = canaries
            _, closs = predict_arrays(model, _prepare(cx), cy)
            canary_info = write_canaries(out, canaries, closs, config.seed)

        privacy = non_private_block(steps)
        if dp.enabled and noise_multiplier == 0:
            # Clip-only baseline (as the opacus backend's): clipping and Poisson sampling as under DP, but no
            # noise, so no epsilon is claimed (dp false).
            privacy = {**privacy, "noise_multiplier": 0.0, "max_grad_norm": dp.max_grad_norm,
                       "sample_rate": sample_rate, "poisson_sampling": True, "clip_only": True, "clipping": "flat",
                       "grad_sample_mode": "tf.vectorized_map"}
            if patient:
                privacy["microbatches"] = PATIENT_MICROBATCHES
        elif dp.enabled:
            if any(abs(e - noise_multiplier) > 1e-5 * noise_multiplier for e in step.events):
                raise RuntimeError(f"the DP query reported noise multipliers {set(step.events)} != {noise_multiplier}")
            privacy = {
                "dp": True,
                "epsilon": compute_epsilon(dp.accountant, noise_multiplier=noise_multiplier, sample_rate=sample_rate,
                                           steps=len(step.events), delta=dp.delta),
                "delta": dp.delta, "accountant": ACCOUNTANTS[dp.accountant], "accountant_requested": dp.accountant,
                "noise_multiplier": float(noise_multiplier), "max_grad_norm": dp.max_grad_norm,
                "sample_rate": sample_rate, "steps": len(step.events), "poisson_sampling": True,
                "target_epsilon": dp.epsilon,
                "accountant_history": [[float(noise_multiplier), sample_rate, len(step.events)]],
                "clipping": "flat", "microbatches": PATIENT_MICROBATCHES if patient
                else "per example (one microbatch per example)",
                "normalisation": f"noised sum / expected number of patients {sample_rate * plan.n_units:g}" if patient
                else f"noised sum / expected batch size {sample_rate * plan.n_units:g}",
                "dp_query": "tensorflow_privacy NormalizedQuery(GaussianSumQuery)",
                "grad_sample_mode": "tf.vectorized_map", "secure_mode": False,
            }
        unit_block, unit_top, unit_warnings = unit_record(plan, config, privacy)   # image-level: group privacy
        privacy.update(unit_block)
        if console is not None and not quiet:
            for w in unit_warnings[len(plan.warnings):]:
                console.print(f"[yellow]warning:[/] {w}")
        train_json = {
            "backend": self.name, "task": task.name, "architecture": arch, "seed": config.seed,
            "privacy": privacy, "history": history,
            "n_train": n_train, "n_val": int((frame["split"] == "val").sum()), "n_test": int((frame["split"] == "test").sum()),
            "optimizer": {"name": "NAdam", "lr": config.lr, "schedule": "constant"},
            "batch_size": config.batch_size, "physical_batch_size": plan.physical_batch_size,
            "epochs": config.epochs, "device": device, "train_seconds": round(train_seconds, 2),
            "init": init_info, "canaries": canary_info, "versions": versions(),
            "peak_memory": peak_memory(device),
            "distributed": None,  # one process (the opacus backend's torchrun block; no multi-worker TF here)
            **unit_top, "warnings": unit_warnings,
        }
        train_json.update(privacy)  # the privacy block also sits at the top level, as the contract reads it
        write_json(out / "train.json", train_json)
        return train_json

    def _load_init(self, model, path: Path) -> dict:
        src = load_keras_model(path)
        theirs, ours = src.get_weights(), model.get_weights()
        if len(theirs) != len(ours) or any(a.shape != b.shape for a, b in zip(theirs, ours)):
            raise CheckpointError(f"{path}: the weights do not fit this {model.name} (different layers or shapes); "
                                  "check --arch and --width")
        model.set_weights(theirs)
        return {"path": str(path), "sha256": sha256(path)}

    def _fit(self, step, *, x_train, y_train, x, y, frame, config, dp, sample_rate, steps_per_epoch,
             noise_multiplier, console, quiet, sampler=None):
        """The training loop; ``sampler`` (patient-level DP) yields physical batches of whole patients, and a
        logical step ends with its last one."""
        history, steps = [], 0
        split = frame["split"].to_numpy()
        x_val, y_val = _prepare(x[split == "val"]), y[split == "val"]
        plain = None if dp.enabled else shuffled_batches(x_train, y_train, batch_size=config.batch_size,
                                                         seed=config.seed)
        t0 = time.perf_counter()
        with progress_bars(console, quiet) as prog:
            ep_task = prog.add_task("epochs", total=config.epochs, info="")
            for epoch in range(config.epochs):
                st = prog.add_task(f"epoch {epoch + 1}", total=steps_per_epoch, info="")
                if sampler is not None:
                    batches = patient_batches(x_train, y_train, sampler, steps=steps_per_epoch)
                elif dp.enabled:
                    batches = poisson_batches(x_train, y_train, sample_rate=sample_rate,
                                              first_step=epoch * steps_per_epoch, steps=steps_per_epoch,
                                              seed=config.seed)
                else:
                    batches = plain
                losses = []
                for batch in batches:
                    loss = step(*batch)
                    if loss is not None:
                        losses.append(loss)
                    if sampler is not None and not batch[-1]:
                        continue   # a logical step's physical batches: it steps after the last one
                    steps += 1
                    prog.update(st, advance=1)
                prog.remove_task(st)
                rec = {"epoch": epoch + 1, "steps": steps, "train_loss": float(np.mean(losses)) if losses else None,
                       "seconds": round(time.perf_counter() - t0, 2)}
                if len(x_val):
                    _, vl = predict_arrays(step.model, x_val, y_val)
                    rec["val_loss"] = float(np.mean(vl))
                if dp.enabled and noise_multiplier > 0:
                    rec["epsilon"] = compute_epsilon(dp.accountant, noise_multiplier=noise_multiplier,
                                                     sample_rate=sample_rate, steps=steps, delta=dp.delta)
                history.append(rec)
                info = f"loss {rec['train_loss']:.3f}" if rec["train_loss"] is not None else ""
                if "epsilon" in rec:
                    info += f"  ε {rec['epsilon']:.2f}"
                prog.update(ep_task, advance=1, info=info)
        return history, steps, time.perf_counter() - t0

    def predict_checkpoint(self, checkpoint: Path, manifest: Manifest, *, task: str, arch: str | None = None,
                           image_size: int | None = None, trust: bool = False, width: int | None = None):
        """Predict with a .keras model trained elsewhere (loaded with safe_mode=True; ``trust`` changes nothing)."""
        task = create_task(task)
        checkpoint = Path(checkpoint)
        model = load_keras_model(checkpoint)
        if len(model.inputs) != 1 or len(model.outputs) != 1:
            raise CheckpointError(f"{checkpoint}: the model has {len(model.inputs)} inputs and {len(model.outputs)} "
                                  "outputs; privaudit needs one image input and one output of per-label logits")
        in_shape = tuple(model.inputs[0].shape[1:])
        n_out = model.outputs[0].shape[-1]
        if n_out != len(manifest.labels):
            raise CheckpointError(f"{checkpoint}: the model has {n_out} outputs but the data has "
                                  f"{len(manifest.labels)} labels ({', '.join(manifest.labels)}); pick them with --labels")
        if len(in_shape) != task.spatial_dims + 1:
            raise CheckpointError(f"{checkpoint}: the model takes {len(in_shape) - 1}D inputs but task {task.name!r} "
                                  f"is {task.spatial_dims}D")
        if in_shape[-1] != task.in_channels:
            raise CheckpointError(f"{checkpoint}: the model takes {in_shape[-1]} channels (channels-last) but task "
                                  f"{task.name!r} has {task.in_channels}")
        fixed = {d for d in in_shape[:-1] if d is not None}
        size = image_size or (fixed.pop() if len(fixed) == 1 else task.input_size)
        if fixed and size not in fixed:
            raise CheckpointError(f"{checkpoint}: the model takes inputs of shape {in_shape} but --image-size is "
                                  f"{size}; leave --image-size out or match the model")
        x, y = self.load_data(manifest, size, task=task, quiet=True)
        try:
            probs, losses = predict_arrays(model, _prepare(x), y)
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise CheckpointError(f"{checkpoint}: the model fails on {size}-pixel inputs ({type(e).__name__}: {first}); "
                                  "check --image-size") from None
        # the architecture is the file's own (its Keras model name); --arch does not apply to a full model file
        info = {"format": "keras", "architecture": model.name, "checkpoint": str(checkpoint),
                "sha256": sha256(checkpoint), "backend": self.name, "image_size": size}
        return build_predictions(manifest.frame, manifest.labels, probs, losses), info
