"""This machine: how much CPU and memory a process uses, and what OpenSSL can do here.

    meter = ProcessMeter(pid)
    ...                                   # the work being measured
    used = meter.cpu_seconds()            # CPU (user + system, all threads) since the meter began
    rss = resident_bytes(pid)
    sign, verify = openssl_ecdsa_p256(seconds=3)
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of every thread of ``pid`` so far (from /proc/<pid>/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) may hold spaces; the fields after it are plain numbers.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / CLOCK_TICKS


def resident_bytes(pid: int) -> int:
    """VmRSS of ``pid`` in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/{pid}/status has no VmRSS line; is the process alive?")


class ProcessMeter:
    """CPU seconds and wall seconds a process spent since the meter was (re)started."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.restart()

    def restart(self) -> None:
        self._cpu = cpu_seconds(self.pid)
        self._wall = time.perf_counter()

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid) - self._cpu

    def wall_seconds(self) -> float:
        return time.perf_counter() - self._wall

    def cores_busy(self) -> float:
        """CPU seconds per wall second: 1.0 is one core kept busy."""
        return self.cpu_seconds() / max(self.wall_seconds(), 1e-9)


def percentile(samples: Sequence[float], fraction: float) -> float:
    """The sample at ``fraction`` (0..1) of the sorted samples (nearest rank)."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    rank = min(len(ordered), max(1, math.ceil(fraction * len(ordered))))
    return ordered[rank - 1]


def openssl_ecdsa_p256(seconds: int) -> tuple[float, float]:
    """(signs, verifies) of ECDSA P-256 per CPU-second, from ``openssl speed`` (which divides
    by the user CPU time its loop took unless given ``-elapsed``)."""
    result = subprocess.run(
        ["openssl", "speed", "-seconds", str(seconds), "ecdsap256"],
        capture_output=True, text=True, check=True, timeout=10 * seconds + 30,
    )
    match = re.search(r"256 bits ecdsa \(nistp256\)\s+\S+\s+\S+\s+([\d.]+)\s+([\d.]+)",
                      result.stdout)
    if match is None:
        raise RuntimeError(f"cannot read openssl speed's output:\n{result.stdout}")
    return float(match.group(1)), float(match.group(2))


def describe() -> dict[str, object]:
    """The machine the numbers come from."""
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.partition(":")[2].strip()
            break
    openssl = subprocess.run(["openssl", "version"], capture_output=True, text=True,
                             check=False).stdout
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "openssl": openssl.strip(),
        "kernel": platform.release(),
    }


@contextlib.contextmanager
def profiled(pid: int, name: str) -> Iterator[None]:
    """With TESSERA_BENCH_PROFILE=DIR set, sample ``pid`` with py-spy while the block runs
    and write DIR/<name>.txt (collapsed stacks; ``py-spy`` from PyPI must be installed)."""
    directory = os.environ.get("TESSERA_BENCH_PROFILE")
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if not directory or spy is None:
        yield
        return
    Path(directory).mkdir(parents=True, exist_ok=True)
    output = Path(directory) / f"{name}.txt"
    recorder = subprocess.Popen(
        [spy, "record", "--pid", str(pid), "--format", "raw", "--rate", "250", "--threads",
         "--output", str(output), "--nonblocking"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)  # let py-spy attach before the measured work starts
    try:
        yield
    finally:
        recorder.send_signal(signal.SIGINT)
        try:
            recorder.wait(timeout=30)
        except subprocess.TimeoutExpired:
            recorder.kill()
            recorder.wait()
