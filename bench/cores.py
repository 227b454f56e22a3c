"""Whether a timing had the cores to itself: the machine's busy CPU time (/proc/stat) against this
process's own (getrusage), over the timed span. A timing is "alone" when other processes used under
SHARED_ABOVE of the cores' capacity meanwhile, "shared" otherwise, "unknown" where /proc/stat is missing.

    with cores.Watch() as watch:
        work()
    watch.record()  # {"seconds": ..., "others_share": ..., "cores": "alone" | "shared"}
"""

import os
import resource
import time

SHARED_ABOVE = 0.10  # of the machine's CPU capacity, used by other processes


def _machine_busy_seconds():
    try:
        with open("/proc/stat") as handle:
            fields = [int(value) for value in handle.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle and iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # guest time is already in user time


def _own_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class Watch:
    """Times a span and tells whether other processes shared the cores during it."""

    def __enter__(self):
        self.busy, self.own, self.started = _machine_busy_seconds(), _own_seconds(), time.perf_counter()
        self.seconds = None
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.started
        busy, self.cpu = _machine_busy_seconds(), _own_seconds() - self.own
        self.others = None if busy is None or self.busy is None else max(0.0, (busy - self.busy) - self.cpu)
        return False

    def record(self) -> dict:
        """Wall seconds, this process's CPU seconds over them, and whether other processes shared the cores."""
        if self.others is None:
            return {"seconds": round(self.seconds, 1), "cpu_seconds": round(self.cpu, 1), "others_share": None,
                    "cores": "unknown"}
        share = self.others / (self.seconds * (os.cpu_count() or 1)) if self.seconds > 0 else 0.0
        return {"seconds": round(self.seconds, 1), "cpu_seconds": round(self.cpu, 1), "others_share": round(share, 3),
                "cores": "shared" if share > SHARED_ABOVE else "alone"}
