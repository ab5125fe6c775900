"""Reports of the load and chaos runs: the machine, percentiles, markdown + JSON, PNG plots.

Everything here works on plain numbers (dicts and lists), so it is tested without a running stack.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import json
import math
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tickbridge_dev.devstack.servers import QUESTDB_VERSION, REPO_ROOT

RESULTS_DIR = REPO_ROOT / "docs" / "results"


def _run(cmd: list[str]) -> str:
    with contextlib.suppress(Exception):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    return "unknown"


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on: cores, RAM, CPU model, kernel, versions, git commit."""
    cpu_model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem_total_mb = 0.0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total_mb = int(line.split()[1]) / 1024
    versions: dict[str, str] = {"python": platform.python_version(), "questdb-server": QUESTDB_VERSION}
    versions["redis-server"] = _run([shutil.which("redis-server") or "redis-server", "--version"])
    versions["java"] = _run(["java", "-version"])
    for pkg in ("redis", "hiredis", "websockets", "orjson", "uvloop", "questdb", "aiohttp"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions["questdb-client" if pkg == "questdb" else f"{pkg}-py" if pkg == "redis" else pkg] = (
                importlib.metadata.version(pkg)
            )
    commit = _run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"])
    load1, load5, _ = os.getloadavg()
    return {
        "nproc": os.cpu_count() or 0,
        "cpu_model": cpu_model,
        "mem_total_mb": round(mem_total_mb),
        "kernel": platform.release(),
        "loadavg_at_start": [round(load1, 2), round(load5, 2)],
        "versions": versions,
        "git_commit": commit,
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "python_executable": sys.executable,
    }


def machine_markdown(machine: dict[str, Any]) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in machine.get("versions", {}).items())
    return (
        f"- Machine: {machine.get('nproc')} vCPU ({machine.get('cpu_model')}), "
        f"{machine.get('mem_total_mb')} MiB RAM, Linux {machine.get('kernel')}, "
        f"load average at start {machine.get('loadavg_at_start')} (shared with other work)\n"
        f"- Versions: {versions}\n"
        f"- Commit: {machine.get('git_commit')}, run at {machine.get('date_utc')}\n"
    )


def percentiles(values: Sequence[float], qs: Iterable[float] = (50, 95, 99)) -> dict[str, float]:
    """p50/p95/p99 (nearest rank) plus max, mean and n; empty input gives n=0 and NaNs."""
    data = sorted(values)
    out: dict[str, float] = {}
    n = len(data)
    for q in qs:
        out[f"p{q:g}"] = data[min(n - 1, max(0, math.ceil(q / 100 * n) - 1))] if n else math.nan
    out["max"] = data[-1] if n else math.nan
    out["mean"] = sum(data) / n if n else math.nan
    out["n"] = float(n)
    return out


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and math.isnan(value):
        return None
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _clean(value: Any) -> Any:
    """NaN -> None recursively (JSON has no NaN)."""
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(doc), indent=1, default=_json_default) + "\n")


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# -- load -----------------------------------------------------------------------------------------------
HOP_LABELS: dict[str, str] = {
    "exchange": "exchange (simulator trades emitted)",
    "vps_stream": "VPS `market:vps:stream` (entries incl. depth diffs)",
    "brain_stream": "Brain `market:vps:stream` (entries incl. depth diffs)",
    "brain_trades": "Brain per-symbol trade streams (trades)",
    "questdb": "Brain QuestDB `trades` (rows)",
}
LATENCY_LABELS: dict[str, str] = {
    "exchange_to_collector": "exchange trade time → collector receive (`recv_ts`)",
    "exchange_to_vps_stream": "exchange → VPS stream (entry ID time)",
    "exchange_to_brain_redis": "exchange → Brain Redis per-symbol stream (entry ID time)",
    "exchange_to_questdb": "exchange → visible in Brain QuestDB (freshness of `max(timestamp)`)",
}


