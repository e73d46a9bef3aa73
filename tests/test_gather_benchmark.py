"""benchmarks/gather.py runs end to end on two gloo ranks and reports sane rows (no timing assertions)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # real subprocesses
WIDTH = 4  # gradtrace.distributed.WIDTH: float64 figures per parameter and pass
DIGESTS = 3  # gradtrace.distributed.DIGESTS: SHA-256 digests per rank in the handshake


def test_gather_benchmark_rows(tmp_path):
    out = tmp_path / "rows.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gather.py"), "--ranks", "2", "--params", "50",
                    "--passes", "1,3", "--repeats", "1", "--steps", "4", "--timeout", "300", "--json", str(out)],
                   check=True, cwd=ROOT, timeout=400, capture_output=True)
    rows = json.loads(out.read_text())
    gathers = {(r["passes"], r["figures"]): r for r in rows if "gather_ms" in r}
    assert set(gathers) == {(p, f) for p in (1, 3) for f in ("differ", "identical")}
    for (passes, figures), r in gathers.items():
        assert math.isfinite(r["gather_ms"]) and r["gather_ms"] > 0 and r["old_ms"] > 0
        full = 2 * passes * 50 * WIDTH * 8
        assert r["bytes_received"] == 2 * DIGESTS * 32 + (0 if figures == "identical" else full)
        assert r["old_bytes_received"] > r["bytes_received"]
    (step,) = [r for r in rows if "ddp_step_ms" in r]
    assert step["ddp_step_ms"] > 0 and step["watched_step_ms"] > 0
