"""``wrk`` (Debian's package) as the load generator, with the CPU the measured processes spent.

    load = run_wrk("http://127.0.0.1:8080/", connections=32, seconds=6, pids=[proxy_pid])
    load.per_cpu_second      # requests completed per CPU-second of the measured processes
    load.p50, load.p99       # seconds

A run with any non-2xx answer or socket error raises: a rate of refusals is no rate.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.machine import ProcessMeter

_SCALE = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


@dataclass(frozen=True)
class WrkLoad:
    requests: int
    """Requests wrk completed (answers it read) in the measured run."""
    wall: float
    """Wall seconds of the run, as wrk reports them."""
    cpu: float
    """CPU seconds (user + system, all threads) the measured processes spent meanwhile."""
    p50: float
    p99: float

    @property
    def per_cpu_second(self) -> float:
        return self.requests / max(self.cpu, 1e-9)

    @property
    def per_wall_second(self) -> float:
        return self.requests / self.wall


def available() -> bool:
    return shutil.which("wrk") is not None


def run_wrk(url: str, *, connections: int, seconds: int, pids: Sequence[int],
            script: Path | None = None, warm_up: bool = False) -> WrkLoad:
    """``wrk -t1 -c<connections> -d<seconds>s --latency`` against ``url``; the CPU of ``pids``
    (read from /proc) is metered over the same run."""
    args = ["wrk", "-t1"]
    if script is not None:
        args += ["-s", str(script)]
    if warm_up:
        subprocess.run([*args, f"-c{min(connections, 2)}", "-d1s", url], capture_output=True,
                       check=True, timeout=60)
    meters = [ProcessMeter(pid) for pid in pids]
    result = subprocess.run(
        [*args, f"-c{connections}", f"-d{seconds}s", "--latency", url],
        capture_output=True, text=True, check=True, timeout=seconds + 60,
    )
    cpu = sum(meter.cpu_seconds() for meter in meters)
    return parse_wrk(result.stdout, cpu)


def parse_wrk(output: str, cpu: float) -> WrkLoad:
    done = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)\b", output)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", output)
    if done is None or errors is not None or int(done.group(1)) == 0:
        raise RuntimeError(f"wrk failed:\n{output}")
    return WrkLoad(requests=int(done.group(1)),
                   wall=float(done.group(2)) * _SCALE[done.group(3)], cpu=cpu,
                   p50=wrk_latency(output, "50%"), p99=wrk_latency(output, "99%"))


def wrk_latency(output: str, percentile: str) -> float:
    """A latency percentile of ``wrk --latency``'s output, in seconds."""
    match = re.search(rf"^\s+{percentile}\s+([\d.]+)(us|ms|s|m)\s*$", output, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no {percentile} latency in wrk's output:\n{output}")
    return float(match.group(1)) * _SCALE[match.group(2)]