_EVIDENCE_WORDS = (
    "error",
    "drop",
    "reconnect",
    "gap",
    "backfill",
    "back_fill",
    "retr",
    "resync",
    "dead",
    "disconnect",
    "spill",
    "replay",
    "rewind",
    "fault",
    "claim",
    "stale",
)


def _role_metric_lines(role_metrics: dict[str, dict[str, float]]) -> list[str]:
    """Non-zero fault/retry counters, and the mean of every timing histogram, as markdown lines."""
    lines: list[str] = []
    counters = []
    for role, metrics in role_metrics.items():
        for name, value in sorted(metrics.items()):
            if value and any(w in name for w in _EVIDENCE_WORDS):
                counters.append(f"{role}: `{name}` = {value:g}")
    if counters:
        lines.append("\nRole counters at the end (faults, retries, back-fills): " + "; ".join(counters) + "\n")
    means = []
    for role, metrics in role_metrics.items():
        # One figure per metric: the per-symbol (per-label) series summed, else the line lists hundreds.
        sums: dict[str, list[float]] = {}
        for name, value in metrics.items():
            base = name.partition("{")[0]
            for suffix, slot in (("_sum", 0), ("_count", 1)):
                if base.endswith(suffix):
                    sums.setdefault(base[: -len(suffix)], [0.0, 0.0])[slot] += value
        for metric, (total, count) in sorted(sums.items()):
            if count:
                mean = total / count
                shown = f"{mean * 1000:,.1f} ms" if metric.endswith("_seconds") else f"{mean:,.1f}"
                means.append(f"{role}: `{metric}` mean {shown} over {count:g}")
    if means:
        lines.append("\nRole timing histograms (mean per observation): " + "; ".join(means) + "\n")
    return lines


def _hop_lines(hops: dict[str, Any]) -> list[str]:
    """The µs table of every live hop (devstack/hopwatch.py), with each hop's share and the floor."""
    if not hops:
        return []
    from tickbridge_dev.devstack.hopwatch import HOPS, METHOD  # the harness's own; report stays importable alone

    rows = []
    for name, label in HOPS:
        s = hops.get(name) or {}
        rows.append([label, s.get("p50"), s.get("p95"), s.get("p99"), s.get("share_p50"), s.get("share_p99"),
                     int(s.get("n") or 0)])  # fmt: skip
    floor = hops.get("floor") or {}
    rows.append(["floor: one Redis hop to a Python reader, same Brain Redis, same load", floor.get("p50"),
                 floor.get("p95"), floor.get("p99"), None, None, int(floor.get("n") or 0)])  # fmt: skip
    return [
        "\n## Live path per hop (µs, from the collector's receive time `recv_ts`)\n",
        md_table(["visible to a reader of", "p50", "p95", "p99", "hop share p50", "hop share p99", "samples"], rows),
        "\n" + METHOD + "\n",
    ]


