"""The trials on several worker processes: forked on one machine (``--param bench.workers=N``),
or the ranks of a distributed run (``torchrun``, ``accelerate launch``: :func:`share_trials`).

A small model on a CPU spends much of each decoding step in Python and in memory-bound
matrix-vector products, so one process does not keep every core busy: on 2 cores, two
1-thread processes ran the same trials 1.48x faster than one 2-thread process. The workers are
forked after the model is loaded (its weights are shared copy-on-write), pull trial indices
from a queue (2048-token trials cost more than 1024-token ones), and send back each trial's
measurements, which the parent adds to its :class:`~.runner.Runner` in trial order: the
result is the one a single process gives. Timings (``speed``) run afterwards in the parent
alone, with all its threads, so no worker disturbs them.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import traceback
from collections.abc import Sequence
from typing import Any

import torch

from ..distributed import Group
from .measure import Acc
from .runner import Runner
from .trials import Trial

#: seconds between checks that every worker is still alive while waiting for results
_POLL = 5.0


def worker_threads(total: int, workers: int) -> int:
    """Torch threads of each of ``workers`` processes sharing ``total`` threads."""
    return max(1, total // workers)


def _worker(
    r: Runner, trials: Sequence[Trial], checked: set[int], threads: int, todo: Any, out: Any
) -> None:
    torch.set_num_threads(threads)
    r.tick = lambda k: out.put(("tick", k))
    try:
        while (i := todo.get()) is not None:
            r.accs, r.base, r.checks = {}, Acc(), []
            r.trial(trials[i], check=i in checked)
            out.put(("trial", i, (r.accs, r.base, r.checks)))
    except BaseException:
        out.put(("error", traceback.format_exc()))
        raise
    out.put(("done", None))


def run_trials(r: Runner, trials: Sequence[Trial], checked: set[int], workers: int) -> None:
    """Run ``r.trial`` on every trial with ``workers`` forked processes, each with an equal
    share of the parent's torch threads, and merge their measurements into ``r``."""
    threads = worker_threads(torch.get_num_threads(), workers)
    ctx = mp.get_context("fork")  # the loaded model is shared, not pickled
    todo, out = ctx.Queue(), ctx.Queue()
    for i in range(len(trials)):
        todo.put(i)
    for _ in range(workers):
        todo.put(None)
    procs = [
        ctx.Process(target=_worker, args=(r, trials, checked, threads, todo, out), daemon=True)
        for _ in range(workers)
    ]
    for p in procs:
        p.start()
    results: dict[int, tuple[dict, Acc, list]] = {}
    done = 0
    try:
        while done < workers:
            try:
                kind, *payload = out.get(timeout=_POLL)
            except queue.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(
                        f"a bench worker died (exit code {dead[0]}) without a report; "
                        "out of memory? Run with fewer workers"
                    ) from None
                continue
            if kind == "tick":
                r.tick(payload[0])
            elif kind == "trial":
                results[payload[0]] = payload[1]
            elif kind == "error":
                raise RuntimeError(f"a bench worker failed:\n{payload[0]}")
            else:
                done += 1
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join()
    _merge(r, [results[i] for i in sorted(results)])


def _merge(r: Runner, results: Sequence[tuple[dict, Acc, list]]) -> None:
    """Add each trial's measurements to ``r``, in the order given (the trials')."""
    for accs, base, checks in results:
        for key, acc in accs.items():
            r.acc(*key).extend(acc)
        r.base.extend(base)
        r.checks.extend(checks)


def share_trials(r: Runner, trials: Sequence[Trial], checked: set[int], grp: Group) -> None:
    """Run this rank's share of the trials (round robin), then merge every rank's
    measurements into ``r`` in trial order, on every rank: the result one process gives.
    ``r.tick`` also counts the other ranks' steps once they are gathered."""
    tick, steps = r.tick, [0]

    def count(k: int) -> None:
        steps[0] += k
        tick(k)

    r.tick = count
    done: dict[int, tuple[dict, Acc, list]] = {}
    try:
        for i, t in grp.mine(trials):
            r.accs, r.base, r.checks = {}, Acc(), []
            r.trial(t, check=i in checked)
            done[i] = (r.accs, r.base, r.checks)
    finally:
        r.tick = tick
    r.accs, r.base, r.checks = {}, Acc(), []
    _merge(r, list(grp.merge(done).values()))
    tick(sum(grp.gather(steps[0])) - steps[0])
