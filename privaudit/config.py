"""Configuration objects. Options are validated once, here, at the edge; everything else receives these.

Each config is a frozen dataclass that round-trips through a plain dict (``config.json``) and can be read
from a TOML file (``[dp]``, ``[train]``, ``[audit]`` tables).
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from privaudit.errors import ConfigError
from privaudit.limits import check_limit

ACCOUNTANTS = ("prv", "rdp", "gdp")
# How per-sample gradients are clipped (opacus backend): Opacus' hooks, expanded weights (ew) and ghost
# clipping, or privaudit's fast engine (privaudit.backends.fastdp). Same clipping, noise and accounting.
CLIPPING_MODES = ("hooks", "ew", "ghost", "fast")
# DPConfig fields that TrainConfig.for_task takes by their own names; options whose default is the task's.
DP_OPTIONS = ("epsilon", "delta", "noise_multiplier", "max_grad_norm", "accountant", "poisson_sampling")
TASK_DEFAULTS = ("epochs", "batch_size", "width", "lr")
# What DP protects (privaudit.backends._plan.resolve_unit): a patient with all its images, or one image.
PRIVACY_UNITS = ("patient", "image")


def patient_unit_refusal(backend: str, clipping: str, *, torchrun: bool = False) -> str | None:
    """Why patient-level DP cannot run with these settings (one line with the fix), or None when it can."""
    if backend == "tf":
        # tf_backend.PatientDPStep sums the per-example gradients by patient before TF-Privacy's GaussianSumQuery
        # clips them (the tf backend has no other clipping: clipping stays 'hooks'); it runs in one process
        return None
    if backend != "opacus":
        return (f"privacy_unit 'patient' is not available on the {backend} backend yet (its DP optimizer clips "
                "each image on its own); use the opacus backend, or privacy_unit 'image'")
    if clipping in ("ew", "ghost"):
        return (f"privacy_unit 'patient' needs a patient's image gradients summed before clipping, which clipping "
                f"{clipping!r} cannot do; use clipping 'fast' or 'hooks', or privacy_unit 'image'")
    return None


def default_delta(n_train: int) -> float:
    """The default delta, 1 / N^1.1, rounded down to one significant digit (N=2000 gives 2e-4).

    The exponent keeps delta below 1/N, as DP requires for a meaningful guarantee; rounding down keeps it so.
    """
    if n_train < 1:
        raise ConfigError("cannot choose delta for an empty training set")
    x = 1.0 / n_train**1.1
    exp = math.floor(math.log10(x))
    mant = math.floor(x / 10**exp + 1e-9)
    return float(f"{mant}e{exp}")


@dataclass(frozen=True)
class DPConfig:
    """How the model is made differentially private (DP-SGD through Opacus or TF-Privacy)."""

    enabled: bool = True
    epsilon: float | None = 8.0          # target epsilon; None when noise_multiplier is given
    delta: float | None = None           # None: default_delta(n_train), fixed when the data is known
    noise_multiplier: float | None = None  # 0: clip-only (clipping and sampling, no noise, no epsilon claimed)
    max_grad_norm: float = 1.0           # per-sample clipping norm C
    accountant: str = "prv"              # prv (default, tight), rdp, gdp
    poisson_sampling: bool = True        # the accountants assume it; turning it off forfeits the DP claim

    def __post_init__(self):
        if not self.enabled:
            return
        if self.accountant not in ACCOUNTANTS:
            raise ConfigError(f"unknown accountant {self.accountant!r}; use one of {', '.join(ACCOUNTANTS)}")
        if self.noise_multiplier is None and self.epsilon is None:
            raise ConfigError("give either epsilon or noise_multiplier for DP training (or dp=False)")
        if self.noise_multiplier is not None and self.epsilon is not None:
            raise ConfigError("give epsilon or noise_multiplier, not both: one determines the other")
        if self.epsilon is not None and not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            raise ConfigError(f"epsilon must be a positive number, got {self.epsilon}; use dp=False for no privacy")
        sigma = self.noise_multiplier
        if sigma is not None and not (sigma >= 0 and math.isfinite(sigma)):
            raise ConfigError(f"noise_multiplier must be a finite number >= 0, got {self.noise_multiplier} (0 clips "
                              "without noise: a clip-only baseline that earns no epsilon)")
        if self.delta is not None and not (0 < self.delta < 1):
            raise ConfigError(f"delta must be in (0, 1), got {self.delta}")
        if not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)):
            raise ConfigError(f"max_grad_norm must be a finite number > 0, got {self.max_grad_norm}")
        if not self.poisson_sampling:
            raise ConfigError(
                "DP training without Poisson sampling is refused: the accountants' epsilon assumes each sample "
                "joins each batch independently, so the reported epsilon would not be earned"
            )

    def resolve_delta(self, n_train: int, unit: str = "samples") -> "DPConfig":
        """Fix delta for a training set of ``n_train`` privacy units (``unit``: "samples" or "patients") and
        check delta < 1/N."""
        if not self.enabled:
            return self
        delta = default_delta(n_train) if self.delta is None else self.delta
        if delta >= 1.0 / n_train:
            raise ConfigError(
                f"delta {delta:g} is not below 1/N = {1 / n_train:.3g} (N = {n_train} training {unit}); "
                "a delta that large allows leaking whole records; use a smaller delta, e.g. the default 1/N^1.1"
            )
        return dataclasses.replace(self, delta=delta)


def _size_limit(task: str) -> str:
    """The limit on ``task``'s image size: MAX_VOLUME_SIZE for a 3D task, else MAX_IMAGE_SIZE."""
    from privaudit.errors import RegistryError
    from privaudit.tasks import create_task

    try:
        dims = create_task(task).spatial_dims
    except RegistryError:
        dims = 2   # an unknown task is refused where the task is looked up, with the valid names
    return "MAX_VOLUME_SIZE" if dims == 3 else "MAX_IMAGE_SIZE"