def load_markdown(doc: dict[str, Any]) -> str:
    """The human report of one load run."""
    target = doc["rate_target"]
    ok = doc.get("pass", False)
    lines = [f"# Load test: RATE={target:g} trades/s for {doc['duration_s']:g} s — {'PASS' if ok else 'FAIL'}", ""]
    if doc.get("verdict") and not ok:
        lines.append(f"**{doc['verdict']}**\n")
    lines.append(machine_markdown(doc["machine"]))
    lines.append(
        f"- Pipeline: simulator ({len(doc.get('symbols', []))} symbols, {doc.get('weights', 'zipf')} weights) → "
        "collector → VPS Redis (AOF everysec) → forwarder → Brain Redis (AOF) → consumer → writer → Brain QuestDB; "
        "VPS QuestDB running as the spill buffer. All processes on this one machine.\n"
    )
    lines.append(f"- Command: `{doc.get('command', '')}`\n")
    lines.append("## Throughput per hop (steady window, after warm-up)\n")
    rows = []
    for hop, info in doc["rates"].items():
        ratio = info.get("ratio")
        rows.append([HOP_LABELS.get(hop, hop), info.get("mean"), info.get("max_1s"),
                     None if ratio is None else f"{ratio * 100:.2f} %"])  # fmt: skip
    lines.append(md_table(["hop", "mean /s", "max 1-s /s", "of RATE"], rows))
    lines.append(
        f"\nSimulator achieved {_fmt(doc['rates']['exchange'].get('mean'))} trades/s "
        f"({_fmt((doc['rates']['exchange'].get('ratio') or 0) * 100, 2)} % of RATE); "
        f"Brain QuestDB ingested {_fmt(doc['rates']['questdb'].get('mean'))} rows/s. "
        f"After the simulator paused, the pipeline drained in {_fmt(doc.get('drain_s'), 1)} s.\n"
    )
    lines.append("## End-to-end latency (ms)\n")
    rows = []
    for key, stats in doc["latency_ms"].items():
        rows.append([LATENCY_LABELS.get(key, key), stats.get("p50"), stats.get("p95"), stats.get("p99"),
                     stats.get("max"), int(stats.get("n") or 0)])  # fmt: skip
    lines.append(md_table(["path", "p50", "p95", "p99", "max", "samples"], rows))
    lines.append(
        "\nMethod: every 0.5 s the harness reads the newest entries of every Brain per-symbol trade stream. "
        "Each entry carries the exchange trade time (`timestamp`, ms precision from the exchange), the collector's "
        "`recv_ts`, its VPS stream ID (`src_id`, whose ms part is the VPS XADD time) and its own Brain entry ID "
        "(auto ID: the Brain arrival time), so one sample gives every hop exactly. QuestDB visibility is sampled "
        "once per second as `now - max(timestamp)` of `trades` (an upper bound that includes the poll interval "
        "and the writer's flush interval).\n"
    )
    lines += _hop_lines(doc.get("hops_us") or {})
    lines.append("## Processes (CPU % of one core, RSS)\n")
    rows = [[name, p.get("cpu_mean"), p.get("cpu_max"), p.get("runqueue_wait_mean"), p.get("rss_max_mb")]
            for name, p in doc["processes"].items()]  # fmt: skip
    lines.append(md_table(["process", "CPU mean %", "CPU max %", "waiting for a CPU mean %", "RSS max MiB"], rows))
    lines.append(
        "\n`waiting for a CPU`: time its threads were runnable but not running (`/proc/<pid>/task/*/schedstat`), "
        "in % of one core: high means starved by the machine, low with low CPU means waiting on I/O.\n"
    )
    sys_cpu = doc.get("system_cpu", {})
    lines.append(f"\nWhole machine CPU: mean {_fmt(sys_cpu.get('mean'))} %, max {_fmt(sys_cpu.get('max'))} % "
                 f"(of {doc['machine'].get('nproc')} cores = 100 %). CPU taken by other work on the shared machine "
                 f"(not this stack): mean {_fmt(sys_cpu.get('other_work_mean_pct_of_core'))} % of one core; "
                 f"1-min load average during the run: mean {_fmt(sys_cpu.get('loadavg1_mean'), 2)}.\n")  # fmt: skip
    lines.append("## Redis memory\n")
    rows = [[name, m.get("start_mb"), m.get("max_mb"), m.get("end_mb")] for name, m in doc["redis_memory"].items()]
    lines.append(md_table(["server", "start MiB", "max MiB", "end MiB"], rows))
    lines += redis_command_lines(doc.get("redis_commands") or {}, doc)
    oracle = doc.get("oracle", {})
    lines.append("\n## Loss and duplicates (oracle, by trade ID, per symbol)\n")
    lines.append(md_table(["expected", "rows", "lost", "duplicated", "out of order", "result"], [[
        oracle.get("expected"), oracle.get("rows"), oracle.get("lost"), oracle.get("duplicated"),
        oracle.get("out_of_order"), "OK" if oracle.get("ok") else "FAIL"]]))  # fmt: skip
    failing = oracle.get("symbols_failing") or []
    if failing:
        lines.append("\nSymbols failing the oracle: " + ", ".join(
            f"{f['symbol']} (missing {f['missing']}, dup {f['duplicates']}, ooo {f['out_of_order']})"
            if isinstance(f, dict) else str(f) for f in failing[:20]) + "\n")  # fmt: skip
    lines += _role_metric_lines(doc.get("role_metrics") or {})
    checks = doc.get("checks", {})
    if checks:
        lines.append("\n## Acceptance checks\n")
        lines.append(md_table(["check", "result"], [[k, "PASS" if v else "FAIL"] for k, v in checks.items()]))
    if doc.get("notes"):
        lines.append("\n## Notes\n")
        lines += [f"- {note}" for note in doc["notes"]]
        lines.append("")
    if doc.get("plot"):
        lines.append(f"\n![throughput and latency over time]({Path(doc['plot']).name})\n")
    return "\n".join(lines)


