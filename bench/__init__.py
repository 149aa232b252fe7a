"""Tessera's benchmarks: each figure printed next to a ceiling measured in the same run.

    make bench                              # every scenario, one table (under five minutes)
    python bench/run.py --quick             # tiny sizes: checks that the benches run
    python bench/run.py --only issuance --json out.json

See docs/performance.md for what each scenario measures and what the numbers mean.
"""
