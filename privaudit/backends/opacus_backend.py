"""PyTorch + Opacus backend: DP-SGD with Poisson sampling, per-sample clipping and a PRV/RDP/GDP accountant.

**Patient-level DP** (``privacy_unit="patient"``, the default when a patient has several training images):
each step Poisson-samples patients at rate ``q = batch_size / training patients`` and takes every training
image of a sampled patient (``backends._units``); physical batches hold whole patients. A patient's gradient
is the **sum** of its images' loss gradients, clipped to C as one unit. The sum, not the mean, because then C
bounds exactly what one patient adds to the noisy sum, whatever its number of images, and a patient's image
weighs in the update as much as any other image (the mean would make an image of a patient with k images
count 1/k). Opacus' noise is ``sigma C``; the sum is divided by the expected number of patients, ``q N``; the
accountant counts patient steps at rate q. Hooks mode sums the per-sample gradient rows by patient before
Opacus' optimizer clips them; the fast engine computes each patient's norm exactly (``fastdp._layers``).
"""

from __future__ import annotations

import contextlib
import math
import platform
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from privaudit._version import __version__
from privaudit._fs import private_mkdir, write_json
from privaudit.backends import distributed
from privaudit.backends._device import pick_device
from privaudit.backends._weights import load_state_dict
from privaudit.backends.torch_models import create_model
from privaudit.backends._plan import (non_private_block, plan_training, progress_bars, recorded_path, sha256,
                                     unit_record,
                                     write_canaries)
from privaudit.config import TrainConfig
from privaudit.data.inputs import load_inputs
from privaudit.data.manifest import Manifest
from privaudit.errors import CheckpointError, ConfigError, DPError
from privaudit.predictions import build_predictions, write_predictions
from privaudit.tasks import create_task

# Images are read in [0, 1]; the network sees (x - MEAN) / STD.
PIXEL_MEAN, PIXEL_STD = 0.5, 0.25

BATCHNORM_WHY = (
    "BatchNorm mixes the samples of a batch, so a sample's gradient depends on the others and per-sample "
    "clipping no longer bounds its influence: the DP guarantee would not hold. Use GroupNorm "
    "(--arch resnet9-gn) instead"
)


def versions() -> dict:
    import opacus

    return {"privaudit": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "opacus": opacus.__version__, "numpy": np.__version__}


