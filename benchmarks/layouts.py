"""Issue 13's table from a bench JSON timed in both layouts: every variant in NCHW and channels-last,
its faster layout, and the speed targets against plain (and DIA) each in their faster layout.

    python benchmarks/layouts.py benchmarks/speed-b32.json [more.json ...]

Targets (ResNet-110, CIFAR shape): MRLA-B <= 2.3x plain, MRLA-L <= 1.6x plain, ELA 50 % <= 0.85x DIA,
ELA 100 % <= 1.05x plain, and no peak memory per step above the NCHW figure of the same variant.
"""
import json
import statistics
import sys

TARGETS = [("MRLA-B", "plain", 2.3), ("MRLA-L", "plain", 1.6), ("ELA 50%", "DIA", 0.85), ("ELA 100%", "plain", 1.05)]

for path in sys.argv[1:]:
    report = json.load(open(path))
    s = report["settings"]
    load = report["machine"]["loadavg_1min"]
    print(f"\n{path}: batch {s['batch_size']}, {s['threads']} threads, {s['steps']} timed rounds, "
          f"1-min load {min(load):.1f}-{max(load):.1f}\n")
    print("| model | variant | layout | median ms | min-max ms | CPU s (median) | peak MB | faster |")
    print("|---|---|---|---|---|---|---|---|")
    best = {}
    for r in report["results"]:
        ts = r["step_times_s"]
        layout = "NHWC" if r["memory_format"] == "channels_last" else "NCHW"
        print(f"| {r['model']} | {r['variant']} | {layout} | {1e3 * r['median_step_s']:.0f} | {1e3 * min(ts):.0f}-{1e3 * max(ts):.0f} | "
              f"{r['median_cpu_s']:.2f} | {r['peak_memory_bytes'] / 2**20:.0f} | {'yes' if r['best_layout'] else ''} |")
        if r["best_layout"]:
            best[r["variant"]] = r
    print("\n| target | measured (wall) | measured (process CPU) | bound | met (wall / CPU) |\n|---|---|---|---|---|")
    for label, ref, bound in TARGETS:
        if label in best and ref in best:
            wall = best[label]["median_step_s"] / best[ref]["median_step_s"]
            cpu = best[label]["median_cpu_s"] / best[ref]["median_cpu_s"]
            met = lambda x: "yes" if x <= bound else "**no**"  # noqa: E731
            print(f"| {label} / {ref} (each in its faster layout) | {wall:.2f}x | {cpu:.2f}x | <= {bound}x | {met(wall)} / {met(cpu)} |")
    by = {(r["variant"], r["memory_format"]): r for r in report["results"]}
    for label in sorted({r["variant"] for r in report["results"]}):
        a, b = by.get((label, "contiguous")), by.get((label, "channels_last"))
        if a and b:
            print(f"| {label}: channels-last peak memory vs NCHW | {b['peak_memory_bytes'] / 2**20:.0f} MB vs "
                  f"{a['peak_memory_bytes'] / 2**20:.0f} MB | no more | {'yes' if b['peak_memory_bytes'] <= a['peak_memory_bytes'] else '**no**'} |")
