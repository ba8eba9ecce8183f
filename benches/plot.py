"""Plots for BENCHMARKS.md from the harness's JSON results (matplotlib, Agg).

Usage: python benches/plot.py RESULTS_DIR  -- prints the PNG file names it wrote.
"""
import json
import os
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def med(values):
    return statistics.median(values) if values else float("nan")


def overhead(d):
    path = os.path.join(d, "overhead.json")
    if not os.path.exists(path):
        return []
    r = json.load(open(path))
    rows = r["rows"]
    bodies = sorted({x["body_bytes"] for x in rows})
    plain = {x["body_bytes"]: x for x in rows if x["variant"] == "plain"}
    out = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, q in zip(axes, ["p50_ms", "p99_ms"]):
        for variant, style in [("filter", "-o"), ("ext_proc", "--s")]:
            for b in bodies:
                pts = sorted((x["endpoints"], med([rep[q] for rep in x["reps"]]))
                             for x in rows if x["variant"] == variant and x["body_bytes"] == b)
                if not pts or b not in plain:
                    continue
                base = med([rep[q] for rep in plain[b]["reps"]])
                ax.plot([p[0] for p in pts], [p[1] - base for p in pts], style,
                        label=f"{variant} {b // 1024} KB")
        # The floor has no pool size: a horizontal line per body size.
        for i, b in enumerate(bodies):
            floor = [x for x in rows if x["variant"] == "floor" and x["body_bytes"] == b]
            if floor and b in plain:
                base = med([rep[q] for rep in plain[b]["reps"]])
                ax.axhline(med([rep[q] for rep in floor[0]["reps"]]) - base, color="#2ca02c",
                           ls=":", lw=1 + i, label=f"floor {b // 1024} KB")
        ax.set_xscale("log")
        # symlog: sub-millisecond differences and the 1000-endpoint blow-up on one axis
        ax.set_yscale("symlog", linthresh=0.1)
        ax.set_xlabel("endpoints in pool and snapshot")
        ax.set_ylabel(f"added {q[:3]} latency over plain Envoy (ms)")
        ax.axhline(0, color="grey", lw=0.5)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Routing overhead at a constant rate (median of repetitions)")
    fig.tight_layout()
    fig.savefig(os.path.join(d, "overhead-latency.png"), dpi=90)
    out.append("overhead-latency.png")
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    labels = []
    sat, cpu = [], []
    for x in rows:
        labels.append(f"{x['variant']}\n{x['endpoints'] or ''} {x['body_bytes'] // 1024}K")
        sat.append(med([rep["saturation_rps"] for rep in x["reps"]]))
        cpu.append(med([rep["envoy_cpu_us"] + rep["picker_cpu_us"] for rep in x["reps"]]))
    palette = {"plain": "#888", "floor": "#2ca02c", "filter": "#1f77b4"}
    colors = [palette.get(x["variant"], "#d62728") for x in rows]
    axes[0].bar(range(len(sat)), sat, color=colors)
    axes[0].set_ylabel("requests/s at saturation")
    axes[1].bar(range(len(cpu)), cpu, color=colors)
    axes[1].set_ylabel("CPU µs per request (Envoy + picker)")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=90, fontsize=6)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Saturation throughput and CPU per request (grey plain, green floor, blue filter, red ext_proc)")
    fig.tight_layout()
    fig.savefig(os.path.join(d, "overhead-throughput.png"), dpi=90)
    out.append("overhead-throughput.png")
    plt.close(fig)
    return out


def routing(d):
    path = os.path.join(d, "routing.json")
    if not os.path.exists(path):
        return []
    r = json.load(open(path))
    pts = r["points"]
    workloads = list(dict.fromkeys(p["workload"] for p in pts))
    fig, axes = plt.subplots(2, len(workloads), figsize=(4 * len(workloads), 7), squeeze=False)
    for i, w in enumerate(workloads):
        policies = list(dict.fromkeys(p["policy"] for p in pts if p["workload"] == w))
        for pol in policies:
            loads = sorted({p["load"] for p in pts if p["workload"] == w and p["policy"] == pol})
            if len(loads) < 2:
                # single-load ablations: a marker
                pass
            ttft = [med([p["ttft_ms"]["p90"] for p in pts
                         if p["workload"] == w and p["policy"] == pol and p["load"] == l]) for l in loads]
            good = [med([p["goodput_rps"] for p in pts
                         if p["workload"] == w and p["policy"] == pol and p["load"] == l]) for l in loads]
            style = "-o" if len(loads) > 1 else "*"
            axes[0][i].plot(loads, ttft, style, label=pol, markersize=8 if len(loads) == 1 else 5)
            axes[1][i].plot(loads, good, style, label=pol, markersize=8 if len(loads) == 1 else 5)
        axes[0][i].set_title(w)
        axes[0][i].set_yscale("log")
        axes[0][i].set_ylabel("p90 TTFT (ms)")
        axes[1][i].set_ylabel(f"goodput req/s (TTFT < {r['slo_ttft_ms']:.0f} ms)")
        for ax in (axes[0][i], axes[1][i]):
            ax.set_xlabel("load (fraction of est. round-robin capacity)")
            ax.grid(alpha=0.3)
        axes[0][i].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(d, "routing.png"), dpi=90)
    plt.close(fig)
    return ["routing.png"]


if __name__ == "__main__":
    d = sys.argv[1]
    for f in overhead(d) + routing(d):
        print(f)
