"""Throughput benchmarks (``spinelevel bench`` and the scripts in ``benchmarks/``).

Every benchmark measures a baseline in the same process or run and reports the ratio, because the
machines are shared and noisy. Results are JSON with a description of the machine.
"""

from spinelevel.bench.machine import describe_machine

__all__ = ["describe_machine"]
