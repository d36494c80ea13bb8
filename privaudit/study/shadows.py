"""Shadow and reference models for LiRA and RMIA: independent training jobs through the backend registry.

Each shadow model is one job described by a small JSON spec (``shadows/shadow_<k>/spec.json``: its seed, its
inclusion mask over the pool, and the run's training configuration). A finished job leaves ``stats.csv`` (one
row per pool sample: ``in``, the logit-scaled confidence and the true-label probability) and nothing else, so
an interrupted attack resumes with the shadows it already has. The pool is every sample of the run's data,
reloaded through the run's recorded data block (and checked against its manifest hash); inclusion is drawn per
patient, so a patient's images are in or out together. The scoring is the attack registry's
(:mod:`privaudit.audit.attacks`).

``attack_scores.csv`` holds, per attack, the per-image scores (column ``lira``, ``rmia``, ...) and, when some
patient has several images, the per-patient scores (column ``lira@patient``, ...: each image holds its patient's
score, from the patient means of the statistic in the target and in every shadow). The audit reads the column of
the run's unit (:func:`privaudit.audit.privacy.attack_unit`).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from privaudit._fs import atomic_write_csv, output_lock, private_mkdir, read_json, write_json
from privaudit.config import TrainConfig
from privaudit.errors import ConfigError, DataError
from privaudit.study.dirs import ATTACK_SCORES, SHADOWS, RunDir


def _load_run(run_dir: Path):
    run = RunDir(run_dir)
    preds = run.predictions()
    cfg = run.config()
    run.train_info()
    if "loss" not in preds.columns or preds["loss"].isna().any():
        raise DataError(f"{run.file('predictions.csv')}: no per-sample 'loss' for every sample; attacks need the "
                        "run's own per-sample statistics")
    if "member" not in preds.columns or not ((preds["member"] == 1).any() and (preds["member"] == 0).any()):
        raise DataError(f"{run.file('predictions.csv')}: the attack needs both members and non-members")
    if "train" not in cfg:
        raise DataError(f"{run_dir}: config.json has no training configuration; was this run trained by privaudit?")
    return preds, cfg


def _train_shadow(spec_path: str) -> str:
    """One shadow job (module level, so that a process pool can run it)."""
    import torch

    from privaudit.audit.privacy import logit_confidence, true_label_probability
    from privaudit.backends import create_backend
    from privaudit.predictions import read_predictions
    from privaudit.study.data import reload_data

    spec_path = Path(spec_path)
    spec = read_json(spec_path)
    threads = spec.get("threads")
    if threads:
        torch.set_num_threads(threads)
    config = TrainConfig.from_dict(spec["config"])
    # exactly the run's data: its preset and every loader option, checked against the recorded manifest hash
    manifest = reload_data(spec["data"], Path(spec["run_dir"]), config.task).manifest
    frame = manifest.frame.copy()
    inside = set(spec["included"])
    frame["split"] = np.where(frame["sample_id"].isin(inside), "train", "test")
    shadow_manifest = dataclasses.replace(manifest, frame=frame)
    with tempfile.TemporaryDirectory(dir=spec_path.parent) as tmp:
        create_backend(config.backend).train(shadow_manifest, config, Path(tmp) / "run", quiet=True)
        preds = read_predictions(Path(tmp) / "run" / "predictions.csv")
    stats = pd.DataFrame({"sample_id": preds["sample_id"], "in": preds["sample_id"].isin(inside).astype(int),
                          "logit_confidence": logit_confidence(preds, manifest.labels),
                          "true_prob": true_label_probability(preds, manifest.labels)})
    atomic_write_csv(spec_path.with_name("stats.csv"), stats, index=False)  # its presence marks the job done
    return str(spec_path.parent)


def train_shadows(run_dir: Path, k: int, *, jobs: int | None = None, executor: str = "local",
                  ray_address: str | None = None, seed: int = 0, console=None, quiet: bool = False) -> list[Path]:
    """Make sure ``k`` shadow models exist for the run (training only the missing ones); return their folders.

    The missing ones are independent jobs on an executor (:mod:`privaudit.study.executors`): ``local`` runs ``jobs``
    processes (default: one per GPU, else one per core), ``ray`` one Ray task per shadow model."""
    from rich.progress import Progress

    from privaudit.study.executors import create_executor

    if k < 1:
        raise ConfigError(f"--shadows/--references must be at least 1, got {k}")
    if jobs is not None and jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    run_dir = Path(run_dir)
    preds, cfg = _load_run(run_dir)
    config = dataclasses.replace(TrainConfig.from_dict(cfg["train"]), canaries=0)
    init = (read_json(run_dir / "train.json").get("init") or {}).get("path")
    if init:  # shadows start where the target started; a study records the path relative to itself
        places = [Path(init)] if Path(init).is_absolute() else [run_dir / init, run_dir.parent / init]
        found = [p for p in places if p.is_file()]
        if not found:
            raise DataError(f"{run_dir}: the run started from weights at {init}, which are gone; shadow models "
                            "must start from the same weights")
        config = dataclasses.replace(config, init=str(found[0].absolute()))
    patients = np.array(sorted(preds["patient_id"].astype(str).unique())) if "patient_id" in preds else None
    root = private_mkdir(run_dir / SHADOWS)
    todo, folders = [], []
    for i in range(k):
        folder = private_mkdir(root / f"shadow_{i}")
        folders.append(folder)
        if (folder / "stats.csv").is_file():
            continue
        rng = np.random.default_rng([seed, i])
        if patients is not None:
            chosen = set(patients[rng.random(len(patients)) < 0.5])
            included = preds.loc[preds["patient_id"].astype(str).isin(chosen), "sample_id"].tolist()
        else:
            included = preds.loc[rng.random(len(preds)) < 0.5, "sample_id"].tolist()
        spec = {"index": i, "seed": config.seed + 1 + i, "run_dir": str(run_dir.absolute()), "data": cfg["data"],
                "labels": [c[2:] for c in preds.columns if c.startswith("p_")], "included": included,
                "config": dataclasses.replace(config, seed=config.seed + 1 + i).to_dict()}
        todo.append((folder, spec))
    if not quiet and console is not None and len(todo) < k:
        console.print(f"reusing {k - len(todo)} finished shadow model(s)")
    if not todo:
        return folders
    with create_executor(executor, jobs=jobs, address=ray_address,
                         use_gpus=config.device != "cpu") as ex:
        for folder, spec in todo:  # the threads share out the machine between the jobs that run at once
            spec["threads"] = None if ex.name == "ray" else max(1, (os.cpu_count() or 1) // min(ex.slots, len(todo)))
            write_json(folder / "spec.json", spec)
        with Progress(console=console, disable=quiet) as prog:
            task = prog.add_task(f"shadow models ({ex.name}, {ex.slots} at once)", total=k, completed=k - len(todo))
            ex.run(_train_shadow, [str(folder / "spec.json") for folder, _ in todo],
                   labels=[folder.name for folder, _ in todo], on_done=lambda i, _: prog.advance(task))
    return folders


def score_attack(run_dir: Path, attack: str, folders: list[Path], *, offline: bool = False) -> pd.DataFrame:
    """Scores of ``attack`` (a registered attack) for the run's target model, from the shadow statistics: one
    column per image, and one per patient (suffix ``@patient``) when some patient has several images."""
    from privaudit.audit.attacks import create_attack
    from privaudit.audit.privacy import PATIENT_SUFFIX, several_images
    from privaudit.predictions import labels_of

    preds, _ = _load_run(run_dir)
    ids = preds["sample_id"].astype(str)
    stats = [pd.read_csv(f / "stats.csv", dtype={"sample_id": str}).set_index("sample_id").reindex(ids)
             for f in folders]
    scorer = create_attack(attack, **({"offline": offline} if attack == "lira" else {}))
    labels = labels_of(preds)
    out = {"sample_id": ids, **scorer.score(preds, labels, stats)}
    if several_images(preds):
        per_patient = scorer.score(preds, labels, stats, units=preds["patient_id"].astype(str).to_numpy())
        out.update({f"{k}{PATIENT_SUFFIX}": v for k, v in per_patient.items()})
    return pd.DataFrame(out)


def run_attack(run_dir: Path, attack: str, k: int, *, offline: bool = False, jobs: int | None = None,
               executor: str = "local", ray_address: str | None = None, seed: int = 0, audit_config=None,
               command: str | None = None, console=None, quiet: bool = True):
    """Train (or reuse) shadow models, score the attack, and re-audit the run with it. Returns the audit."""
    from privaudit.audit.attacks import create_attack, list_attacks
    from privaudit.config import AuditConfig
    from privaudit.study.runs import audit_dir

    from privaudit.limits import check_limit

    kind = create_attack(attack, **({"offline": offline} if attack == "lira" else {})).models
    if kind is None:
        raise ConfigError(f"attack {attack!r} needs no shadow models: every audit already runs it; the attacks "
                          f"that train models are: {', '.join(list_attacks(trained=True))}")
    # "shadows" or "references" (another registered attack's kind counts as shadows): refused before any training
    check_limit(kind, k, **({} if kind in ("shadows", "references") else {"const": "MAX_SHADOWS"}))
    if jobs is not None:
        check_limit("jobs", jobs)
    run_dir = Path(run_dir)
    with output_lock(run_dir):  # shadows/ and attack_scores.csv: one writer at a time
        folders = train_shadows(run_dir, k, jobs=jobs, executor=executor, ray_address=ray_address, seed=seed,
                                console=console, quiet=quiet)
        scores = score_attack(run_dir, attack, folders, offline=offline)
        path = run_dir / ATTACK_SCORES
        if path.is_file():  # keep the other attacks' scores
            old = pd.read_csv(path, dtype={"sample_id": str})
            scores = old.drop(columns=[c for c in scores.columns if c != "sample_id" and c in old.columns]).merge(
                scores, on="sample_id", how="outer")
        atomic_write_csv(path, scores, index=False)
    return audit_dir(run_dir, config=audit_config or AuditConfig(), command=command)
