"""Every run's figures as a JSON file, and PNG charts of them (matplotlib).

    python -m bench.charts                 # redraw the charts from bench/results/runs/
    python -m bench.charts --runs DIR --out DIR

``bench.run`` calls :func:`record` at the end of each run: the report (the same as
``<mode>-<loop>.json``) plus the machine's description (CPU model, cores, Python, kernel, the
commit and whether the tree had uncommitted changes) goes to ``bench/results/runs/`` as one file
per run, and the charts are redrawn from all of them:

- ``throughput.png``: calls/s per scenario and stack in the latest run, each bar labelled with
  its ratio to the echo server measured just before that stack (the figure to compare across
  runs; the machine is shared and drifts, absolute calls/s do not compare);
- ``latency.png``: p50 and p99 per scenario and stack in the latest run (client side, log scale);
- ``history.png``: the ratio to echo of the headline scenarios over every run of the same mode,
  one line per scenario and stack (dashed: in-process cache), the x axis the runs in time order
  labelled by commit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "bench" / "results" / "runs"
CHARTS = ROOT / "bench" / "results" / "charts"

#: Scenarios drawn in the history chart (the start of their name), when a run has them.
HEADLINE = (
    "GetReferralCodeByEmail, cache hit",
    "GET /v1/referral-codes/by-email/{email} (HTTP/JSON), cache hit",
    "Login",
    "GetReferralCodeByEmail while logins saturate",
    "mixed",
    "RecordConversion",
)


# --- the machine and the run file ---------------------------------------------------------------


def _git(*args: str) -> str:
    try:
        done = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """What the figures were measured on (no host names: the files are committed)."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = []
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "system": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "commit": _git("rev-parse", "HEAD"),
        "commit_subject": _git("log", "-1", "--format=%s")[:120],
        "uncommitted_changes": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "load_average_at_end": load,
    }


def record(report: dict[str, Any], runs: Path = RUNS, charts: Path | None = CHARTS) -> Path:
    """Write ``report`` with the machine's description as a new file under ``runs`` and redraw
    the charts into ``charts`` (None: no charts). Returns the run file."""
    report = {**report, "machine": machine()}
    meta = report["meta"]
    stamp = re.sub(r"[^0-9T]", "", meta["time"].split("+")[0]) + "Z"
    commit = (report["machine"]["commit"] or "nocommit")[:10]
    runs.mkdir(parents=True, exist_ok=True)
    path = runs / f"{stamp}-{meta['mode']}-{meta['event_loop']}-{commit}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    if charts is not None:
        draw(runs, charts)
    return path


def load_runs(runs: Path = RUNS) -> list[dict[str, Any]]:
    """Every run file, oldest first."""
    found = []
    for path in sorted(runs.glob("*.json")):
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if "meta" in report and "results" in report:
            report["_file"] = path.name
            found.append(report)
    found.sort(key=lambda r: r["meta"]["time"])
    return found


# --- charts -------------------------------------------------------------------------------------


def _label(result: dict[str, Any]) -> str:
    return f"{result['scenario']}  [{result['stack']}]"


def _rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The latest run's results, echo rows first, then per stack in run order."""
    return [r for r in report["results"] if r.get("rps", 0) == r.get("rps", 0)]  # NaN left out


def _title(report: dict[str, Any]) -> str:
    meta, box = report["meta"], report.get("machine", {})
    commit = (box.get("commit") or "?")[:10]
    dirty = "+changes" if box.get("uncommitted_changes") else ""
    return (
        f"{meta['mode']} run {meta['time']}, commit {commit}{dirty}\n"
        f"{box.get('cpu_model', '?')}, {meta['cores']} cores (shared), Python {meta['python']}, "
        f"{meta['event_loop']}, {meta['duration_s']:g}s per scenario"
    )


