"""How much does watching gradients cost? The hook-overhead benchmark, one module per concern.

models    workloads: a model, one batch, a loss, how gradients are taken
variants  what is timed: gradtrace's modes, floors, references, optional peers
timing    interleaved rounds on two clocks (wall, the stepping thread's CPU time)
memory    peak memory of one steady-state step, after all timing
report    rows, the machine, tables, JSON
goals     the goals in goals.json, checked against a run
suite     one run over every workload; cli: the command line

    python -m benchmarks.hook_overhead --quick
    python benchmarks/hook_overhead.py --json results.json
"""
from .cli import main, parse_args

__all__ = ["main", "parse_args"]