@dataclass(frozen=True)
class TrainConfig:
    """One training run."""

    task: str = "cxr"
    backend: str = "opacus"
    arch: str | None = None            # None: the task's default architecture
    width: int = 32                    # channels of the first stage
    image_size: int | None = None      # None: the task's input size
    epochs: int = 5
    batch_size: int = 64               # logical (expected) batch size, in privacy units (patients or images)
    # memory limit per forward/backward pass, in images. None: the batch size, raised under patient-level DP to the
    # largest patient's image count (a patient's images share one physical batch); the plan resolves it.
    physical_batch_size: int | None = None
    lr: float = 2e-3
    seed: int = 0
    device: str = "auto"               # auto: CUDA when available
    init: str | None = None            # path of weights to start from (state_dict)
    canaries: int = 0                  # canaries for the one-run empirical epsilon (each included w.p. 1/2)
    clipping: str = "hooks"            # per-sample clipping engine: one of CLIPPING_MODES
    dp: DPConfig = field(default_factory=DPConfig)
    privacy_unit: str | None = None    # None: "patient" when a patient has several training images, else "image"
    max_images_per_patient: int | None = None  # keep at most this many training images per patient (seeded)

    def __post_init__(self):
        if self.epochs < 1:
            raise ConfigError(f"epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.physical_batch_size is not None and self.physical_batch_size < 1:
            raise ConfigError(f"physical_batch_size must be at least 1, got {self.physical_batch_size}")
        if self.width < 4:
            raise ConfigError(f"width must be at least 4, got {self.width}")
        if self.image_size is not None and self.image_size < 16:
            raise ConfigError(f"image_size must be at least 16, got {self.image_size}")
        if self.canaries < 0:
            raise ConfigError(f"canaries must be 0 or more, got {self.canaries}")
        if self.clipping not in CLIPPING_MODES:
            raise ConfigError(f"unknown clipping {self.clipping!r}; use one of {', '.join(CLIPPING_MODES)}")
        if self.clipping != "hooks" and self.backend != "opacus":
            raise ConfigError(f"clipping {self.clipping} is an option of the opacus backend, not of "
                              f"{self.backend!r}; leave clipping at hooks")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a finite number > 0, got {self.lr}")
        for name in ("epochs", "batch_size", "physical_batch_size", "width", "canaries"):
            if getattr(self, name) is not None:
                check_limit(name, getattr(self, name))
        if self.image_size is not None:
            check_limit("image_size", self.image_size, const=_size_limit(self.task))
        if self.privacy_unit is not None and self.privacy_unit not in PRIVACY_UNITS:
            raise ConfigError(f"unknown privacy_unit {self.privacy_unit!r}; use patient or image (or leave it out: "
                              "patient whenever a patient has several training images)")
        if self.max_images_per_patient is not None and self.max_images_per_patient < 1:
            raise ConfigError(f"max_images_per_patient must be at least 1, got {self.max_images_per_patient}; "
                              "leave it out to keep every image")
        why = patient_unit_refusal(self.backend, self.clipping) if self.privacy_unit == "patient" else None
        if why:
            raise ConfigError(why)

    @classmethod
    def for_task(cls, task: str = "cxr", **options) -> "TrainConfig":
        """A training configuration with the task's defaults for every option left out (or given as None).

        ``options`` are TrainConfig's fields (``epochs``, ``batch_size``, ``width``, ``image_size``, ...) and the DP
        settings by their own names (``epsilon``, ``delta``, ``noise_multiplier``, ``max_grad_norm``,
        ``accountant``), with ``dp=False`` for a non-private run (or a ready DPConfig). Without ``epsilon`` and
        ``noise_multiplier``, DP training targets epsilon 8. The CLI builds its configurations here too, so the
        command line and the Python API get the same defaults.

        >>> TrainConfig.for_task("pdac", epochs=2).batch_size
        16
        """
        from privaudit.tasks import create_task

        spec = create_task(task)
        options = {k: v for k, v in options.items() if v is not None}
        dp = options.pop("dp", True)
        dp_options = {k: options.pop(k) for k in DP_OPTIONS if k in options}
        if not isinstance(dp, DPConfig):
            if "noise_multiplier" in dp_options:
                dp_options.setdefault("epsilon", None)
            dp = DPConfig(enabled=bool(dp), **dp_options)
        elif dp_options:
            dp = dataclasses.replace(dp, **dp_options)
        for name in TASK_DEFAULTS:
            options.setdefault(name, spec.default(name))
        if "init" in options:
            options["init"] = str(options["init"])
        valid = {f.name for f in dataclasses.fields(cls)} - {"task", "dp"}
        unknown = sorted(set(options) - valid)
        if unknown:
            import difflib

            close = difflib.get_close_matches(unknown[0], sorted(valid | set(DP_OPTIONS) | {"dp"}), n=1)
            raise ConfigError(f"unknown training option {unknown[0]!r}"
                              + (f" (did you mean {close[0]!r}?)" if close else "")
                              + f"; valid: {', '.join(sorted(valid | set(DP_OPTIONS) | {'dp'}))}")
        return cls(task=task, dp=dp, **options)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        dp = DPConfig(**d.pop("dp", {}))
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown training option {sorted(unknown)[0]!r}; valid: {', '.join(sorted(names))}")
        return cls(dp=dp, **d)


@dataclass(frozen=True)
class AuditConfig:
    """How the audit resamples and summarises."""

    n_boot: int = 1000
    ci: float = 0.95
    seed: int = 0
    cluster: bool = True               # resample patients, not images, when patient_id repeats
    ci_method: str = "percentile"      # percentile, or bca for the AUROCs
    threshold: str | float = "youden"  # youden (chosen on val when there is one) or a fixed probability
    specificity: float = 0.9           # for sensitivity at a fixed specificity
    margin: float = 0.02               # equivalence margin of the "does DP amplify unfairness?" verdict
    alpha: float = 0.05
    attributes: tuple[str, ...] | None = None  # None: the known attribute columns and attr_*; "a*b" intersects
    age_edges: tuple[int, ...] = (0, 31, 61, 71, 81)
    min_cell: int = 10                 # groups with fewer patients are suppressed (privaudit.audit._cells.MIN_CELL)

    def __post_init__(self):
        if self.n_boot < 1:
            raise ConfigError(f"n_boot must be at least 1, got {self.n_boot}")
        check_limit("n_boot", self.n_boot)
        if not 0 < self.ci < 1:
            raise ConfigError(f"ci must be in (0, 1), got {self.ci}")
        if self.ci_method not in ("percentile", "bca"):
            raise ConfigError(f"unknown CI method {self.ci_method!r}; use percentile or bca")
        if self.threshold != "youden":
            try:
                t = float(self.threshold)
            except (TypeError, ValueError):
                raise ConfigError(f"threshold must be 'youden' or a probability, got {self.threshold!r}") from None
            if not 0 <= t <= 1:
                raise ConfigError(f"threshold must be in [0, 1], got {t}")
            object.__setattr__(self, "threshold", t)
        if not 0 < self.specificity < 1:
            raise ConfigError(f"specificity must be in (0, 1), got {self.specificity}")
        if not (self.margin > 0 and math.isfinite(self.margin)):
            raise ConfigError(f"margin must be a finite number > 0, got {self.margin}")
        if isinstance(self.min_cell, bool) or not isinstance(self.min_cell, int) or self.min_cell < 1:
            raise ConfigError(f"min_cell must be a whole number of patients, at least 1, got {self.min_cell!r}")


MAX_TOML_BYTES = 1 << 20   # a configuration, policy or model-card file is a few hundred bytes


def load_toml(path: Path, what: str = "configuration file") -> dict:
    """A TOML file as a dict; every way it can fail (missing, a folder, unreadable, too large, not UTF-8, not
    TOML) is one ConfigError line naming the file. ``what`` names the kind of file in those lines."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: a folder, not a {what}; give a TOML file")
    try:
        size = path.stat().st_size
        if size > MAX_TOML_BYTES:
            raise ConfigError(f"{path}: {size:,} bytes is too large for a {what} (TOML)")
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the {what} ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); save the {what} as UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({str(e).splitlines()[0] if str(e) else 'no detail'})") from None
    except RecursionError:
        raise ConfigError(f"{path}: TOML nested too deeply for a {what}") from None
