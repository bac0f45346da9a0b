#!/usr/bin/env python3
"""Helpers for compare.sh: free ports, bounded HTTP waits, metric scrapes,
and the results table (medians over runs). Standard library only."""

import json
import socket
import statistics
import sys
import time
import urllib.request


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    print(port)


def wait_http(url, timeout):
    deadline = time.time() + float(timeout)
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status < 500:
                    return 0
        except Exception:
            time.sleep(0.1)
    print(f"timed out after {timeout}s waiting for {url}", file=sys.stderr)
    return 1


def metric(url, name):
    """Sum of all series of a metric in a Prometheus text exposition;
    `name{label="value",...}` sums only the series carrying those labels."""
    base, _, labels = name.partition("{")
    wanted = [p for p in labels.rstrip("}").split(",") if p]
    total = 0.0
    with urllib.request.urlopen(url, timeout=5) as r:
        for line in r.read().decode().splitlines():
            if not (line.startswith(base) and line[len(base)] in " {"):
                continue
            series = line.rsplit(" ", 1)[0]
            if all(p in series for p in wanted):
                total += float(line.rsplit(" ", 1)[1])
    print(int(total))


def measured(summary, target, phase, offered_rps, series, cpu_ticks, clk_tck, hwm_kib, run):
    """One results line as a dict: k6 summary + process CPU and peak RSS."""
    with open(summary) as f:
        s = json.load(f)
    samples = s["samples_accepted"]
    cpu_s = int(cpu_ticks) / int(clk_tck)
    return {
        "run": int(run),
        "phase": phase,
        "target": target,
        "offered_sps": int(offered_rps) * int(series),
        "achieved_sps": samples / s["duration_s"] if s["duration_s"] else 0,
        "cpu_s": cpu_s,
        "cpu_s_per_m": cpu_s / samples * 1e6 if samples else None,
        "p50_ms": s["p50_ms"],
        "p99_ms": s["p99_ms"],
        "rss_mib": int(hwm_kib) / 1024 if hwm_kib else None,
        "failed_rate": s["failed_rate"],
        "dropped": s["dropped_iterations"],
        "responses_503": s["responses_503"],
        "thresholds_ok": s["thresholds_ok"],
        "requests": s["requests"],
    }


def row(*args):
    """One results line for the measured target."""
    print(json.dumps(measured(*args)))


def cpu_row(*args):
    """A row for a process next to the one measured (ClickHouse behind the
    tee): its CPU per sample sent in that window and its peak RSS; the
    latencies and outcomes are the measured target's, so they are left out."""
    out = measured(*args)
    out.update(achieved_sps=None, p50_ms=None, p99_ms=None, failed_rate=0.0,
               dropped=0, responses_503=None, thresholds_ok=True)
    print(json.dumps(out))


def child_pid(parent):
    """The pid of a child of parent (nginx's one worker), from /proc."""
    import glob
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == parent:
            print(stat.split("/")[2])
            return 0
    sys.exit(f"no child of process {parent}")


def run_timed(ticks_file, clk_tck, *cmd):
    """Runs cmd, then writes the CPU it used (user + system, it and its
    children, in clock ticks) to ticks_file; exits with cmd's status."""
    import resource
    import subprocess
    rc = subprocess.call(cmd)
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(ticks_file, "w") as f:
        f.write(str(round((r.ru_utime + r.ru_stime) * int(clk_tck))))
    return rc


def passed(summary, offered_rps, duration_s):
    """Sustained: thresholds held, under 1% of iterations dropped."""
    with open(summary) as f:
        s = json.load(f)
    want = int(offered_rps) * float(duration_s)
    ok = s["thresholds_ok"] and s["dropped_iterations"] <= 0.01 * want
    return 0 if ok else 1


def fmt(v, spec):
    if v is None:
        width = spec.split(".")[0]
        return "-".rjust(int(width) if width.isdigit() else 0)
    return format(v, spec)


def sustained(rows, phase, target):
    """The ladder rows of a target that held: thresholds, under 1% dropped."""
    return [r for r in rows if r["phase"] == phase and r["target"] == target
            and r["thresholds_ok"] and r["dropped"] <= 0.01 * r["requests"]]


def ladder_maxima(rows, target):
    """Per climb of the tee ladder: the highest sustained step's row."""
    best = {}
    for r in sustained(rows, "tee-max", target):
        if r["run"] not in best or r["offered_sps"] > best[r["run"]]["offered_sps"]:
            best[r["run"]] = r
    return best


