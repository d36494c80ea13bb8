"""Epsilon sweeps: one model per (epsilon, seed) on the same data and splits, audited as one study.

A sweep directory holds::

    sweep.json                  what was asked (task, training and data options, epsilons, seeds)
    data/                       the synthetic cohort, when no --data was given
    eps=<e>/seed=<s>/           one run directory per run (config.json, model/, train.json, predictions.csv,
                                audit.json), written all-or-nothing
    audit.json, report.html     the study: every run as one model named "eps=<e>/seed=<s>"

``<e>`` is a number (DP-SGD at that target epsilon), ``inf`` (no privacy) or ``clip`` (per-sample clipping and
Poisson sampling with noise multiplier 0: the cost of clipping without the cost of noise; it earns no epsilon).
The runs are independent jobs on an :mod:`executor <privaudit.study.executors>`. A run directory is written only when
its run has finished, so a failed or interrupted sweep resumes by training only the runs that are missing.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

from privaudit._fs import holds_run, output_lock, private_mkdir, read_json, staged_dir, write_json, write_marker
from privaudit.config import AuditConfig, TrainConfig
from privaudit.errors import ConfigError, DataError, OutputExistsError
from privaudit.study.data import LEGACY_LABEL_POLICY, DataSpec, PreparedData, prepare_data
from privaudit.study.dirs import NON_PRIVATE, SWEEP, RunDir, StudyDir
from privaudit.study.runs import _console_of, audit_runs, audit_sweep, say, train_run

SWEEP_FILE = SWEEP
SWEEP_KIND = "privaudit epsilon sweep"
CLIP_ONLY = "clip"


@dataclass(frozen=True)
class SweepPoint:
    """One privacy setting of a sweep: ``label`` names it in run names (``eps=<label>/seed=<s>``)."""

    label: str
    epsilon: float | None   # target epsilon; None for the non-private and clip-only runs
    kind: str               # "dp", "non_private" or "clip_only"


def parse_epsilons(text: str | None) -> list[SweepPoint]:
    """``"1,3,8,inf,clip"`` -> the sweep's points, in the order given. Refuses an empty list, epsilon <= 0, a
    value that is not a number (or ``inf``/``clip``), and repeats."""
    items = [x.strip() for x in (text or "").split(",") if x.strip()]
    if not items:
        raise ConfigError("--epsilons is empty; give a comma-separated list such as 1,3,8,inf (inf: no privacy, "
                          "clip: clipping without noise)")
    points, seen = [], set()
    for item in items:
        low = item.lower()
        if low in ("inf", "infinity", "none"):
            point = SweepPoint(NON_PRIVATE, None, "non_private")
        elif low == CLIP_ONLY:
            point = SweepPoint(CLIP_ONLY, None, "clip_only")
        else:
            try:
                eps = float(item)
            except ValueError:
                raise ConfigError(f"--epsilons: {item!r} is not a number; give positive numbers, inf (no privacy) "
                                  "or clip (clipping without noise)") from None
            if math.isinf(eps) and eps > 0:
                point = SweepPoint(NON_PRIVATE, None, "non_private")
            elif not (eps > 0 and math.isfinite(eps)):
                raise ConfigError(f"--epsilons: epsilon must be above 0, got {item}; epsilon = 0 would need infinite "
                                  "noise (use inf for a non-private run)")
            else:
                point = SweepPoint(f"{eps:g}", eps, "dp")
        if point.label in seen:
            raise ConfigError(f"--epsilons: {item} appears twice; give each epsilon once")
        seen.add(point.label)
        points.append(point)
    return points


def run_name(point: SweepPoint | str, seed: int) -> str:
    label = point.label if isinstance(point, SweepPoint) else point
    return f"eps={label}/seed={seed}"


def point_config(base: TrainConfig, point: SweepPoint, seed: int) -> TrainConfig:
    """The training configuration of one run: the base options with this point's privacy and this seed."""
    if point.kind == "non_private":
        dp = dataclasses.replace(base.dp, enabled=False)
    elif point.kind == "clip_only":
        dp = dataclasses.replace(base.dp, enabled=True, epsilon=None, noise_multiplier=0.0)
    else:
        dp = dataclasses.replace(base.dp, enabled=True, epsilon=point.epsilon, noise_multiplier=None)
    return dataclasses.replace(base, dp=dp, seed=seed)


