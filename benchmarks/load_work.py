"""What reading a crafted trace file costs: load + report CPU time, and where the loader stops.

A trace file is untrusted input, and its size in bytes does not bound the work
of reading it. The files here are the shapes that were slow (issue 24, item 2),
beside honest traces for comparison:

  churn-small   1,000 parameters, 100 passes whose coverage changes every pass (~23 KB)
  churn-limit   7,000 parameters x 1,000 such passes: just under gradtrace.storage.MAX_LOAD_WORK
  churn-2k, -5k 2,000 x 100 and 5,000 x 300 such passes (legitimate: an MoE routing anew each step)
  churn         10,000 parameters x 1,000 such passes (~240 KB: 91.5 s to report before the limit)
  brackets      64 MiB of empty arrays, 62 deep inside "params": the document nests 64 deep, the most
                the depth limit lets through to the parser (83 s to reject before the limit)
  cuts          4,000 module-level cuts (compared pairwise to find the outermost)
  long-names    1,000 parameters with names of gradtrace.schema.MAX_TEXT characters
  meta-values   a free-form meta list of 3 million numbers
  healthy-*     every parameter covered in every pass (2,000 params x 20 / x 100 passes)
  fixture       tests/fixtures/trace_d1a6055.json (a real, small trace)

Each file is read in a fresh interpreter (so a slow or huge one can be stopped at
``--timeout`` seconds): ``gradtrace.load`` then ``report()``, CPU process time of
each (``time.process_time``), or the time until ``GradtraceError`` and why. The
goal: every file that loads is reported in under 2 s of CPU; every file refused
is refused in well under that. ``gradtrace.storage.LoadWork`` is the loader's
estimate; the table shows it beside the measurement.

    python benchmarks/load_work.py [--only churn,brackets] [--timeout 120] [--keep DIR]
    PYTHONPATH=/path/to/old/checkout python benchmarks/load_work.py   # the same files, another gradtrace
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "trace_d1a6055.json"


def _record(name: str, order: int = 0) -> dict:
    return {"name": name, "hits": 1, "norm": 1.0, "max_abs": 1.0, "zero": False, "nonfinite": 0,
            "via": "backward", "order": order, "stale": False, "cleared": False}


def _trace(params: List[str], passes: List[dict], **parts) -> dict:
    return {"format": "gradtrace-trace", "version": 1, "params": params, "passes": passes,
            "tensors": [], "scalars": [], "cuts": [], **parts}


def churn(n_params: int, n_passes: int) -> dict:
    """Each pass reaches one parameter, a different one each time: every neighbour pair is a coverage gap."""
    params = [f"m{i}.w" for i in range(n_params)]
    return _trace(params, [{"name": f"p{j}", "runs": 1, "kinds": ["backward"],
                            "records": {params[j % n_params]: {"name": params[j % n_params], "hits": 1,
                                                               "norm": 1.0, "max_abs": 1.0}}}
                           for j in range(n_passes)])


def healthy(n_params: int, n_passes: int) -> dict:
    params = [f"layers.{i // 4}.m{i % 4}.weight" for i in range(n_params)]
    records = {n: _record(n, k) for k, n in enumerate(params)}
    return _trace(params, [{"name": f"step-{j}", "runs": 1, "kinds": ["backward"], "records": records}
                           for j in range(n_passes)])


def cuts(n_cuts: int) -> dict:
    return _trace(["m0.w"], [{"name": "p0", "runs": 1, "kinds": ["backward"], "records": {"m0.w": _record("m0.w")}}],
                  cuts=[{"kind": "no_grad", "module": f"m{i}", "location": "x.py:1", "pass_name": "p0", "params": 1,
                         "seq": i} for i in range(n_cuts)])


def long_names(n_params: int, length: int) -> dict:
    params = [f"{i:06d}." + "x" * (length - 7) for i in range(n_params)]
    return _trace(params, [{"name": "p0", "runs": 1, "kinds": ["backward"],
                            "records": {n: _record(n, k) for k, n in enumerate(params[: n_params // 2])}}])


def meta_values(n: int) -> dict:
    return _trace(["m0.w"], [], meta={"numbers": list(range(n))})


def write_brackets(path: Path, size: int = 64 * 2 ** 20, depth: int = 62) -> None:
    group = b"[" * depth + b"]" * depth
    head, tail = b'{"format": "gradtrace-trace", "version": 1, "params": [', b"]}"
    count = (size - len(head) - len(tail)) // (len(group) + 1)
    with open(path, "wb") as f:
        f.write(head + b",".join([group] * count) + tail)


def max_text() -> int:
    try:
        from gradtrace import schema
        return schema.MAX_TEXT
    except (ImportError, AttributeError):
        return 4096


FILES: Dict[str, Callable[[Path], None]] = {
    "churn-small": lambda p: p.write_text(json.dumps(churn(1000, 100))),
    "churn-limit": lambda p: p.write_text(json.dumps(churn(7000, 1000))),
    "churn-2k": lambda p: p.write_text(json.dumps(churn(2000, 100))),
    "churn-5k": lambda p: p.write_text(json.dumps(churn(5000, 300))),
    "churn": lambda p: p.write_text(json.dumps(churn(10_000, 1000))),
    "brackets": write_brackets,
    "cuts": lambda p: p.write_text(json.dumps(cuts(4000))),
    "long-names": lambda p: p.write_text(json.dumps(long_names(1000, max_text()))),
    "meta-values": lambda p: p.write_text(json.dumps(meta_values(3_000_000))),
    "healthy-20": lambda p: p.write_text(json.dumps(healthy(2000, 20))),
    "healthy-100": lambda p: p.write_text(json.dumps(healthy(2000, 100))),
    "fixture": lambda p: shutil.copy(FIXTURE, p),
}

# Run in a fresh interpreter: prints one JSON line.
_READ = r"""
import json, sys, time
import gradtrace
from gradtrace import storage
path = sys.argv[1]
out = {}
start = time.process_time()
try:
    trace = gradtrace.load(path)
