#!/usr/bin/env python3
"""Runs one `ldc load` against a running `ldc up` and says where the work went.

    measure.py UP_PID LDC DATA_DIR -- LOAD_ARGS...

Prints the load's JSON with, added: CPU microseconds per payment of the router, the cells
(all their processes), the controller (`ldc up` itself) and the load generator (read from
/proc before and after, and the generator's own rusage); store syncs per payment and
commands per batch (from the cells' own metrics). Used by bench/payments.sh.
"""
import json
import os
import resource
import subprocess
import sys
import urllib.request

TICK_US = 1_000_000 / os.sysconf("SC_CLK_TCK")


def children():
    """pid -> (ppid, cpu ticks, cmdline) of every process."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = open(f"/proc/{d}/stat").read()
            cmd = open(f"/proc/{d}/cmdline").read().split("\0")
        except OSError:
            continue
        fields = stat.rsplit(") ", 1)[1].split()
        out[int(d)] = (int(fields[1]), int(fields[11]) + int(fields[12]), cmd)
    return out


def cpu_by_role(up_pid):
    procs = children()
    tree = {up_pid}
    grew = True
    while grew:
        grew = False
        for pid, (ppid, _, _) in procs.items():
            if ppid in tree and pid not in tree:
                tree.add(pid)
                grew = True
    roles = {"router": 0, "cells": 0, "controller": 0}
    for pid in tree:
        _, ticks, cmd = procs.get(pid, (0, 0, []))
        if pid == up_pid:
            roles["controller"] += ticks
        elif "router" in cmd and "serve" in cmd:
            roles["router"] += ticks
        elif "cell" in cmd and "serve" in cmd:
            roles["cells"] += ticks
    return roles


def cell_metrics(ldc, data):
    status = json.loads(
        subprocess.run(
            [ldc, "--data-dir", data, "cell", "status", "-o", "json"],
            check=True,
            capture_output=True,
        ).stdout
    )
    totals = {"syncs": 0.0, "batches": 0.0, "commands": 0.0}
    names = {
        "ldc_cell_sync_seconds_count": "syncs",
        "ldc_cell_batch_commands_count": "batches",
        "ldc_cell_batch_commands_sum": "commands",
    }
    for c in status["cells"]:
        for addr in [c["colours"][k]["metrics"] for k in ("blue", "green")]:
            if not addr:
                continue
            try:
                text = urllib.request.urlopen(f"http://{addr}/metrics", timeout=5).read().decode()
            except OSError:
                continue
            for line in text.splitlines():
                name = line.split("{")[0].split(" ")[0]
                if name in names:
                    totals[names[name]] += float(line.rsplit(" ", 1)[1])
    return totals


def main():
    up_pid, ldc, data = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    load = sys.argv[sys.argv.index("--") + 1 :]
    cpu0, m0 = cpu_by_role(up_pid), cell_metrics(ldc, data)
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run([ldc, "--data-dir", data, "-o", "json", "load", *load], capture_output=True)
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu1, m1 = cpu_by_role(up_pid), cell_metrics(ldc, data)
    r = json.loads(out.stdout)
    n = max(r["payments"], 1)
    per = {k: (cpu1[k] - cpu0[k]) * TICK_US / n for k in cpu0}
    # The status and metrics calls are children too, but outside the load's two readings.
    per["load"] = ((ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)) * 1e6 / n
    r["cpu_us_per_payment"] = {k: round(v, 1) for k, v in per.items()}
    r["syncs_per_payment"] = round((m1["syncs"] - m0["syncs"]) / n, 3)
    batches = m1["batches"] - m0["batches"]
    r["commands_per_batch"] = round((m1["commands"] - m0["commands"]) / batches, 1) if batches else 0
    print(json.dumps(r))


main()
