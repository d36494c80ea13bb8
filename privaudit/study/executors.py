"""Where many independent jobs run (the runs of an epsilon sweep, the shadow models of LiRA and RMIA).

Two executors sit behind one small interface, :meth:`Executor.run`: ``local``, a pool of spawned processes sized
to the machine (one process per GPU when there are GPUs), and ``ray``, one Ray task per job, on a local Ray
instance (``ray.init()``) or on a cluster (``--ray-address``), with one GPU per task when the cluster has GPUs.
A job is a module-level function applied to one picklable spec; it writes its own output atomically, so a
finished job survives a failure of the others, and the caller resumes by skipping what is already there.

Ray is imported only by the ``ray`` executor.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Callable, Sequence

from privaudit.errors import ConfigError, MissingDependencyError, PrivauditError, unknown_name

RAY_HINT = "pip install 'privaudit[ray]' (or pip install ray)"
PROBE_SECONDS = 5.0  # how long a --ray-address may take to accept a connection


class JobError(PrivauditError):
    """A job died (its worker crashed or was killed); the finished jobs are kept."""


def _cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def local_gpu_count() -> int:
    """CUDA devices visible here (0 without torch or CUDA)."""
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _unwrap(err: BaseException, label: str) -> BaseException:
    """The user's error inside a worker's failure (Ray wraps it), else a one-line JobError for a dead worker."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException):
        err = cause
    if isinstance(err, PrivauditError) or not _is_crash(err):
        return err
    return JobError(f"job {label} died ({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else 'no message'}); "
                    "the finished jobs are kept: run the same command again to resume")


def _is_crash(err: BaseException) -> bool:
    from concurrent.futures.process import BrokenProcessPool

    if isinstance(err, BrokenProcessPool):
        return True
    try:
        from ray.exceptions import NodeDiedError, WorkerCrashedError
    except ImportError:
        return False
    return isinstance(err, (WorkerCrashedError, NodeDiedError))