def draw(runs: Path = RUNS, out: Path = CHARTS) -> list[Path]:
    """Draw the three charts from the run files; returns the PNGs written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reports = load_runs(runs)
    if not reports:
        return []
    out.mkdir(parents=True, exist_ok=True)
    latest = reports[-1]
    rows = _rows(latest)
    written = []

    # Throughput, latest run.
    height = 0.32 * len(rows) + 1.6
    fig, ax = plt.subplots(figsize=(12, height))
    labels = [_label(r) for r in rows]
    values = [r["rps"] for r in rows]
    colours = ["#999999" if "echo" in r["scenario"] else "#3b75af" for r in rows]
    bars = ax.barh(range(len(rows)), values, color=colours)
    for bar, r in zip(bars, rows, strict=True):
        ratio = r.get("ratios", {}).get("rps_vs_echo")
        text = f" {r['rps']:,.0f}/s" + (f"  ({ratio:.2f}x echo)" if ratio is not None else "")
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, text, va="center", fontsize=7)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("calls/s (client side); grey: the echo server measured before each stack")
    ax.set_xlim(0, max(values) * 1.35)
    ax.set_title(_title(latest), fontsize=9)
    fig.tight_layout()
    path = out / "throughput.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)

    # Latency, latest run.
    fig, ax = plt.subplots(figsize=(12, height))
    positions = range(len(rows))
    p50 = [max(r["p50_ms"], 1e-3) for r in rows]
    p99 = [max(r["p99_ms"], 1e-3) for r in rows]
    ax.barh([p - 0.2 for p in positions], p50, height=0.4, label="p50", color="#3b75af")
    ax.barh([p + 0.2 for p in positions], p99, height=0.4, label="p99", color="#e1812c")
    for p, a, b in zip(positions, p50, p99, strict=True):
        ax.text(b, p + 0.2, f" {b:.1f}", va="center", fontsize=6)
        ax.text(a, p - 0.2, f" {a:.1f}", va="center", fontsize=6)
    ax.set_xscale("log")
    ax.set_yticks(list(positions), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(
        "ms per call, client side (log scale; closed loop: each scenario's concurrency is in bench/README.md)"
    )
    ax.legend(loc="lower right")
    ax.set_title(_title(latest), fontsize=9)
    fig.tight_layout()
    path = out / "latency.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)

    # History: ratio to echo of the headline scenarios over the runs of the latest's mode.
    same_mode = [r for r in reports if r["meta"]["mode"] == latest["meta"]["mode"]]
    series: dict[str, dict[int, float]] = {}
    for index, report in enumerate(same_mode):
        for r in report["results"]:
            if "worker(s)" in r["scenario"] or not r["scenario"].startswith(HEADLINE):
                continue
            ratio = r.get("ratios", {}).get("rps_vs_echo")
            if ratio is not None:
                series.setdefault(_label(r), {})[index] = ratio
    fig, ax = plt.subplots(figsize=(12, 6))
    colours = plt.get_cmap("tab20").colors
    for number, (name, points) in enumerate(sorted(series.items())):
        xs = sorted(points)
        style = "--" if "memory]" in name else "-"  # in-process cache dashed, Redis solid
        ax.plot(
            xs, [points[x] for x in xs], marker="o", linestyle=style, color=colours[number % 20], label=name
        )
    ticks = [
        f"{(r.get('machine', {}).get('commit') or '?')[:7]}\n{r['meta']['time'][5:16].replace('T', ' ')}"
        for r in same_mode
    ]
    ax.set_xticks(range(len(same_mode)), ticks, fontsize=7)
    ax.set_ylabel("calls/s as a ratio to the echo server (same run)")
    ax.set_xlim(-0.5, max(len(same_mode) - 0.5, 0.5))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(f"History of {latest['meta']['mode']} runs ({len(same_mode)}), ratio to echo", fontsize=9)
    fig.tight_layout()
    path = out / "history.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=Path, default=RUNS)
    parser.add_argument("--out", type=Path, default=CHARTS)
    args = parser.parse_args()
    for path in draw(args.runs, args.out):
        print(path)


if __name__ == "__main__":
    main()
