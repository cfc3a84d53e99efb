"""A smoke run of the transport benchmark, so that benchmarks/rpc_bench.py keeps working as the library changes.

It runs the harness in quick mode on NATS only, without peers, memory or scale runs, and checks the
shape of the JSON it writes. It measures nothing: speed is judged by the benchmark, never by tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HARNESS = ROOT / "benchmarks" / "rpc_bench.py"
FEATURE_FLOOR = ROOT / "benchmarks" / "nats_feature_floor.py"
INSTRUCTION_COUNT = ROOT / "benchmarks" / "count_instructions.py"


@pytest.mark.timeout(180)
def test_quick_run_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    command = [sys.executable, str(HARNESS), "--quick", "--transports", "nats", "--no-peers"]
    command += ["--memory-transports", "", "--scale-transports", "", "--no-plot", "--out", str(out)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=170, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr[-3000:]

    result = json.loads(out.read_text())
    assert set(result["cases"]) == {"pikku-nats", "raw-nats", "raw-nats-2conn", "pikku-nats-secret"}
    row = result["cases"]["pikku-nats"]["100"]
    for metric in ("seq_p50_us", "seq_p99_us", "calls_per_s_1", "calls_per_s_64", "client_cpu_us_64"):
        assert row[metric]["n"] == 1, metric
        assert row[metric]["median"] > 0, metric
    assert row["discovery_lookups"] >= 0
    assert row["measured_calls"] > 0

    versus = {(r["pikku"], r["versus"]) for r in result["ratios"]}
    assert ("pikku-nats", "raw-nats") in versus
    assert ("pikku-nats", "raw-nats-2conn") in versus
    assert ("pikku-nats-secret", "pikku-nats") in versus
    assert any(t["target"].startswith("nats 100 B: calls/s @64") for t in result["targets"])
    assert result["environment"]["libraries"]["nats-py"] != "not installed"
    assert "| pikku-nats | 100 B |" in completed.stdout


@pytest.mark.timeout(180)
def test_quick_run_without_matplotlib(tmp_path: Path) -> None:
    # Without the bench extra there is no matplotlib: the run leaves the plot out and still reports.
    out = tmp_path / "result.json"
    arguments = ["--quick", "--transports", "nats", "--no-peers", "--memory-transports", "", "--scale-transports", ""]
    arguments += ["--out", str(out)]
    hide_matplotlib = (
        "import runpy, sys; sys.modules['matplotlib'] = None; "
        f"sys.argv = [{str(HARNESS)!r}, *{arguments!r}]; runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    completed = subprocess.run(
        [sys.executable, "-c", hide_matplotlib], capture_output=True, text=True, timeout=170, cwd=ROOT / "benchmarks"
    )

    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "leaving out the plot: matplotlib not installed" in completed.stderr
    assert json.loads(out.read_text())["cases"]
    assert not out.with_suffix(".png").exists()
    assert "| pikku-nats | 100 B |" in completed.stdout


@pytest.mark.timeout(120)
def test_feature_floor_quick_run() -> None:
    command = [sys.executable, str(FEATURE_FLOOR), "--rounds", "1", "--quick"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=110, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr[-3000:]

    rows = [line for line in completed.stdout.splitlines() if line.startswith("| ") and "calls/s" not in line]
    names = [row.split(" | ")[0].removeprefix("| ") for row in rows]
    assert names == ["raw-nats", "features-nats", "features-nats, pikku_mq client", "pikku-nats"]
    assert "| 1.00 (1.00-1.00) |" in rows[0]
    for row in rows:
        calls_per_s = float(row.split(" | ")[1].split(" ")[0].replace(",", ""))
        assert calls_per_s > 0, row


@pytest.mark.timeout(240)
def test_instruction_count_run() -> None:
    # valgrind is a Debian package of every machine this project's CI runs on.
    counts = _instruction_counts([], timeout=230)
    assert list(counts) == ["worker", "dispatcher", "required", "caller", "http-app"]
    # Each part runs the benchmark's echo call, which takes thousands of instructions. A part whose
    # measured loop did not run would count almost none.
    for part, count in counts.items():
        assert 10_000 < count < 10_000_000, (part, count)
    assert counts["worker"] > counts["dispatcher"] > counts["required"]
    assert counts["http-app"] > counts["dispatcher"]


@pytest.mark.timeout(120)
def test_instruction_count_of_raw_floor() -> None:
    one_at_a_time = ["--batch", "1", "--in-flight", "1"]
    counts = _instruction_counts(["--parts", "raw-worker", "raw-caller", *one_at_a_time], timeout=110)
    assert list(counts) == ["raw-worker", "raw-caller"]
    for part, count in counts.items():
        assert 10_000 < count < 10_000_000, (part, count)


@pytest.mark.timeout(300)
def test_instruction_count_of_http_calls() -> None:
    parts = ["http-caller", "raw-http-caller", "http-server", "raw-http-server"]
    counts = _instruction_counts(["--parts", *parts], timeout=290)
    assert list(counts) == parts
    for part, count in counts.items():
        assert 10_000 < count < 10_000_000, (part, count)
    # pikku_mq's caller and worker do what the raw floor does, and more.
    assert counts["http-caller"] > counts["raw-http-caller"]
    assert counts["http-server"] > counts["raw-http-server"]


def _instruction_counts(options: list[str], timeout: float) -> dict[str, int]:
    """Run count_instructions.py with 128 calls per part and return its count per part."""
    command = [sys.executable, str(INSTRUCTION_COUNT), "--calls", "128", *options]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr[-3000:]
    counts = {}
    for line in completed.stdout.splitlines()[2:]:
        part, count = line.strip("| ").split(" | ")
        counts[part] = int(count.replace(",", ""))
    return counts