class Executor:
    """Runs ``fn(spec)`` for each spec; subclasses decide where."""

    name = "executor"
    slots = 1   # jobs that run at once
    gpus = 0    # GPUs the jobs share (0: CPU only)

    def run(self, fn: Callable[[Any], Any], specs: Sequence[Any], *, labels: Sequence[str] | None = None,
            on_done: Callable[[int, Any], None] | None = None) -> list[Any]:
        """Run every job, call ``on_done(index, result)`` as each one finishes, and return the results in order.

        A failing job does not stop the others; once all have ended, the first failure is raised (a
        :class:`~privaudit.errors.PrivauditError` from a job as it is, so the CLI prints its one line).
        """
        raise NotImplementedError

    def describe(self) -> dict:
        return {"executor": self.name, "slots": self.slots, "gpus": self.gpus}

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def _init_worker(threads: int, gpu_ids) -> None:
    """Pool worker start-up, before torch is imported: its share of the CPU threads, and one GPU."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ["MKL_NUM_THREADS"] = str(threads)
    if gpu_ids is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu_ids.get())


class LocalExecutor(Executor):
    """A pool of spawned processes on this machine. ``jobs`` processes (default: one per GPU when there are
    GPUs, else one per CPU core); with one process the jobs run here, one after the other."""

    name = "local"

    def __init__(self, jobs: int | None = None, *, use_gpus: bool = True):
        if jobs is not None and jobs < 1:
            raise ConfigError(f"--jobs must be at least 1, got {jobs}")
        if jobs is not None:
            from privaudit.limits import check_limit

            check_limit("jobs", jobs)
        self.gpus = local_gpu_count() if use_gpus else 0
        self.jobs = jobs or self.gpus or _cpu_count()
        self.slots = self.jobs

    def run(self, fn, specs, *, labels=None, on_done=None):
        labels = list(labels or [str(i) for i in range(len(specs))])
        results: list[Any] = [None] * len(specs)
        workers = min(self.jobs, len(specs))
        failure: BaseException | None = None
        if workers <= 1:
            for i, spec in enumerate(specs):
                try:
                    results[i] = fn(spec)
                except PrivauditError as e:
                    failure = failure or e
                    continue
                if on_done:
                    on_done(i, results[i])
        else:
            failure = self._pool(fn, specs, labels, results, workers, on_done)
        if failure is not None:
            raise failure
        return results

    def _pool(self, fn, specs, labels, results, workers, on_done):
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        ctx = mp.get_context("spawn")  # fork would copy torch's threads and CUDA state into the workers
        gpu_ids = None
        if self.gpus:
            visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
            gpu_ids = ctx.Queue()
            for k in range(workers):  # one GPU per worker, round robin when there are more workers than GPUs
                gpu_ids.put(visible[k % self.gpus] if len(visible) >= self.gpus else k % self.gpus)
        threads = max(1, _cpu_count() // workers)
        failure = None
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                                   initargs=(threads, gpu_ids))
        try:
            futures = {pool.submit(fn, spec): i for i, spec in enumerate(specs)}
            for fut in as_completed(futures):
                i = futures[fut]
                try:
                    results[i] = fut.result()
                except BaseException as e:  # noqa: BLE001 - every failure is collected, the first re-raised
                    failure = failure or _unwrap(e, labels[i])
                    continue
                if on_done:
                    on_done(i, results[i])
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        return failure


def probe_address(address: str, timeout: float = PROBE_SECONDS) -> None:
    """Refuse a Ray address that does not accept a TCP connection (Ray itself would retry for minutes)."""
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"--ray-address {address!r} is not HOST:PORT (or ray://HOST:PORT); give the address of the "
                          "Ray head node, e.g. 10.0.0.5:6379")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise ConfigError(f"--ray-address {address} does not answer ({reason}); start the cluster with 'ray start "
                          "--head' there, check the address, or leave --ray-address out to run Ray on this "
                          "machine") from None


class RayExecutor(Executor):
    """One Ray task per job: on a running Ray (when ``ray.init`` was already called), on the cluster at
    ``address``, or on a Ray instance started here. One GPU per task when the cluster has GPUs."""

    name = "ray"

    def __init__(self, address: str | None = None, *, num_cpus: int | None = None, use_gpus: bool = True,
                 cpus_per_task: float = 1):
        try:
            import ray
        except ImportError:
            raise MissingDependencyError(f"--executor ray needs Ray, which is not installed; install it with: "
                                         f"{RAY_HINT}") from None
        self.address = address
        self._owned = False
        if address and address not in ("auto", "local"):
            probe_address(address)
        if not ray.is_initialized():
            try:
                if address:
                    ray.init(address=address, log_to_driver=False)
                else:
                    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
            except ConnectionError as e:
                raise ConfigError(f"--ray-address {address}: cannot connect to Ray ({str(e).splitlines()[0]}); "
                                  "check that a Ray cluster runs there") from None
            self._owned = True
        resources = ray.cluster_resources()
        self.gpus = int(resources.get("GPU", 0)) if use_gpus else 0
        self.cpus_per_task = cpus_per_task
        self.slots = int(self.gpus or resources.get("CPU", 1) // cpus_per_task) or 1

    def run(self, fn, specs, *, labels=None, on_done=None):
        import ray

        labels = list(labels or [str(i) for i in range(len(specs))])
        remote = ray.remote(fn).options(num_cpus=self.cpus_per_task, num_gpus=1 if self.gpus else 0,
                                        max_retries=0)
        refs = {remote.remote(spec): i for i, spec in enumerate(specs)}
        results: list[Any] = [None] * len(specs)
        failure = None
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                i = refs[done[0]]
                try:
                    results[i] = ray.get(done[0])
                except Exception as e:  # noqa: BLE001 - collected; the first is re-raised once all have ended
                    failure = failure or _unwrap(e, labels[i])
                    continue
                if on_done:
                    on_done(i, results[i])
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        if failure is not None:
            raise failure
        return results

    def describe(self) -> dict:
        return {**super().describe(), "address": self.address or "local"}

    def close(self) -> None:
        if self._owned:
            import ray

            ray.shutdown()
            self._owned = False


# name -> factory(jobs=, address=, use_gpus=); register more with register_executor
_EXECUTORS: dict[str, Callable[..., Executor]] = {}


def register_executor(name: str, factory: Callable[..., Executor]) -> None:
    """Register an executor factory, called as ``factory(jobs=..., address=..., use_gpus=...)``."""
    _EXECUTORS[name] = factory


def _local(*, jobs=None, address=None, use_gpus=True) -> Executor:
    if address:
        raise ConfigError("ray_address needs the ray executor")
    return LocalExecutor(jobs, use_gpus=use_gpus)


def _ray(*, jobs=None, address=None, use_gpus=True) -> Executor:
    if jobs is not None:
        raise ConfigError("jobs sizes the local process pool; with the ray executor the cluster's CPUs and GPUs "
                          "decide how many jobs run at once")
    return RayExecutor(address, use_gpus=use_gpus)


register_executor("local", _local)
register_executor("ray", _ray)


def list_executors() -> list[str]:
    return sorted(_EXECUTORS)


def create_executor(name: str, *, jobs: int | None = None, address: str | None = None,
                    use_gpus: bool = True) -> Executor:
    """``local`` (``jobs`` processes) or ``ray`` (at ``address``, or a Ray started here), or a registered one."""
    try:
        factory = _EXECUTORS[name]
    except KeyError:
        raise unknown_name("executor", name, _EXECUTORS) from None
    return factory(jobs=jobs, address=address, use_gpus=use_gpus)