def peak_memory(device) -> dict:
    """Peak memory so far: the process's CPU resident set (getrusage, since the process started, so a second
    run in the same process reports at least the first's) and, on CUDA, the tensors' peak since this run began."""
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    rss_mb = rss / 2**20 if sys.platform == "darwin" else rss / 2**10
    out = {"cpu_rss_peak_mb": round(rss_mb, 1), "cpu_scope": "process peak (getrusage ru_maxrss)",
           "cuda_max_allocated_mb": None}
    if getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_available():
        out["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def masked_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample BCE averaged over the sample's known labels (NaN = unknown, masked out)."""
    known = ~torch.isnan(targets)
    loss = nn.functional.binary_cross_entropy_with_logits(
        logits, torch.nan_to_num(targets, nan=0.0), reduction="none"
    )
    return (loss * known).sum(dim=1) / known.sum(dim=1).clamp(min=1)


def check_dp_compatible(model: nn.Module) -> None:
    """Refuse a model that breaks DP-SGD's assumptions, with the reason (Opacus' ModuleValidator)."""
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        if any("BatchNorm" in str(e) for e in errors):
            raise DPError(f"the model has BatchNorm layers and cannot be trained with DP: {BATCHNORM_WHY}")
        raise DPError(f"the model cannot be trained with DP: {errors[0]}; see Opacus' ModuleValidator.fix")


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def _load_into(model: nn.Module, state: dict, path: Path) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise CheckpointError(f"{path}: weights do not fit the architecture ({detail}); check --arch and --width") from None


@torch.no_grad()
def _predict(model: nn.Module, x: np.ndarray, y: np.ndarray, device, batch: int = 256):
    model.eval()
    probs, losses = [], []
    for i in range(0, len(x), batch):
        xb = (torch.from_numpy(x[i:i + batch]).to(device) - PIXEL_MEAN) / PIXEL_STD
        yb = torch.from_numpy(y[i:i + batch]).to(device)
        logits = model(xb)
        probs.append(torch.sigmoid(logits).cpu().numpy())
        losses.append(masked_bce(logits, yb).cpu().numpy())
    return np.concatenate(probs), np.concatenate(losses)


class _PatientLoader:
    """Patient-level DP's batches for one epoch after another: ``(x, y, units, last)`` per physical batch, whole
    patients each (``backends._units.PatientSampler``), read by a DataLoader (worker processes on CUDA)."""

    def __init__(self, sampler, dataset, device, ddp):
        from privaudit.backends._units import EmptySafeCollate
        from privaudit.data.cache import loader_options

        self.sampler, self.dataset = sampler, dataset
        x0, y0 = dataset[0]
        self.collate = EmptySafeCollate(tuple(x0.shape), tuple(y0.shape))
        self.options = loader_options(device, local_world_size=ddp.local_world_size)

    def __len__(self) -> int:
        return len(self.sampler)   # logical steps per epoch

    def __iter__(self):
        from torch.utils.data import DataLoader

        from privaudit.backends.fastdp import Units

        batches = self.sampler.epoch()
        data = DataLoader(self.dataset, batch_sampler=[b.items for b in batches], collate_fn=self.collate,
                          **self.options)
        for b, (xb, yb) in zip(batches, data):
            yield xb, yb, Units(torch.from_numpy(b.units), b.n_units), b.last


class OpacusBackend:
    name = "opacus"

    def load_data(self, manifest: Manifest, size: int, *, task, console=None, quiet=False):
        with progress_bars(console, quiet) as prog:
            t = prog.add_task("loading images", total=len(manifest.frame), info="")
            return load_inputs(manifest, task, size, progress=lambda k: prog.update(t, completed=k))

    def train(self, manifest: Manifest, config: TrainConfig, out: Path, *, console=None, quiet: bool = False,
              instrument=None) -> dict:
        """Train and write the run directory ``out``. ``instrument`` is verify-dp's white-box hook
        (``privaudit.backends.verify_dp``): it adds its gradient canaries to the training set and watches the
        optimizer; None (always, outside verify-dp) leaves training untouched."""
        from torch.utils.data import DataLoader

        from privaudit.data.cache import ArrayDataset, loader_options

        task = create_task(config.task)
        arch = config.arch or task.default_arch
        size = config.image_size or task.input_size
        frame = manifest.frame
        # verify-dp's gradient canaries join the training set as ordinary rows
        extra_rows = instrument.rows(task=task, size=size, n_labels=len(manifest.labels)) if instrument else None
        plan = plan_training(manifest, config, task, size, extra_rows=extra_rows)
        train_mask, canaries, n_train, dp = plan.train_mask, plan.canaries, plan.n_train, plan.dp
        patient = dp.enabled and plan.privacy_unit == "patient"
        if console is not None and not quiet:
            for w in plan.warnings:
                console.print(f"[yellow]warning:[/] {w}")

        torch.manual_seed(config.seed)
        np.random.seed(config.seed)
        ddp = distributed.setup(config.device)   # torchrun: join the process group; else one process
        device = ddp.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        quiet = quiet or not ddp.is_main
        zoo, clipping = None, config.clipping
        if ":" in arch:   # torchvision:/timm:/monai: names; init loaded before any BatchNorm replacement
            from privaudit.backends.zoo import build_zoo_model, zoo_clipping

            zoo = build_zoo_model(arch, in_channels=task.in_channels, num_classes=len(manifest.labels),
                                  spatial_dims=task.spatial_dims, init=config.init, dp=dp.enabled)
            model, init_info = zoo.model, zoo.init
            if dp.enabled:
                clipping = zoo_clipping(model, config.clipping)
        else:
            model = create_model(arch, in_channels=task.in_channels, num_classes=len(manifest.labels),
                                 width=config.width, spatial_dims=task.spatial_dims)
            init_info = None
            if config.init:
                init_path = Path(config.init)
                _load_into(model, load_state_dict(init_path), init_path)
                init_info = {"path": recorded_path(init_path, out), "sha256": sha256(init_path)}
        if dp.enabled:
            check_dp_compatible(model)
        model.to(device)
        model = distributed.wrap_model(model, ddp, dp=dp.enabled)   # DPDDP under DP, DDP otherwise

        x, y = self.load_data(manifest, size, task=task, console=console, quiet=quiet)
        extra = plan.extra_rows
        if canaries is not None:
            cx, cy, included = canaries
            extra = (cx[included], cy[included])
        # Rows are read per batch (a memory-mapped cache is paged in as needed), by worker processes on CUDA.
        dataset = ArrayDataset(x, y, np.flatnonzero(train_mask), extra=extra, mean=PIXEL_MEAN, std=PIXEL_STD)
        gen = torch.Generator().manual_seed(distributed.sampling_seed(config.seed, ddp))
        # Under DP the batch stays global (Opacus' Poisson loader); without DP torchrun ranks split it evenly.
        sampler = None if dp.enabled else distributed.shard_sampler(dataset, ddp, seed=config.seed)
        batch = config.batch_size if dp.enabled else distributed.local_batch_size(config.batch_size, ddp)
        loader = DataLoader(dataset, batch_size=batch, shuffle=sampler is None, sampler=sampler, generator=gen,
                            collate_fn=ArrayDataset.collate,
                            **loader_options(device, local_world_size=ddp.local_world_size))
        optimizer = torch.optim.NAdam(model.parameters(), lr=config.lr)

        engine = patients = None
        if patient:
            from privaudit.backends._units import PatientSampler

            patients = PatientSampler(plan.units, plan.n_units, plan.sample_rate, physical=plan.physical_batch_size,
                                     steps=math.ceil(plan.n_units / config.batch_size),
                                     seed=distributed.sampling_seed(config.seed, ddp),
                                     shard=distributed.patient_shard(plan.n_units, ddp, seed=config.seed))
        if dp.enabled:
            # Opacus' PrivacyEngine plus grad_sample_mode="fast" (privaudit.backends.fastdp); ghost clipping
            # needs the criterion, as one loss per sample.
            from privaudit.backends.fastdp import FastPrivacyEngine, PerSampleLoss

            common = dict(module=model, optimizer=optimizer, data_loader=loader, max_grad_norm=dp.max_grad_norm,
                          poisson_sampling=True, grad_sample_mode=clipping,
                          criterion=PerSampleLoss(masked_bce))
            with warnings.catch_warnings():
                # secure_mode (a cryptographic RNG for the noise) is off, as in Opacus' default; train.json says so.
                warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
                engine = FastPrivacyEngine(accountant=dp.accountant)
                warnings.filterwarnings("ignore", message=".*Optimal order is the (largest|smallest) alpha.*")
                if patient:
                    model, optimizer = self._make_patient_private(engine, dp, config, patients, common)
                elif dp.epsilon is not None:
                    made = engine.make_private_with_epsilon(
                        target_epsilon=dp.epsilon, target_delta=dp.delta, epochs=config.epochs, **common)
                else:
                    made = engine.make_private(noise_multiplier=dp.noise_multiplier, **common)
                if not patient:
                    model, optimizer, loader = made[0], made[1], made[-1]   # ghost also returns its loss wrapper
        if patient:
            loader = _PatientLoader(patients, dataset, device, ddp)
            distributed.contiguous_reduce(optimizer, ddp)   # torchrun only
        elif engine is not None:
            loader = distributed.after_make_private(loader, optimizer, ddp, seed=config.seed)   # torchrun only
        if instrument is not None:   # verify-dp: inject at the per-sample gradients, observe the noised sums
            instrument.attach(model=model, optimizer=optimizer, loader=loader, engine=engine, ddp=ddp)

        with warnings.catch_warnings():
            # Opacus' hooks on the first layer see inputs that need no gradient; torch warns, harmlessly.
            warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
            history, steps, train_seconds = self._fit(model, optimizer, loader, engine, dp, config, x, y, frame,
                                                      device, console, quiet)

        distributed.teardown(ddp, model)   # every rank holds the same weights; the ranks are done with each other
        base = distributed.unwrap_model(model)
        if not ddp.is_main:   # only rank 0 predicts and writes the run directory
            return {"rank": ddp.rank, "world_size": ddp.world_size, "steps": steps, "written": False}
        probs, losses = _predict(base, x, y, device)
        preds = build_predictions(frame, manifest.labels, probs, losses)

        private_mkdir(out)
        model_dir = private_mkdir(out / "model")
        weights = model_dir / "weights.pt"
        torch.save({k: v.detach().cpu() for k, v in base.state_dict().items()}, weights)
        model_json = {
            "backend": self.name, "architecture": arch, "task": task.name, "width": config.width,
            "input_shape": [task.in_channels] + [size] * task.spatial_dims, "labels": list(manifest.labels),
            "weights": "weights.pt", "weights_format": "torch state_dict (load with weights_only=True)",
            "weights_sha256": sha256(weights),
            "preprocessing": {"range": [0, 1], "mean": PIXEL_MEAN, "std": PIXEL_STD, "image_size": size},
        }
        write_json(model_dir / "model.json", model_json)
        write_predictions(preds, out / "predictions.csv")
        canary_info = None
        if canaries is not None:
            cx, cy, _ = canaries
            _, closs = _predict(base, cx, cy, device)
            canary_info = write_canaries(out, canaries, closs, config.seed)

        privacy = non_private_block(steps)
        if engine is not None and dp.noise_multiplier == 0:
            # Clip-only baseline: per-sample clipping and Poisson sampling as under DP, but no noise, so no
            # epsilon is claimed (dp false); the clipping is recorded to separate its cost from the noise's.
            privacy = {**privacy, "noise_multiplier": 0.0, "max_grad_norm": dp.max_grad_norm,
                       "sample_rate": plan.sample_rate if patient else float(loader.sample_rate),
                       "poisson_sampling": True, "clip_only": True,
                       "clipping": "flat", "grad_sample_mode": engine.grad_sample_mode}
        elif engine is not None:
            history_acc = engine.accountant.history  # [(noise_multiplier, sample_rate, steps)]
            nm, q = float(optimizer.noise_multiplier), float(history_acc[0][1]) if history_acc else float(loader.sample_rate)
            privacy = {
                "dp": True, "epsilon": float(engine.get_epsilon(dp.delta)), "delta": dp.delta,
                "accountant": dp.accountant, "noise_multiplier": nm, "max_grad_norm": dp.max_grad_norm,
                "sample_rate": q, "steps": int(sum(h[2] for h in history_acc)), "poisson_sampling": True,
                "target_epsilon": dp.epsilon, "accountant_history": [list(h) for h in history_acc],
                "clipping": "flat", "grad_sample_mode": engine.grad_sample_mode, "secure_mode": False,
            }
        unit_block, unit_top, unit_warnings = unit_record(plan, config, privacy)
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
            "epochs": config.epochs, "device": str(device), "train_seconds": round(train_seconds, 2),
            "init": init_info, "canaries": canary_info, "versions": versions(), "distributed": ddp.describe(),
            "peak_memory": peak_memory(device), **unit_top, "warnings": unit_warnings,
        }
        if zoo is not None:   # every change made to the library's network, and a warning that it changed
            train_json["model_changes"] = zoo.record()
            train_json["warnings"] = [w for w in [zoo.warning()] if w]
        train_json.update(privacy)  # the privacy block also sits at the top level, as the contract reads it
        write_json(out / "train.json", train_json)
        return train_json

    @staticmethod
    def _make_patient_private(engine, dp, config, sampler, common):
        """Opacus' make_private for patient-level DP: the loader stays ours (patients, not images, are Poisson
        sampled), so the noise is calibrated, the optimizer's denominator set and the accountant's hook
        attached at the patient sample rate q here, rather than from the loader's length."""
        from opacus.accountants.utils import get_noise_multiplier

        q, steps = sampler.sample_rate, len(sampler) * config.epochs
        nm = dp.noise_multiplier
        if nm is None:
            nm = get_noise_multiplier(target_epsilon=dp.epsilon, target_delta=dp.delta, sample_rate=q, steps=steps,
                                      accountant=dp.accountant)
        made = engine.make_private(noise_multiplier=nm, **{**common, "poisson_sampling": False})
        model, optimizer = made[0], made[1]
        model.forbid_grad_accumulation()   # one backward pass per optimizer.step(), as under Poisson sampling
        # q * patients: the expected number of patients; under torchrun per rank, as Opacus' distributed optimizer
        # divides each rank's sum by it and the all-reduced sum by the world size (backends.distributed)
        optimizer.expected_batch_size = config.batch_size / getattr(optimizer, "world_size", 1)
        optimizer.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=q))
        return model, optimizer

    def _fit(self, model, optimizer, loader, engine, dp, config, x, y, frame, device, console, quiet):
        """The training loop: Poisson batches split into physical batches under DP, plain batches otherwise."""
        history = []
        x_val, y_val = x[frame["split"].to_numpy() == "val"], y[frame["split"].to_numpy() == "val"]
        steps = 0
        t0 = time.perf_counter()
        with progress_bars(console, quiet) as prog:
            ep_task = prog.add_task("epochs", total=config.epochs, info="")
            for epoch in range(config.epochs):
                model.train()
                st = prog.add_task(f"epoch {epoch + 1}", total=len(loader), info="")
                losses = []
                if isinstance(loader, _PatientLoader):
                    ctx = contextlib.nullcontext(loader)   # whole patients per physical batch, skips signalled
                elif dp.enabled:
                    from opacus.utils.batch_memory_manager import BatchMemoryManager

                    physical = config.physical_batch_size or config.batch_size   # image-level: images
                    ctx = BatchMemoryManager(data_loader=loader, max_physical_batch_size=physical, optimizer=optimizer)
                else:
                    ctx = contextlib.nullcontext(loader)
                from privaudit.backends.fastdp import forward_backward   # each grad-sample mode's backward pass

                with ctx as batches:
                    for batch in batches:
                        xb, yb = batch[0].to(device), batch[1].to(device)
                        units = batch[2] if len(batch) > 2 else None
                        optimizer.zero_grad(set_to_none=True)
                        # The mean per-sample loss, as sum / max(1, n): defined for the empty batches that Poisson
                        # sampling can draw (the step then adds noise only, as the accountant assumes).
                        batch_loss = forward_backward(model, xb, yb, masked_bce, engine=engine, units=units)
                        if batch_loss is not None:
                            losses.append(batch_loss)
                        if units is not None:
                            optimizer.signal_skip_step(do_skip=not batch[3])   # step after a logical batch's last
                        optimizer.step()
                        if dp.enabled and optimizer._is_last_step_skipped:
                            continue
                        steps += 1
                        prog.update(st, advance=1)
                prog.remove_task(st)
                rec = {"epoch": epoch + 1, "steps": steps, "train_loss": float(np.mean(losses)) if losses else None,
                       "seconds": round(time.perf_counter() - t0, 2)}
                if len(x_val):
                    _, vl = _predict(model, x_val, y_val, device)
                    rec["val_loss"] = float(np.mean(vl))
                if engine is not None and dp.noise_multiplier != 0:  # clip-only (no noise) earns no epsilon
                    rec["epsilon"] = float(engine.get_epsilon(dp.delta))
                history.append(rec)
                info = f"loss {rec['train_loss']:.3f}" if rec["train_loss"] is not None else ""
                if "epsilon" in rec:
                    info += f"  ε {rec['epsilon']:.2f}"
                prog.update(ep_task, advance=1, info=info)
        train_seconds = time.perf_counter() - t0

        return history, steps, train_seconds

    def predict_checkpoint(self, checkpoint: Path, manifest: Manifest, *, task: str, arch: str,
                           image_size: int | None = None, trust: bool = False, width: int | None = None,
                           preprocess=None):
        """Predict with weights trained elsewhere: a state_dict, TorchScript when trusted, an ONNX file or the
        weights of a zoo architecture (these two with an optional preprocessing card, see privaudit.byom)."""
        if Path(checkpoint).suffix == ".onnx" or ":" in (arch or ""):
            from privaudit.byom import predict_checkpoint_file

            return predict_checkpoint_file(checkpoint, manifest, task=task, arch=arch, image_size=image_size,
                                           preprocess=preprocess)
        if preprocess is not None:
            raise ConfigError("a preprocessing card (--preprocess) applies to ONNX files and zoo architectures "
                              "(torchvision:, timm:, monai:); privaudit's own architectures use its preprocessing")
        task = create_task(task)
        size = image_size or task.input_size
        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise CheckpointError(f"{checkpoint}: checkpoint not found")
        if _is_torchscript(checkpoint):
            if not trust:
                raise CheckpointError(f"{checkpoint} is a TorchScript file, which contains code; load it only if you "
                                      "trust its source, with --trust-checkpoint")
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated, still loadable
                    model = torch.jit.load(str(checkpoint), map_location="cpu")
            except Exception as e:
                raise CheckpointError(f"{checkpoint}: not a loadable TorchScript file ({type(e).__name__})") from None
            info = {"format": "torchscript", "architecture": "torchscript"}
        else:
            state = load_state_dict(checkpoint)
            stem = state.get("stem.0.weight")
            if stem is None:
                raise CheckpointError(f"{checkpoint}: no 'stem.0.weight' tensor, so this is not a {arch} state_dict; "
                                      "check --arch")
            w = width or int(stem.shape[0])
            n_out = int(state["fc.weight"].shape[0]) if "fc.weight" in state else -1
            if n_out != len(manifest.labels):
                raise CheckpointError(f"{checkpoint}: the model has {n_out} outputs but the data has "
                                      f"{len(manifest.labels)} labels ({', '.join(manifest.labels)}); pick them with --labels")
            model = create_model(arch, in_channels=int(stem.shape[1]), num_classes=n_out, width=w,
                                 spatial_dims=stem.ndim - 2)
            _load_into(model, state, checkpoint)
            info = {"format": "state_dict", "architecture": arch, "width": w}
        device = pick_device("auto")
        model.to(device)
        x, y = self.load_data(manifest, size, task=task, quiet=True)
        try:
            probs, losses = _predict(model, x, y, device)
        except RuntimeError as e:
            raise CheckpointError(f"{checkpoint}: the model fails on {size}x{size} inputs ({str(e).splitlines()[0]}); "
                                  "check --image-size") from None
        if probs.shape[1] != len(manifest.labels):
            raise CheckpointError(f"{checkpoint}: the model has {probs.shape[1]} outputs but the data has "
                                  f"{len(manifest.labels)} labels")
        info.update({"checkpoint": str(checkpoint), "sha256": sha256(checkpoint), "backend": self.name})
        return build_predictions(manifest.frame, manifest.labels, probs, losses), info

