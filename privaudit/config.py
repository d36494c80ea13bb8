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

ACCOUNTANTS = ("prv", "rdp", "gdp")
# How per-sample gradients are clipped (opacus backend): Opacus' hooks, expanded weights (ew) and ghost
# clipping, or privaudit's fast engine (privaudit.backends.fastdp). Same clipping, noise and accounting.
CLIPPING_MODES = ("hooks", "ew", "ghost", "fast")
# What DP protects (privaudit.backends._plan.resolve_unit): a patient with all its images, or one image.
PRIVACY_UNITS = ("patient", "image")


def patient_unit_refusal(backend: str, clipping: str, *, torchrun: bool = False) -> str | None:
    """Why patient-level DP cannot run with these settings (one line with the fix), or None when it can."""
    if backend != "opacus":
        return (f"privacy_unit 'patient' is not available on the {backend} backend yet (its DP optimizer clips "
                "each image on its own); use the opacus backend, or privacy_unit 'image'")
    if clipping in ("ew", "ghost"):
        return (f"privacy_unit 'patient' needs a patient's image gradients summed before clipping, which clipping "
                f"{clipping!r} cannot do; use clipping 'fast' or 'hooks', or privacy_unit 'image'")
    if torchrun:
        return ("privacy_unit 'patient' is not available under torchrun yet (the distributed Poisson sampler draws "
                "images, not patients); train in one process, or use privacy_unit 'image'")
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
            raise ConfigError("give either --epsilon or --noise-multiplier for DP training (or --no-dp)")
        if self.noise_multiplier is not None and self.epsilon is not None:
            raise ConfigError("give --epsilon or --noise-multiplier, not both: one determines the other")
        if self.epsilon is not None and not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            raise ConfigError(f"--epsilon must be a positive number, got {self.epsilon}; use --no-dp for no privacy")
        if self.noise_multiplier is not None and not self.noise_multiplier >= 0:
            raise ConfigError(f"--noise-multiplier must be >= 0, got {self.noise_multiplier} (0 clips without "
                              "noise: a clip-only baseline that earns no epsilon)")
        if self.delta is not None and not (0 < self.delta < 1):
            raise ConfigError(f"--delta must be in (0, 1), got {self.delta}")
        if not self.max_grad_norm > 0:
            raise ConfigError(f"--max-grad-norm must be > 0, got {self.max_grad_norm}")
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
                f"--delta {delta:g} is not below 1/N = {1 / n_train:.3g} (N = {n_train} training {unit}); "
                "a delta that large allows leaking whole records; use a smaller delta, e.g. the default 1/N^1.1"
            )
        return dataclasses.replace(self, delta=delta)


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
    physical_batch_size: int = 64      # memory limit per forward/backward
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
            raise ConfigError(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.physical_batch_size < 1:
            raise ConfigError(f"--physical-batch-size must be at least 1, got {self.physical_batch_size}")
        if self.width < 4:
            raise ConfigError(f"--width must be at least 4, got {self.width}")
        if self.image_size is not None and self.image_size < 16:
            raise ConfigError(f"--image-size must be at least 16, got {self.image_size}")
        if self.canaries < 0:
            raise ConfigError(f"--canaries must be 0 or more, got {self.canaries}")
        if self.clipping not in CLIPPING_MODES:
            raise ConfigError(f"unknown --clipping {self.clipping!r}; use one of {', '.join(CLIPPING_MODES)}")
        if self.clipping != "hooks" and self.backend != "opacus":
            raise ConfigError(f"--clipping {self.clipping} is an option of the opacus backend, not of "
                              f"{self.backend!r}; leave --clipping out")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        if self.privacy_unit is not None and self.privacy_unit not in PRIVACY_UNITS:
            raise ConfigError(f"unknown privacy_unit {self.privacy_unit!r}; use patient or image (or leave it out: "
                              "patient whenever a patient has several training images)")
        if self.max_images_per_patient is not None and self.max_images_per_patient < 1:
            raise ConfigError(f"max_images_per_patient must be at least 1, got {self.max_images_per_patient}; "
                              "leave it out to keep every image")
        why = patient_unit_refusal(self.backend, self.clipping) if self.privacy_unit == "patient" else None
        if why:
            raise ConfigError(why)

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
    attributes: tuple[str, ...] | None = None  # None: every attribute column present; "a*b" intersects
    age_edges: tuple[int, ...] = (0, 31, 61, 71, 81)

    def __post_init__(self):
        if self.n_boot < 1:
            raise ConfigError(f"--n-boot must be at least 1, got {self.n_boot}")
        if not 0 < self.ci < 1:
            raise ConfigError(f"--ci must be in (0, 1), got {self.ci}")
        if self.ci_method not in ("percentile", "bca"):
            raise ConfigError(f"unknown CI method {self.ci_method!r}; use percentile or bca")
        if self.threshold != "youden":
            try:
                t = float(self.threshold)
            except (TypeError, ValueError):
                raise ConfigError(f"--threshold must be 'youden' or a probability, got {self.threshold!r}") from None
            if not 0 <= t <= 1:
                raise ConfigError(f"--threshold must be in [0, 1], got {t}")
            object.__setattr__(self, "threshold", t)
        if not 0 < self.specificity < 1:
            raise ConfigError(f"--specificity must be in (0, 1), got {self.specificity}")
        if not self.margin > 0:
            raise ConfigError(f"--margin must be > 0, got {self.margin}")


def load_toml(path: Path) -> dict:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
