"""tunvpnd benchmark: HostU -> VPN server -> HostV through tunvpnd, OpenVPN, wireguard-go and
plain routing, in lab network namespaces. See bench/README.md.

    /opt/tunvpnd/bin/python bench/run.py [--rounds 3] [--quick] [--only a,b] [--peers 1000]
                                         [--metrics]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import report
from configs import (
    BASELINE,
    BASELINE_WG,
    CONFIG_NAMES,
    METRICS,
    WIREGUARD,
    Tunnel,
    all_configs,
)
from measure import Options, measure, wait_reachable
from scale import measure_scale
from wgscale import measure_scale_wireguard

from tunvpnd.lab import Lab, leftover_namespaces

BENCH = Path(__file__).resolve().parent
SCALE = "scale"
SCALE_WG = "scale-wireguard"
SCALES = (SCALE, SCALE_WG)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    p.add_argument("--quick", action="store_true",
                   help="CI smoke run: 1 round, iperf3 -t 2, 50 pings, 100 peers")
    p.add_argument("--only", default=",".join([*CONFIG_NAMES, *SCALES]),
                   help=f"comma-separated subset of: {', '.join([*CONFIG_NAMES, *SCALES])}")
    p.add_argument("--peers", type=int, default=None,
                   help="peers in the scale measurements, plain and wireguard (default 1000, "
                   "--quick 100; 0 = skip both)")
    p.add_argument("--seconds", type=int, default=None, help="iperf3 -t (default 10, quick 2)")
    p.add_argument("--pings", type=int, default=None, help="pings (default 200, quick 50)")
    p.add_argument("--baseline", type=Path, metavar="CHECKOUT",
                   help="also measure the tunvpnd of another checkout (e.g. `git worktree add "
                   "/tmp/base REV`) as tunvpnd-baseline (and tunvpnd-wireguard-baseline), and "
                   "print tunvpnd / tunvpnd-baseline (tunvpnd-wireguard / ...-baseline)")
    p.add_argument("--metrics", action="store_true",
                   help=f"also measure tunvpnd{METRICS} and {WIREGUARD}{METRICS}: the same "
                   "daemons with `metrics: 127.0.0.1:9586` and a scrape of each every second "
                   "(metrics on vs off)")
    p.add_argument("--json", type=Path, default=BENCH / "results" / "latest.json")
    p.add_argument("--png", type=Path, default=BENCH / "results" / "latest.png")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds = 1
    args.seconds = args.seconds or (2 if args.quick else 10)
    args.pings = args.pings or (50 if args.quick else 200)
    args.peers = (100 if args.quick else 1000) if args.peers is None else args.peers
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    if args.baseline is not None:
        if not (args.baseline / "tunvpnd" / "__init__.py").is_file():
            p.error(f"--baseline {args.baseline}: not a tunvpnd checkout")
        args.baseline = args.baseline.resolve()
        if "tunvpnd" in args.only and BASELINE not in args.only:
            args.only.append(BASELINE)
        if WIREGUARD in args.only and BASELINE_WG not in args.only and \
                (args.baseline / "etc" / "tunvpn" / "wg-server.yaml").is_file():
            args.only.append(BASELINE_WG)
    if args.metrics:
        args.only += [name + METRICS for name in ("tunvpnd", WIREGUARD)
                      if name in args.only and name + METRICS not in args.only]
    unknown = set(args.only) - {*CONFIG_NAMES, *SCALES, BASELINE, BASELINE_WG,
                                *(f"{name}{METRICS}" for name in ("tunvpnd", WIREGUARD))}
    if unknown:
        p.error(f"unknown config(s) {', '.join(sorted(unknown))}")
    if args.peers == 0:
        args.only = [name for name in args.only if name not in SCALES]
    if args.rounds < 1 or args.peers == 1 or args.peers < 0 or args.pings < 2:
        p.error("need --rounds >= 1, --peers 0 or >= 2, --pings >= 2")
    return args


def say(msg: str) -> None:
    print(msg, flush=True)


def run_one(name: str, prefix: str, opts: Options, peers: int,
            baseline: Path | None = None, metrics: bool = False) -> dict:
    """One measurement of one config (or the scale test) in a fresh lab, always torn down."""
    lab = Lab(prefix, extra_clients=1 if name in SCALES else 0)
    workdir = Path(tempfile.mkdtemp(prefix="tvb"))      # short: AF_UNIX paths are limited
    tunnel: Tunnel | None = None
    try:
        lab.up()
        if name == SCALE:
            return measure_scale(lab, workdir, peers, opts)
        if name == SCALE_WG:
            return measure_scale_wireguard(lab, workdir, peers, opts)
        tunnel = next(c for c in all_configs(baseline, metrics) if c.name == name)
        tunnel.start(lab, workdir)
        wait_reachable(lab)
        result = measure(lab, tunnel.pids(), opts)
        tunnel.check_alive()
        facts = tunnel.facts()
        if facts:
            result["tunnel"] = facts
        return result
    except Exception as e:
        logs = f"; logs: {tunnel.log_tail()}" if tunnel else ""
        raise RuntimeError(f"{e}{logs}") from e
    finally:
        try:
            if tunnel is not None:
                tunnel.stop()
        finally:
            lab.down()
            shutil.rmtree(workdir, ignore_errors=True)


def commit_of(checkout: Path) -> str:
    git = ["git", "-C", str(checkout)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, timeout=10).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--", "tunvpnd"],
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return f"{head}{' + uncommitted changes in tunvpnd/' if dirty else ''}"


def versions(baseline: Path | None) -> dict[str, str]:
    found = {"python": platform.python_version(), "kernel": platform.release(),
             "tunvpnd": commit_of(BENCH.parent)}
    if baseline is not None:
        found[BASELINE] = found[BASELINE_WG] = commit_of(baseline)
    for tool, flag in (("openvpn", "--version"), ("wireguard-go", "--version"),
                       ("iperf3", "--version")):
        if shutil.which(tool):
            out = subprocess.run([tool, flag], capture_output=True, text=True, timeout=10)
            found[tool] = (out.stdout or out.stderr).strip().splitlines()[0]
    return found


MAIN_PID = os.getpid()


def _interrupt(signum: int, frame: object) -> None:
    """SIGINT/SIGTERM/SIGHUP -> KeyboardInterrupt, so every `finally` cleans up. Only in this
    process: pyroute2 forks helpers that inherit the handler; they just die."""
    if os.getpid() != MAIN_PID:
        os._exit(128 + signum)
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        say("bench: needs root (it creates network namespaces)")
        return 2
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    prefix = f"tvb{os.getpid()}"
    opts = Options(seconds=args.seconds, pings=args.pings)

    skipped: dict[str, str] = {}
    order: list[str] = []
    metrics = any(name.endswith(METRICS) for name in args.only)
    for tunnel in all_configs(args.baseline, metrics):
        if tunnel.name in args.only:
            reason = tunnel.missing()
            if reason:
                skipped[tunnel.name] = reason
                say(f"skip {tunnel.name}: {reason}")
            else:
                order.append(tunnel.name)
    order += [name for name in SCALES if name in args.only]

    rounds: dict[str, list[dict]] = {name: [] for name in order}
    errors: list[str] = []
    started = time.monotonic()
    try:
        for r in range(args.rounds):
            for name in order if r % 2 == 0 else order[::-1]:
                t0 = time.monotonic()
                say(f"round {r + 1}/{args.rounds}: {name} ...")
                try:
                    result = run_one(name, prefix, opts, args.peers, args.baseline, metrics)
                except Exception as e:
                    errors.append(f"round {r + 1} {name}: {e}")
                    say(f"  FAILED: {e}")
                    if os.environ.get("BENCH_TRACEBACK"):
                        traceback.print_exc()
                    continue
                rounds[name].append(result)
                say(f"  done in {time.monotonic() - t0:.1f}s: {_brief(name, result)}")
                for fact in result.get("tunnel", {}).values():
                    say(f"  {fact}")
    except KeyboardInterrupt:
        errors.append("interrupted")
        say("interrupted: cleaning up")
    finally:
        Lab(prefix, extra_clients=1).down()
    left = leftover_namespaces(prefix)
    if left:
        errors.append(f"namespaces left behind: {left}")

    configs = [n for n in order if n not in SCALES and rounds[n]]
    summary = {n: report.summarize_rounds(rounds[n]) for n in configs}
    results: dict = {
        "meta": {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "host": platform.node(),
                 "cpus": os.cpu_count(), "rounds": args.rounds, "seconds": args.seconds,
                 "pings": args.pings, "peers": args.peers, "quick": args.quick,
                 "order_round_1": order, "elapsed_s": round(time.monotonic() - started, 1),
                 "versions": versions(args.baseline)},
        "skipped": skipped,
        "errors": errors,
        "rounds": {n: rounds[n] for n in configs},
        "summary": summary,
        "ratios": report.ratios(summary),
        "ratios_wireguard": report.ratios(summary, WIREGUARD,
                                          (*report.SECURE_RATIO_BASES, BASELINE_WG)),
    }
    for name in ("tunvpnd", WIREGUARD):  # --metrics: on / off, each wire
        found = report.ratios(summary, name + METRICS, (name,))
        if found:
            results.setdefault("ratios_metrics", {})[name + METRICS] = found
    if SCALE in rounds and rounds[SCALE]:
        results["scale"] = {"peers": args.peers, "rounds": rounds[SCALE],
                            "summary": report.scale_summary(rounds[SCALE])}
    if SCALE_WG in rounds and rounds[SCALE_WG]:
        results["scale_wireguard"] = {"peers": args.peers, "rounds": rounds[SCALE_WG],
                                      "summary": report.wg_scale_summary(rounds[SCALE_WG])}

    say("")
    say(f"tunvpnd bench: {args.rounds} round(s), iperf3 -t {args.seconds}, {args.pings} pings, "
        f"{os.cpu_count()} CPUs shared with everything else running on this machine")
    if summary:
        say(report.main_table(summary))
    if results["ratios"]:
        say("")
        say(report.ratio_table(results["ratios"]))
    if results["ratios_wireguard"]:
        say("")
        say(report.ratio_table(results["ratios_wireguard"], WIREGUARD))
    for name, found in results.get("ratios_metrics", {}).items():
        say("")
        say(report.ratio_table(found, name))
    if "scale" in results:
        say("")
        say(report.scale_table(results["scale"]))
    if "scale_wireguard" in results:
        say("")
        say(report.wg_scale_table(results["scale_wireguard"]))
    for name, reason in skipped.items():
        say(f"skipped {name}: {reason}")
    report.write_json(args.json, results)
    say(f"results: {args.json}")
    say(report.write_png(args.png, results))
    for error in errors:
        say(f"ERROR {error}")
    return 1 if errors else 0


def _brief(name: str, result: dict) -> str:
    if name == SCALE:
        return (f"TCP {result['1']['tcp_mbps']:.0f} -> {result['N']['tcp_mbps']:.0f} Mbit/s, "
                f"{result['kib_per_peer']:.2f} KiB/peer")
    if name == SCALE_WG:
        return (f"UDP {result['1']['udp_kpps']:.1f} -> {result['N']['udp_kpps']:.1f} kpps, "
                f"{result['kib_per_peer']:.2f} KiB/peer, "
                f"{result['handshakes']['per_second']:.0f} handshakes/s")
    return (f"TCP {result['tcp_mbps']:.0f} Mbit/s, UDP {result['udp_kpps']:.1f} kpps, "
            f"ping {result['ping_median_ms']:.3f} ms")


if __name__ == "__main__":
    sys.exit(main())
