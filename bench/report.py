"""Results -> medians with min-max, the printed tables, ratios, the JSON file and the PNG chart."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from measure import METRICS
from scale import METRICS as SCALE_METRICS

RATIO_METRICS = ("tcp_mbps", "udp_kpps", "ping_median_ms")
RATIO_BASES = ("tunvpnd-baseline", "openvpn-none", "openvpn-tuned", "openvpn-aes",
               "wireguard-go", "python-floor")


def summarize(values: list[float | None]) -> dict[str, float] | None:
    got = [v for v in values if v is not None]
    if not got:
        return None
    return {"median": statistics.median(got), "min": min(got), "max": max(got), "n": len(got)}


def summarize_rounds(rounds: list[dict]) -> dict[str, dict | None]:
    keys = [k for k in METRICS if any(k in r for r in rounds)] or list(METRICS)
    return {k: summarize([r.get(k) for r in rounds]) for k in keys}


# the secure wire against the other encrypted tunnels, and against plain tunvpnd
SECURE_RATIO_BASES = ("wireguard-go", "openvpn-aes", "tunvpnd")


def ratios(summary: dict[str, dict], ours_name: str = "tunvpnd",
           bases: tuple[str, ...] = RATIO_BASES) -> dict[str, dict[str, float]]:
    """OURS / X of the medians, for each base X that has results."""
    ours = summary.get(ours_name) or {}
    out: dict[str, dict[str, float]] = {}
    for base in bases:
        theirs = summary.get(base) or {}
        row = {}
        for metric in RATIO_METRICS:
            a, b = ours.get(metric), theirs.get(metric)
            if a and b and b["median"]:
                row[metric] = a["median"] / b["median"]
        if row:
            out[base] = row
    return out


def _fmt(value: float) -> str:
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def cell(stats: dict | None) -> str:
    if stats is None:
        return "-"
    if stats["n"] == 1:
        return _fmt(stats["median"])
    return f"{_fmt(stats['median'])} ({_fmt(stats['min'])}-{_fmt(stats['max'])})"


def table(rows: list[tuple[str, list[str]]], header: list[str]) -> str:
    widths = [max(len(header[i]), *(len(r[1][i - 1]) if i else len(r[0]) for r in rows))
              for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for label, cells in rows:
        lines.append("  ".join(t.ljust(w) for t, w in zip([label, *cells], widths, strict=True)))
    return "\n".join(lines)


def main_table(summary: dict[str, dict]) -> str:
    configs = list(summary)
    rows = [(label, [cell(summary[c].get(key)) for c in configs]) for key, label in
            METRICS.items()]
    return table(rows, ["median (min-max)", *configs])


def ratio_table(found: dict[str, dict[str, float]], ours_name: str = "tunvpnd") -> str:
    rows = [(f"{ours_name} / {base}", [f"{found[base][m]:.2f}" if m in found[base] else "-"
                                   for m in RATIO_METRICS]) for base in found]
    return table(rows, ["ratio of medians", *(METRICS[m] for m in RATIO_METRICS)])


def scale_table(scale: dict) -> str:
    peers = scale["peers"]
    summ = scale["summary"]
    rows = [(label, [cell(summ["1"].get(key)), cell(summ["N"].get(key))])
            for key, label in SCALE_METRICS.items()]
    rows.append(("KiB per extra peer", [cell(summ["kib_per_peer"]), ""]))
    return table(rows, ["tunvpnd server", "1 peer", f"{peers} peers"])


def scale_summary(rounds: list[dict]) -> dict:
    return {
        "1": {k: summarize([r["1"][k] for r in rounds]) for k in SCALE_METRICS},
        "N": {k: summarize([r["N"][k] for r in rounds]) for k in SCALE_METRICS},
        "kib_per_peer": summarize([r["kib_per_peer"] for r in rounds]),
    }


WG_SCALE_METRICS: dict[str, str] = {
    "udp_kpps": "UDP 64B kpps rx",
    "tcp_mbps": "TCP Mbit/s",
    "rss_mib": "server VmRSS MiB",
}
WG_SCALE_FACTS: dict[str, str] = {       # one value per round
    "udp_ratio": "UDP pps N / 1 peer",
    "tcp_ratio": "TCP N / 1 peer",
    "kib_per_peer": "KiB per extra peer",
    "kib_per_configured_peer": "  of which configured, no session",
    "connect_cpu_ms": "server CPU ms per handshake (paced, with its echo)",
    "handshakes_per_second": "handshakes/s completed (flood)",
    "offered_per_second": "  initiations/s offered",
    "flood_cpu_ms": "server CPU ms per handshake (flood)",
    "cookie_replies": "cookie replies in the flood",
}


def _wg_facts(r: dict) -> dict[str, float | None]:
    hs, connect = r["handshakes"], r["connect"]
    return {"udp_ratio": r["udp_ratio"], "tcp_ratio": r["tcp_ratio"],
            "kib_per_peer": r["kib_per_peer"],
            "kib_per_configured_peer": r["kib_per_configured_peer"],
            "connect_cpu_ms": connect["server_cpu_ms_per_handshake"],
            "handshakes_per_second": hs["per_second"],
            "offered_per_second": hs["offered_per_second"],
            "flood_cpu_ms": hs["server_cpu_ms_per_handshake"],
            "cookie_replies": hs["cookie_replies"]}


def wg_scale_summary(rounds: list[dict]) -> dict:
    facts = [_wg_facts(r) for r in rounds]
    return {
        "1": {k: summarize([r["1"][k] for r in rounds]) for k in WG_SCALE_METRICS},
        "N": {k: summarize([r["N"][k] for r in rounds]) for k in WG_SCALE_METRICS},
        **{k: summarize([f[k] for f in facts]) for k in WG_SCALE_FACTS},
    }


def wg_scale_table(scale: dict) -> str:
    summ = scale["summary"]
    rows = [(label, [cell(summ["1"].get(key)), cell(summ["N"].get(key))])
            for key, label in WG_SCALE_METRICS.items()]
    rows += [(label, [cell(summ.get(key)), ""]) for key, label in WG_SCALE_FACTS.items()]
    return table(rows, ["tunvpnd wireguard server", "1 peer",
                        f"{scale['peers']} peers, each with a handshake"])


def write_json(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")


def write_png(path: Path, results: dict) -> str:
    """A bar chart per metric (median, min-max whiskers); returns what happened, for the log."""
    try:
        import matplotlib
    except ImportError:
        return "no PNG: matplotlib is not installed (optional: pip install matplotlib)"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary: dict[str, dict] = results["summary"]
    configs = list(summary)
    panels = list(METRICS.items())
    scale = results.get("scale")
    fig, axes = plt.subplots(2, 4, figsize=(16, 7.5))
    for ax, (key, label) in zip(axes.flat, panels, strict=False):
        stats = [summary[c].get(key) for c in configs]
        names = [c for c, s in zip(configs, stats, strict=True) if s]
        got = [s for s in stats if s]
        _bars(ax, names, got, label)
    last = axes.flat[len(panels)]
    if scale and scale.get("summary"):
        s = scale["summary"]
        _bars(last, ["1 peer", f"{scale['peers']} peers"],
              [s["1"]["rss_mib"], s["N"]["rss_mib"]], "tunvpnd server VmRSS MiB")
    else:
        last.axis("off")
    meta = results["meta"]
    fig.suptitle(f"HostU -> HostV through each tunnel: median of {meta['rounds']} round(s), "
                 f"whiskers min-max ({meta['host']}, {meta['date']})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return f"chart: {path}"


def _bars(ax, names: list[str], stats: list[dict | None], label: str) -> None:
    pairs = [(n, s) for n, s in zip(names, stats, strict=True) if s]
    others = [s["max"] for n, s in pairs if n != "routing"]
    ceiling = dict(pairs).get("routing")
    if ceiling and others and ceiling["median"] > 5 * max(others):   # would flatten the rest
        pairs = [(n, s) for n, s in pairs if n != "routing"]
        label += f"\n(routing: {_fmt(ceiling['median'])}, off the chart)"
    medians = [s["median"] for _, s in pairs]
    low = [s["median"] - s["min"] for _, s in pairs]
    high = [s["max"] - s["median"] for _, s in pairs]
    colors = ["#d62728" if n == "tunvpnd" else "#1f77b4" for n, _ in pairs]
    ax.bar([n for n, _ in pairs], medians, yerr=[low, high], capsize=3, color=colors)
    ax.set_title(label)
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
