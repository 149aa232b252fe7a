"""Run Tessera's benchmarks and print one table; each figure sits next to a ceiling
measured in the same run on the same machine.

    python bench/run.py                       # everything (about seven minutes on 2 cores)
    python bench/run.py --quick               # tiny sizes: does every bench still run?
    python bench/run.py --only issuance --only handshakes --json results.json

Exit status: 0 when every scenario ran (a missed target is reported, not an
error), 1 when a scenario failed.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import (
    agent_footprint,
    console,
    envoy_pair,
    handshakes,
    issuance,
    machine,
    mesh_traffic,
    mtls_proxy,
    propagation,
    startup,
    workload_api,
)
from bench.report import Figure, Outcome, Skipped, render_table, write_json

SCENARIOS: dict[str, ModuleType] = {
    module.NAME: module
    for module in (issuance, workload_api, agent_footprint, propagation, mesh_traffic, mtls_proxy,
                   envoy_pair,
                   handshakes, startup, console)
}


def run_scenario(name: str, quick: bool) -> Outcome:
    scenario: Callable[[bool], list[Figure]] = SCENARIOS[name].run
    outcome = Outcome(name)
    began = time.monotonic()
    print(f"-- {name} ...", file=sys.stderr, flush=True)
    try:
        outcome.figures = scenario(quick)
    except Skipped as skipped:
        outcome.skipped = str(skipped)
        print(f"   {name}: skipped: {skipped}", file=sys.stderr)
    except Exception as err:
        first_line = str(err).splitlines()[0] if str(err) else ""
        outcome.failed = f"{type(err).__name__}: {first_line}"
        traceback.print_exc()
    outcome.seconds = time.monotonic() - began
    print(f"   {name} took {outcome.seconds:.1f}s", file=sys.stderr, flush=True)
    return outcome


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    parser.add_argument("--only", action="append", choices=sorted(SCENARIOS), metavar="NAME",
                        help=f"run only this scenario (repeatable): {', '.join(SCENARIOS)}")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results here")
    args = parser.parse_args(argv)
    # 1,000 Workload API clients and the agent serving them need descriptors.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    names = args.only or list(SCENARIOS)
    began = time.monotonic()
    outcomes = [run_scenario(name, args.quick) for name in names]
    about = machine.describe()
    print()
    print(f"Tessera benchmarks{' (--quick: tiny sizes, not figures)' if args.quick else ''}: "
          f"{about['cpus']} CPUs ({about['cpu_model']}), Python {about['python']}, "
          f"{about['openssl']}; {time.monotonic() - began:.0f}s")
    print(render_table(outcomes))
    if args.json is not None:
        write_json(outcomes, args.json, about)
    return 1 if any(o.failed for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
