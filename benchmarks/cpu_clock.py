#!/usr/bin/env python
"""Run a benchmark script with ``time.perf_counter`` replaced by ``time.process_time``.

``python cpu_clock.py SCRIPT [ARGS...]`` runs SCRIPT as ``__main__`` so that every interval it
measures with ``time.perf_counter()`` becomes process CPU seconds instead of wall seconds.
Works unchanged for the TRL anchor and for ``ppo_throughput.py`` (both time with
``perf_counter``). On a shared machine where other jobs make wall time swing 2-3x, CPU time
with ``--threads 1`` is a far steadier measure of the work each implementation does (with more
threads it also counts the time OpenMP threads spend spinning, so use it with one thread).
"""
import os
import runpy
import sys
import time


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit("usage: cpu_clock.py SCRIPT [ARGS...] - runs SCRIPT timing with process CPU time")
    script = sys.argv[1]
    if not os.path.isfile(script):
        raise SystemExit(f"error: script '{script}' does not exist - pass the path of a benchmark script")
    time.perf_counter = time.process_time
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