except gradtrace.GradtraceError as e:
    out.update(status="refused", seconds=time.process_time() - start, why=str(e).split(": ", 1)[-1][:160])
else:
    loaded = time.process_time()
    trace.report()
    out.update(status="loaded", load=loaded - start, report=time.process_time() - loaded,
               seconds=time.process_time() - start)
print(json.dumps(out))
"""


def read_in_fresh_process(path: Path, timeout: float) -> dict:
    try:
        proc = subprocess.run([sys.executable, "-c", _READ, str(path)], capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, "PYTHONHASHSEED": "0"})
    except subprocess.TimeoutExpired:
        return {"status": f"> {timeout:.0f} s (stopped)", "seconds": float("inf")}
    if proc.returncode != 0:
        return {"status": "crashed", "seconds": float("nan"), "why": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def estimate(path: Path) -> str:
    """The loader's own estimate (LoadWork), where this gradtrace has one."""
    try:
        from gradtrace import storage
        work = storage.LoadWork(text=path.stat().st_size)
        raw = path.read_bytes()
        skeleton = storage._skeleton(raw)
        work.values = skeleton.count(b",") + skeleton.count(b"[") + skeleton.count(b"{") + 1
        if work.total <= storage.MAX_LOAD_WORK:
            try:
                storage._add_analysis_work(work, storage._contents(json.loads(raw)))
            except Exception:  # noqa: BLE001  (a damaged file: the pre-parse estimate is what counts)
                pass
        return f"{work.total / 1e6:.2f}"
    except (ImportError, AttributeError):
        return "-"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated file names (default: all)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per file before it is stopped")
    parser.add_argument("--keep", metavar="DIR", help="write the files here and keep them")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(FILES)
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="gradtrace-load-work-"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"{'file':<12} {'size':>9} {'estimate s':>10} {'outcome':<22} {'CPU s':>7} {'load':>6} {'report':>7}  why")
    worst = 0.0
    try:
        for name in names:
            path = folder / f"{name}.json"
            FILES[name](path)
            result = read_in_fresh_process(path, args.timeout)
            if result["status"] == "loaded":
                worst = max(worst, result["seconds"])
            print(f"{name:<12} {path.stat().st_size / 2 ** 20:>7.2f}Mi {estimate(path):>10} {result['status']:<22} "
                  f"{result['seconds']:>7.2f} {result.get('load', float('nan')):>6.2f} "
                  f"{result.get('report', float('nan')):>7.2f}  {result.get('why', '')}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    print(f"\nslowest file that loaded: {worst:.2f} s of CPU (goal: < 2 s); "
          f"{time.strftime('%Y-%m-%d %H:%M')}, load average {os.getloadavg()[0]:.1f} (timings are noisy)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
