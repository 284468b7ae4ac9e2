"""How busy *other* processes kept the machine while a measurement ran.

A timing on a shared machine is only as good as the quiet around it. :class:`OtherLoad` reads
the CPU time the whole machine spent busy (``/proc/stat``) and subtracts what this process
used itself (every thread, ``time.process_time``): the remainder, divided by the wall time, is
the number of cores other processes took. 0 is a quiet machine; on 2 cores, 1.0 means another
job had half of it. Where ``/proc/stat`` does not exist (macOS, Windows) the value is ``None``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import TracebackType

__all__ = ["LOADED_CORES", "OtherLoad", "busy_seconds"]

#: other processes above this many cores (on average) make a timing "loaded"
LOADED_CORES = 0.25

_STAT = Path("/proc/stat")


def busy_seconds() -> float | None:
    """CPU seconds all cores have spent busy since boot (``None`` without ``/proc/stat``)."""
    try:
        fields = _STAT.read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """Context manager: ``cores`` is the mean number of cores other processes kept busy.

    >>> with OtherLoad() as load:
    ...     run_timed_work()
    >>> load.cores   # e.g. 0.03 on a quiet machine
    """

    cores: float | None = None

    def __enter__(self) -> OtherLoad:
        self._busy = busy_seconds()
        self._own = time.process_time()
        self._wall = time.perf_counter()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        busy, wall = busy_seconds(), time.perf_counter() - self._wall
        if busy is None or self._busy is None or wall <= 0:
            return
        own = time.process_time() - self._own
        # /proc/stat counts in clock ticks: never report less than nothing
        self.cores = max(0.0, (busy - self._busy - own) / wall)