def plot_load(doc: dict[str, Any], path: Path) -> None:
    """Throughput per hop, latency and CPU over time, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timeline: list[dict[str, Any]] = doc.get("timeline", [])
    fig, axes = plt.subplots(3, 1, figsize=(11, 10), sharex=True)
    t = [row["t"] for row in timeline]
    ax = axes[0]
    for hop in ("exchange", "brain_trades", "questdb", "vps_stream", "brain_stream"):
        ys = [row.get("rate", {}).get(hop) for row in timeline]
        if any(y is not None for y in ys):
            ax.plot(t, [math.nan if y is None else y for y in ys], label=HOP_LABELS.get(hop, hop), linewidth=1)
    ax.axhline(doc["rate_target"], color="grey", linestyle=":", label="RATE")
    ax.set_ylabel("per second")
    ax.set_title(f"Throughput per hop — RATE={doc['rate_target']:g}/s")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    ax = axes[1]
    for key, style, qs in (("exchange_to_brain_redis", "-", ("p50", "p99")), ("exchange_to_questdb", "--", ("p50",))):
        for q in qs:
            ys = [row.get("latency", {}).get(key, {}).get(q) for row in timeline]
            if any(y is not None for y in ys):
                ax.plot(t, [math.nan if y is None else y for y in ys], style, linewidth=1,
                        label=f"{q} {LATENCY_LABELS.get(key, key)}")  # fmt: skip
    ax.set_ylabel("latency ms (log)")
    ax.set_yscale("log")
    ax.set_title("End-to-end latency per 1-s window")
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    ax = axes[2]
    names = sorted({name for row in timeline for name in row.get("cpu", {})})
    for name in names:
        ys = [row.get("cpu", {}).get(name) for row in timeline]
        ax.plot(t, [math.nan if y is None else y for y in ys], linewidth=1, label=name)
    ax.set_ylabel("CPU % of one core")
    ax.set_xlabel("seconds since load start")
    ax.set_title("CPU per process")
    ax.legend(fontsize=7, ncol=4, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_load_report(doc: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """`load-<rate>.md/.json/.png` in `out_dir`, and the summary of every load run there."""
    stem = f"load-{int(doc['rate_target'])}"
    paths = {"md": out_dir / f"{stem}.md", "json": out_dir / f"{stem}.json", "png": out_dir / f"{stem}.png"}
    out_dir.mkdir(parents=True, exist_ok=True)
    doc["plot"] = str(paths["png"].name)
    plot_load(doc, paths["png"])
    write_json(paths["json"], doc)
    paths["md"].write_text(load_markdown(doc))
    paths["summary"] = write_load_summary(out_dir)
    return paths


def slowest_hop(doc: dict[str, Any]) -> str:
    """The hop adding the most median latency, with its share in ms."""
    lat = doc.get("latency_ms", {})

    def p50(key: str) -> float:
        value = lat.get(key, {}).get("p50")
        return float(value) if isinstance(value, int | float) and not math.isnan(value) else 0.0

    steps = {
        "exchange→collector": p50("exchange_to_collector"),
        "collector→VPS stream": p50("exchange_to_vps_stream") - p50("exchange_to_collector"),
        "VPS→Brain Redis": p50("exchange_to_brain_redis") - p50("exchange_to_vps_stream"),
        "Brain Redis→QuestDB": p50("exchange_to_questdb") - p50("exchange_to_brain_redis"),
    }
    name = max(steps, key=lambda k: steps[k])
    return f"{name} ({steps[name]:,.0f} ms)"


def write_load_summary(out_dir: Path) -> Path:
    """`load-summary.md`: every `load-*.json` in the folder side by side, to see where the knee is."""
    docs = []
    for path in sorted(out_dir.glob("load-*.json")):
        with contextlib.suppress(Exception):
            docs.append(json.loads(path.read_text()))
    docs.sort(key=lambda d: d.get("rate_target", 0))
    rows = []
    for d in docs:
        rates = d.get("rates", {})
        lat = d.get("latency_ms", {}).get("exchange_to_brain_redis", {})
        qlat = d.get("latency_ms", {}).get("exchange_to_questdb", {})
        oracle = d.get("oracle", {})
        sys_cpu = d.get("system_cpu", {})
        rows.append([
            int(d.get("rate_target", 0)), d.get("duration_s"), rates.get("exchange", {}).get("mean"),
            rates.get("questdb", {}).get("mean"), lat.get("p50"), lat.get("p99"), qlat.get("p50"), qlat.get("p99"),
            slowest_hop(d), sys_cpu.get("other_work_mean_pct_of_core"), d.get("drain_s"), oracle.get("lost"),
            oracle.get("duplicated"), "PASS" if d.get("pass") else "FAIL",
        ])  # fmt: skip
    text = ["# Load tests: all rates\n"]
    if docs:
        text.append(machine_markdown(docs[-1].get("machine", {})))
    text.append(md_table([
        "RATE", "s", "sim achieved /s", "QuestDB /s", "Brain Redis p50 ms", "p99 ms", "QuestDB p50 ms", "p99 ms",
        "largest p50 delay", "other work CPU % of a core", "drain s", "lost", "dup", "result",
    ], rows))  # fmt: skip
    text.append(
        "\n`largest p50 delay`: the hop that adds the most median latency (exchange→collector receive = the "
        "collector's WebSocket reading; receive→VPS stream = the collector's processing and XADD; VPS stream→Brain "
        "per-symbol stream = forwarder and consumer). `other work`: CPU the rest of the shared machine took during "
        "the run (not this stack).\n"
    )
    knee = [d for d in docs if not d.get("pass")]
    if docs:
        text.append("\nPer-rate reports: " + ", ".join(f"[{int(d['rate_target'])}](load-{int(d['rate_target'])}.md)"
                                                         for d in docs) + "\n")  # fmt: skip
    if knee:
        text.append(f"\nFirst failing rate: {int(knee[0]['rate_target'])} (see its report for the hop that fell "
                    "behind).\n")  # fmt: skip
    path = out_dir / "load-summary.md"
    path.write_text("\n".join(text))
    return path


# -- chaos ------------------------------------------------------------------------------------------------
def chaos_markdown(doc: dict[str, Any]) -> str:
    results: list[dict[str, Any]] = doc["scenarios"]
    ok = all(r.get("ok") for r in results)
    lines = [f"# Chaos test — {'PASS' if ok else 'FAIL'} ({sum(1 for r in results if r.get('ok'))}/{len(results)} "
             "scenarios passed)", ""]  # fmt: skip
    lines.append(machine_markdown(doc["machine"]))
    lines.append(f"- Steady load: {doc.get('rate'):g} trades/s over {doc.get('n_symbols')} symbols; "
                 f"mode: {doc.get('mode')}; command: `{doc.get('command', '')}`\n")  # fmt: skip
    lines.append(
        "- Oracle after every scenario: the simulator is paused, the harness waits until the Brain holds every "
        "trade, then checks per symbol that every trade ID the exchange emitted is in the Brain's QuestDB "
        "`trades` exactly once and in order. Recovery time: from the moment a fault is cleared (process "
        "restarted, link restored) until every trade the exchange had emitted by then is visible in the Brain's "
        "QuestDB (so it includes the normal end-to-end latency of ~1 s); the table shows the worst fault.\n"
    )
    lines.append(md_table(
        ["scenario", "faults injected", "ticks sent", "lost", "duplicated", "out of order", "recovery s", "result"],
        [[r["name"], r.get("faults_summary"), r.get("ticks_sent"), r.get("lost"), r.get("duplicated"),
          r.get("out_of_order"), r.get("recovery_s"), "PASS" if r.get("ok") else "FAIL"] for r in results],
    ))  # fmt: skip
    lines.append("\n## Scenarios\n")
    for r in results:
        lines.append(f"### {r['name']} — {'PASS' if r.get('ok') else 'FAIL'}\n")
        lines.append(f"{r.get('description', '')}\n")
        lines.append(f"- Duration {_fmt(r.get('duration_s'))} s, drain {_fmt(r.get('drain_s'))} s.")
        for ev in r.get("faults", []):
            rec = ev.get("recovery_s")
            lines.append(f"- t={_fmt(ev.get('t'))} s: {ev.get('what')}"
                         + (f" — recovered in {_fmt(rec)} s" if rec is not None else ""))  # fmt: skip
        for note in r.get("evidence", []):
            lines.append(f"- evidence: {note}")
        for note in r.get("problems", []):
            lines.append(f"- **problem**: {note}")
        lines.append("")
    if doc.get("notes"):
        lines.append("## Notes\n")
        lines += [f"- {n}" for n in doc["notes"]]
    return "\n".join(lines) + "\n"


def write_chaos_report(doc: dict[str, Any], out_dir: Path, stem: str = "chaos") -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"md": out_dir / f"{stem}.md", "json": out_dir / f"{stem}.json"}
    write_json(paths["json"], doc)
    paths["md"].write_text(chaos_markdown(doc))
    return paths


def redis_command_lines(servers: dict[str, Any], doc: dict[str, Any], top: int = 8) -> list[str]:
    """The report's "Redis time per command" section: each server's costliest commands per trade, beside the
    server's CPU per trade (its process's mean CPU over the simulator's mean rate)."""
    if not servers:
        return []
    lines = ["\n## Redis time per command (`INFO commandstats`, measured window)\n"]
    rate = (doc.get("rates", {}).get("exchange") or {}).get("mean")
    for server, info in servers.items():
        commands = info.get("commands") or {}
        rows = [[cmd, _fmt(c["us_per_trade"], 2), c["calls_per_1000_trades"], _fmt(c["us_per_call"], 2)]
                for cmd, c in list(commands.items())[:top]]  # fmt: skip
        cpu = (doc.get("processes", {}).get(server) or {}).get("cpu_mean")
        per_trade = f"{cpu * 10_000 / rate:,.1f} µs of CPU per trade, " if cpu is not None and rate else ""
        lines.append(f"\n{server}: {per_trade}{int(info.get('trades') or 0):,} trades in the window\n")
        lines.append(md_table(["command", "µs per trade", "calls per 1,000 trades", "µs per call"], rows))
    lines.append(
        "\nCommand time only (Redis' own clock inside each command): reading requests, writing replies and the "
        "event loop come on top. A Lua function counts as `fcall` and a transaction as `exec`, and the commands "
        "they run count again under their own names, so the rows do not add up. The harness's reads (hopwatch "
        "followers, the probe) are included.\n"
    )
    return lines