def _identity(base: TrainConfig, data) -> dict:
    """What every run of a sweep shares, so that a resumed sweep can refuse to mix different settings."""
    train = base.to_dict()
    train.pop("seed")
    dp = train.pop("dp")
    train.update({f"dp.{k}": dp[k] for k in ("delta", "max_grad_norm", "accountant", "poisson_sampling")})
    data = data.with_label_policy()   # the policies the preset applies, defaults written out
    spec = {"path": str(Path(data.path).absolute()) if data.path else None, "preset": data.preset,
            "labels": list(data.labels) if data.labels else None, "views": data.views, "seed": data.seed,
            "controls": str(Path(data.controls).absolute()) if data.controls else None, "label_from": data.label_from,
            **data.label_policies()}
    if data.path is None:
        spec["n_samples"] = data.cohort_size(base.task)
    return {"task": base.task, "train": train, "data": spec}


def _option(key: str) -> str:
    name = key.split(".")[-1]
    return "--data" if name == "path" else "--" + name.replace("_", "-")


def check_sweep_dir(out: Path, base: TrainConfig, data) -> dict | None:
    """The existing sweep at ``out`` (its sweep.json) when it can be resumed with these settings, None when
    ``out`` is new or empty; refuses a directory that holds anything else, or a sweep of other settings."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--out {out} is a file; give a directory for the sweep")
    if not out.is_dir() or not any(out.iterdir()):
        return None
    path = out / SWEEP_FILE
    if not path.is_file():
        what = "a privaudit run or study" if holds_run(out) else "files"
        raise OutputExistsError(f"--out {out} already holds {what} but no {SWEEP_FILE}, so it is not a sweep; choose "
                                "a new directory for the sweep (nothing there was changed)")
    try:
        old = read_json(path)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable ({type(e).__name__}); choose a new --out, or repair the file") from None
    if old.get("kind") != SWEEP_KIND or "identity" not in old:
        raise DataError(f"{path}: not a privaudit sweep file; choose a new --out")
    new = _identity(base, data)
    if old["identity"].get("task") != new["task"]:
        raise ConfigError(f"--out {out} holds a sweep of task {old['identity'].get('task')!r}, not {new['task']!r}; "
                          "choose another --out (its finished runs are kept)")
    for section in ("train", "data"):
        was, now = old["identity"].get(section) or {}, new[section]
        if section == "data" and now.get("uncertain") and not any(k in was for k in LEGACY_LABEL_POLICY):
            was = {**was, **LEGACY_LABEL_POLICY}   # a sweep from before the label policies were recorded
        for key in sorted(set(was) | set(now)):
            if was.get(key) != now.get(key):
                raise ConfigError(f"--out {out} holds a sweep trained with {_option(key)} {was.get(key)}, not "
                                  f"{now.get(key)}; resume it with the same options, or choose another --out "
                                  "(its finished runs are kept)")
    return old


def is_complete(run_dir: Path) -> bool:
    """A run directory that a finished run wrote (the run is not redone on resume)."""
    return RunDir(run_dir).is_complete()


def train_job(spec: dict) -> dict:
    """One run of a sweep (a job: module level, so that a process pool or Ray can run it).

    Reloads the sweep's data from its recorded block (checked against its hash), trains into a staged folder,
    audits the run alone, and only then moves it to its run directory."""
    from privaudit.study.data import reload_data

    t0 = time.perf_counter()
    config: TrainConfig = spec["config"]
    sweep_dir = Path(spec["sweep_dir"])
    data = reload_data(spec["data_info"], sweep_dir, config.task)
    data = PreparedData(data.manifest, data.spec, spec["data_info"])
    run_dir = sweep_dir / spec["name"]
    private_mkdir(run_dir.parent)
    with staged_dir(run_dir, force=True, kind="run") as tmp:  # force: an unfinished run of this sweep is redone
        info = train_run(data, config, tmp, command=spec["command"], root=sweep_dir,
                         sweep={"run": spec["name"], "epsilon": spec["label"]})
        report = audit_runs({spec["name"]: RunDir(tmp)}, config=spec["audit"])
        report.to_json(tmp / "audit.json")
    return {"name": spec["name"], "dp": bool(info.get("dp")), "epsilon": info.get("epsilon"),
            "steps": info.get("steps"), "seconds": round(time.perf_counter() - t0, 2)}


def run_sweep(base: TrainConfig, data: DataSpec, out: Path, *, points: list[SweepPoint], seeds: int,
              executor: str = "local", ray_address: str | None = None, jobs: int | None = None,
              audit: AuditConfig | None = None, command: str | None = None, console=None,
              quiet: bool = True) -> StudyDir:
    """Train every (epsilon, seed) run that ``out`` does not hold yet, then audit all of them as one study
    (``out/audit.json`` with ``out/report.html``)."""
    from privaudit.backends import create_backend
    from privaudit.study.executors import create_executor
    from privaudit.tasks import create_task

    from privaudit.limits import check_limit, check_out_parent

    if not points:
        raise ConfigError("epsilons is empty; give a comma-separated list such as 1,3,8,inf")
    check_limit("epsilons", len(points))   # a sweep trains points x seeds models: absurd counts fail up front
    check_limit("seeds", seeds)
    if seeds < 1:
        raise ConfigError(f"seeds must be at least 1, got {seeds}")
    if jobs is not None:
        check_limit("jobs", jobs)
    check_out_parent(Path(out))
    create_task(base.task)
    create_backend(base.backend)
    audit = audit or AuditConfig(seed=base.seed)
    out = Path(out).absolute()
    old = check_sweep_dir(out, base, data)
    if data.path is not None:
        prepare_data(base.task, data, None)  # bad data fails here, before anything is written
    seed_list = [base.seed + k for k in range(seeds)]
    runs = {run_name(p, s): (p, s) for p in points for s in seed_list}
    todo = [name for name in runs if not is_complete(out / name)]

    out.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(out):  # one sweep at a time on --out (each run also locks its own folder)
        with create_executor(executor, jobs=jobs, address=ray_address, use_gpus=base.device != "cpu") as ex:
            private_mkdir(out)
            write_marker(out, "sweep")
            # sweep.json is the sweep's plan: a resumed sweep may add settings or seeds, so it lists every run asked for
            write_json(out / SWEEP_FILE, {
                "kind": SWEEP_KIND, "identity": _identity(base, data), "epsilons": [p.label for p in points],
                "seeds": seed_list, "runs": list(runs), "base_config": base.to_dict(),
                "created": (old or {}).get("created") or time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": command})
            # one data-preparation path: a synthetic cohort is written once into out/data (kept on resume)
            prepared = prepare_data(base.task, data, out, image_size=base.image_size, console=_console_of(console),
                                    quiet=quiet)
            specs = [{"name": name, "label": runs[name][0].label, "sweep_dir": str(out),
                      "config": point_config(base, *runs[name]), "data_info": prepared.info, "audit": audit,
                      "command": command}
                     for name in todo]
            reused = len(runs) - len(todo)
            say(console, quiet, f"sweep: {len(runs)} runs ({len(points)} epsilon settings x {seeds} seed(s)); "
                                f"{len(todo)} to train on {ex.name} ({ex.slots} at once"
                                f"{f', {ex.gpus} GPU(s)' if ex.gpus else ''}){f', {reused} finished run(s) reused' if reused else ''}")

            def done(i, res):
                eps = f"ε = {res['epsilon']:.2f}" if res["epsilon"] is not None else "no ε"
                say(console, quiet, f"  {res['name']}: {res['steps']} steps, {eps}, {res['seconds']:.0f} s")

            t0 = time.perf_counter()
            ex.run(train_job, specs, labels=todo, on_done=done)
            executor_info = {**ex.describe(), "trained": len(todo), "reused": reused,
                             "train_seconds": round(time.perf_counter() - t0, 2)}
        audit_sweep(out, config=audit, executor_info=executor_info, command=command)
    return StudyDir(out)


def summary_table(doc: dict):
    """A rich table of the study's aggregates: per epsilon setting, the mean and sd over seeds."""
    from rich.table import Table

    from privaudit._console import plain

    def ms(a):
        if not a or a.get("mean") is None:
            return "n/a"
        s = f"{a['mean']:.3f}"
        if a.get("sd") is not None:
            s += f" ± {a['sd']:.3f}"
        if a.get("ci_low") is not None:
            s += f" ({a['ci_low']:.3f} to {a['ci_high']:.3f})"
        return s

    table = Table(title=plain(f"privaudit sweep: {doc['study'].get('task')} (mean ± sd over seeds, 95% bootstrap "
                              "CI of the mean)"))
    for col in ("epsilon setting", "seeds", "ε (accountant)", "macro AUROC"):
        table.add_column(col)
    for label, agg in (doc["study"].get("aggregates") or {}).items():
        eps = agg.get("epsilon") or {}
        eps_text = "∞ (no DP)" if label == NON_PRIVATE else "none (clip only)" if label == CLIP_ONLY else (
            f"{eps['mean']:.2f}" + (f" ± {eps['sd']:.2f}" if eps.get("sd") is not None else "")
            if eps.get("mean") is not None else "n/a")
        table.add_row(plain(label), plain(str(agg.get("n_seeds"))), plain(eps_text), plain(ms(agg.get("macro_auroc"))))
    return table
