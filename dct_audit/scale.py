"""Many classes on many workers: each class a Ray task, the run folder on a shared filesystem.

A task is the job-array path for one class (``run_with_options`` with ``shard=K/N``, N = the number of
classes): it writes its class folder with the same atomic files and ``DONE`` markers and merges its record
into the manifest under a file lock. The driver checks everything a serial run checks before any task
starts, shows one progress bar over classes, retries a task whose worker died (``--ray-retries``), and
runs the analysis and the report once every class is done (``finish_run``). So the results do not depend
on how the work was spread (``tests/test_ray.py``: serial, Ray and shards give identical files).
"""

from __future__ import annotations

import dataclasses

from . import rundir
from .errors import DctAuditError
from .options import ANALYSIS_OPTIONS, RunOptions

LOCAL = "local"  # --ray without an address: start a Ray cluster on this machine


def _task(values: dict, k: int, n: int, threads: int) -> list[int]:
    """One class: the K-th of N shards, quietly, without analysis or report (those run on the driver)."""
    import torch

    from .pipeline import run_with_options

    torch.set_num_threads(threads)
    opts = RunOptions(**{**values, "shard": f"{k}/{n}", "quiet": True, "report": False, "ray": None})
    result = run_with_options(opts)
    return [c["index"] for c in result.classes]


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """One line, in seconds, when a ``host:port`` (or ``ray://host:port``) Ray address cannot be reached;
    ``ray.init`` itself retries for minutes. ``auto`` (the cluster this machine belongs to) is left to Ray."""
    from .adapters.hub import probe

    rest = address.removeprefix("ray://")
    host, _, port = rest.rpartition(":")
    if address == "auto" or not host:
        return
    if not port.isdigit():
        raise DctAuditError(f"--ray {address}: the port must be a number (HOST:PORT, e.g. 10.0.0.5:6379)")
    why = probe(host.strip("[]"), int(port), timeout)  # [::1]:6379
    if why:
        raise DctAuditError(
            f"--ray {address}: cannot reach a Ray cluster there ({why}); start one with `ray start --head` "
            "and pass its address, or pass --ray alone for a cluster on this machine"
        )


def run_on_ray(opts: RunOptions, classifier=None, generator=None, tagger=None):
    """``dct-audit run ... --ray [ADDRESS]``: see the module docstring. Returns ``finish_run``'s result."""
    if classifier is not None or generator is not None or tagger is not None:
        raise DctAuditError(
            "--ray audits models named by their flags (workers load them themselves); a model in memory "
            "runs in this process: drop ray="
        )
    if opts.shard:
        raise DctAuditError("--ray and --shard split the classes two ways; use one of them")
    try:
        import ray
    except ImportError:
        raise DctAuditError('--ray needs Ray: pip install "dct-audit[ray]" (or pip install ray)') from None
    from .pipeline import finish_run
    from .plan import plan_run

    # 1. Everything a serial run checks, before a worker starts
    plan = plan_run(opts)
    root, run_dir, targets, say = plan.root, plan.run_dir, plan.targets, plan.say
    if opts.overwrite:  # cleared once here; the tasks then resume into the empty folder
        rundir.create_run_dir(run_dir, overwrite=True)
    todo = [c for c in targets if not run_dir.is_done(c.index, c.name)]
    if len(todo) < len(targets):
        say(f"resuming {root}: {len(targets) - len(todo)} class(es) already finished")
        if not opts.overwrite:
            from .records import check_resume, model_fingerprints
            from .tag import load_vocabulary

            vocabulary = load_vocabulary(opts.attributes) if opts.tagger else None
            check_resume(plan.previous, opts, vocabulary, model_fingerprints(opts), root)

    # 2. One task per class still to do
    if todo:
        started = not ray.is_initialized()
        if started:
            kw = {"address": None if opts.ray == LOCAL else opts.ray, "include_dashboard": False}
            if opts.ray == LOCAL and opts.ray_cpus:
                kw["num_cpus"] = opts.ray_cpus
            if opts.ray != LOCAL:
                check_reachable(opts.ray)
            try:
                ray.init(**kw, log_to_driver=False, ignore_reinit_error=True)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise DctAuditError(
                    f"--ray {opts.ray}: cannot reach a Ray cluster ({e}); check the address"
                ) from None
        try:
            resources = ray.cluster_resources()
            gpus = resources.get("GPU", 0) > 0
            threads = max(1, int(opts.ray_task_cpus))
            if resources.get("CPU", 0) < threads:
                raise DctAuditError(
                    f"--ray-task-cpus {threads} is more than the cluster's {resources.get('CPU', 0):g} CPUs; lower it"
                )
            remote = ray.remote(num_cpus=threads, num_gpus=1 if gpus else 0, max_retries=opts.ray_retries)(
                _task
            )
            values = {
                f.name: getattr(opts, f.name)
                for f in dataclasses.fields(opts)
                if f.name not in ("shard", "overwrite", "quiet", "report", "ray")
            }
            order = sorted(targets, key=lambda c: c.index)
            pending = {remote.remote(values, order.index(c) + 1, len(order), threads): c for c in todo}
            from tqdm.auto import tqdm

            bar = tqdm(total=len(pending), desc="classes (ray)", unit="class", disable=opts.quiet)
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    cls = pending.pop(ref)
                    try:
                        ray.get(ref)
                    except ray.exceptions.RayError as e:
                        cause = getattr(e, "cause", None)
                        if isinstance(cause, DctAuditError):
                            raise DctAuditError(f"class {cls.name} ({cls.index}): {cause}") from None
                        first = (str(cause or e).strip().splitlines() or [type(e).__name__])[-1][:200]
                        raise DctAuditError(
                            f"class {cls.name} ({cls.index}) failed on Ray after {opts.ray_retries} retries ({first}); "
                            "run again to resume, the finished classes are kept"
                        ) from None
                    bar.set_postfix_str(cls.name)
                    bar.update(1)
            bar.close()
        finally:
            if started:
                ray.shutdown()

    # 3. The analysis and the report over every class, once (a folder not shared with the workers shows
    #    here as unfinished classes, named)
    return finish_run(
        root,
        device=opts.device,
        quiet=opts.quiet,
        report=opts.report,
        **{k: getattr(opts, k) for k in ANALYSIS_OPTIONS},  # all of them: --no-association was dropped here
    )