def tee_max_rps(path):
    """Requests/s of tee-on's highest sustained ladder step, the lower median
    over climbs (200 if none held)."""
    with open(path) as f:
        rows = [json.loads(l) for l in f if l.strip()]
    tops = sorted(r["offered_sps"] for r in ladder_maxima(rows, "tee-on").values())
    print(tops[(len(tops) - 1) // 2] // 1000 if tops else 200)


def tee_lines(rows):
    """Tee on vs tee off: CPU per sample per run, and the max of each."""
    def find(phase, target, run, offered):
        return [v for v in rows if v["phase"] == phase and v["target"] == target
                and v["run"] == run and v["offered_sps"] == offered]
    cpu = {}
    for r in rows:
        if r["phase"] != "tee" or r["target"] != "tee-on" or not r["cpu_s_per_m"]:
            continue
        off = find("tee", "tee-off", r["run"], r["offered_sps"])
        ch = find("tee", "ch-on", r["run"], r["offered_sps"])
        if off and off[0]["cpu_s_per_m"]:
            cpu.setdefault(r["offered_sps"], []).append(
                (r["cpu_s_per_m"] / off[0]["cpu_s_per_m"],
                 (r["cpu_s_per_m"] + (ch[0]["cpu_s_per_m"] or 0 if ch else 0)) / off[0]["cpu_s_per_m"]))
    for offered, rs in sorted(cpu.items()):
        a = [x for x, _ in rs]
        b = [y for _, y in rs]
        print(
            f"CPU per sample tee-on/tee-off at {offered} samples/s: rwgate median {statistics.median(a):.2f} "
            f"(runs: {', '.join(f'{x:.2f}' for x in a)}); rwgate+ClickHouse median {statistics.median(b):.2f}"
        )
    maxima = {}
    for target in ("tee-off", "tee-on"):
        climbs = sorted({r["run"] for r in rows if r["phase"] == "tee-max" and r["target"] == target})
        maxima[target] = ladder_maxima(rows, target)
        for run in climbs:
            ladder = sorted((r for r in rows if r["phase"] == "tee-max" and r["target"] == target
                             and r["run"] == run), key=lambda r: r["offered_sps"])
            b = maxima[target].get(run)
            if b is None:
                print(f"max sustained {target}, climb {run}: none of the ladder (lowest "
                      f"{ladder[0]['offered_sps']} samples/s, p99 {ladder[0]['p99_ms']:.2f} ms)")
                continue
            top = b == ladder[-1]
            side = ("ch-", "k6-", "nginx-")
            per_m = sum(v["cpu_s_per_m"] or 0 for v in rows if v["phase"] == "tee-max" and v["run"] == run
                        and v["offered_sps"] == b["offered_sps"]
                        and v["target"] in [target] + [p + target[4:] for p in side])
            busy = (f", {per_m:.2f} CPU s/M with {', '.join(p[:-1] for p in side)}: "
                    f"{per_m * b['achieved_sps'] / 1e6:.2f} CPUs")
            print(f"max sustained {target}, climb {run}: {b['offered_sps']} samples/s offered, "
                  f"{b['achieved_sps']:.0f} achieved, p99 {b['p99_ms']:.2f} ms{busy}"
                  f"{' (top of the ladder: a lower bound)' if top else ''}")
    both = sorted(set(maxima["tee-off"]) & set(maxima["tee-on"]))
    if both:
        ratios = [maxima["tee-on"][r]["achieved_sps"] / maxima["tee-off"][r]["achieved_sps"] for r in both]
        print(f"max throughput tee-on/tee-off: median {statistics.median(ratios):.2f} "
              f"(climbs: {', '.join(f'{x:.2f}' for x in ratios)}); target >= 0.85")
    # The same ladder read with the max search's usual latency bound.
    best50 = {}
    for target in ("tee-off", "tee-on"):
        ok = [r for r in rows if r["phase"] == "tee-max" and r["target"] == target and r["thresholds_ok"]
              and r["dropped"] <= 0.01 * r["requests"] and r["p99_ms"] < 50]
        if ok:
            best50[target] = max(ok, key=lambda r: r["offered_sps"])["achieved_sps"]
    if best50:
        print("max with p99 < 50 ms, any climb: " + ", ".join(f"{t} {v:.0f} samples/s" for t, v in best50.items())
              + (f"; ratio {best50['tee-on'] / best50['tee-off']:.2f}" if len(best50) == 2 else ""))


def table(results):
    rows = [json.loads(l) for l in open(results) if l.strip()]
    groups = {}
    for r in rows:
        groups.setdefault((r["phase"], r["offered_sps"], r["target"]), []).append(r)

    def med(rs, k):
        vals = [r[k] for r in rs if r[k] is not None]
        return statistics.median(vals) if vals else None

    print()
    print(
        f"{'phase':<10} {'target':<13} {'offered/s':>10} {'samples/s':>10} "
        f"{'CPU s/M':>8} {'p50 ms':>7} {'p99 ms':>7} {'RSS MiB':>8} {'err %':>6} {'503s':>6} {'runs':>4}"
    )
    for (phase, offered, target), rs in sorted(groups.items(), key=lambda g: (g[0][0], g[0][1], g[0][2])):
        print(
            f"{phase:<10} {target:<13} {offered:>10} {fmt(med(rs, 'achieved_sps'), '10.0f')} "
            f"{fmt(med(rs, 'cpu_s_per_m'), '8.3f')} {fmt(med(rs, 'p50_ms'), '7.2f')} "
            f"{fmt(med(rs, 'p99_ms'), '7.2f')} {fmt(med(rs, 'rss_mib'), '8.1f')} "
            f"{fmt(100 * (med(rs, 'failed_rate') or 0), '6.2f')} {fmt(med(rs, 'responses_503'), '6.0f')} {len(rs):>4}"
        )
    # The ratio, per run and its median, at each fixed load.
    print()
    ratios = {}
    for r in rows:
        if r["phase"] != "load" or r["target"] != "rwgate" or r["cpu_s_per_m"] is None:
            continue
        peer = [
            v for v in rows
            if v["phase"] == "load" and v["target"] == "vmagent" and v["run"] == r["run"]
            and v["offered_sps"] == r["offered_sps"] and v["cpu_s_per_m"]
        ]
        if peer:
            ratios.setdefault(r["offered_sps"], []).append(r["cpu_s_per_m"] / peer[0]["cpu_s_per_m"])
    for offered, rs in sorted(ratios.items()):
        print(
            f"CPU per sample rwgate/vmagent at {offered} samples/s: "
            f"median {statistics.median(rs):.2f} (runs: {', '.join(f'{x:.2f}' for x in rs)}); target <= 0.50"
        )
    for target in ("rwgate", "vmagent"):
        mx = [r for r in rows if r["phase"] == "max" and r["target"] == target and r["thresholds_ok"]]
        if mx:
            best = max(mx, key=lambda r: r["offered_sps"])
            print(f"max sustained {target}: {best['offered_sps']} samples/s offered, {best['achieved_sps']:.0f} achieved, p99 {best['p99_ms']:.2f} ms")
    tee_lines(rows)
    for phase, how in (("half-max", ""), ("half-max-k6-pinned", ", k6 pinned to one CPU")):
        added = []
        for run in sorted({r["run"] for r in rows if r["phase"] == phase}):
            half = {r["target"]: r for r in rows if r["phase"] == phase and r["run"] == run}
            if "rwgate" in half and "sink" in half:
                rw, sink = half["rwgate"]["p99_ms"], half["sink"]["p99_ms"]
                added.append(f"{rw - sink:.2f} ({rw:.2f} - {sink:.2f})")
        if added:
            med = statistics.median(float(a.split()[0]) for a in added)
            print(
                f"added p99 at half of max{how}: median {med:.2f} ms; runs, rwgate - sink alone: "
                f"{', '.join(added)}; target <= 2 ms"
            )


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "free-port":
        free_port()
    elif cmd == "wait-http":
        sys.exit(wait_http(*args))
    elif cmd == "metric":
        metric(*args)
    elif cmd == "row":
        row(*args)
    elif cmd == "cpu-row":
        cpu_row(*args)
    elif cmd == "child-pid":
        child_pid(*args)
    elif cmd == "run-timed":
        sys.exit(run_timed(*args))
    elif cmd == "passed":
        sys.exit(passed(*args))
    elif cmd == "tee-max-rps":
        tee_max_rps(*args)
    elif cmd == "table":
        table(*args)
    else:
        sys.exit(f"unknown command {cmd}")
