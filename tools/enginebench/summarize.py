#!/usr/bin/env python3
"""Summarize RESULT lines: all values per (engine, scenario) and medians."""
import sys, statistics
from collections import defaultdict

COLS = {
    "puts": ["cpu_us_per_put", "cpu_us_per_put_incl_drain", "bg_cpu_us_per_put_incl_drain", "wall_s", "wall_s_incl_drain",
             "peak_rss_mib", "threads_max", "max_commit_ms", "slow_commits", "files", "disk_mib",
             "io_wchar_mib", "io_write_mib",
             # runs engine only: run count at end, per-lookup counts (lookups past the memtable), compaction
             "runs", "lk_runs_in_snap", "lk_bloom_probes", "lk_block_reads", "lk_bloom_fp", "lk_cache_hit",
             "comp_cpu_s", "comp_written_mib", "stall_ms", "run_meta_mib"],
    "load1m": ["load_cpu_us_per_put", "load_wall_s", "rss_after_load_mib", "hwm_during_load_mib",
               "rss_after_drain_mib", "lookup_wall_us", "lookup_cpu_us", "rss_after_lookups_mib",
               "files", "disk_mib", "io_wchar_mib", "io_write_mib",
               "runs", "lk_runs_in_snap", "lk_bloom_probes", "lk_block_reads", "comp_cpu_s", "comp_written_mib", "stall_ms",
               "run_meta_mib"],
}
groups = defaultdict(list)
for path in sys.argv[1:]:
    for line in open(path):
        if not line.startswith("RESULT"):
            continue
        kv = dict(p.split("=", 1) for p in line.split()[1:])
        groups[(kv["scenario"], kv["engine"])].append(kv)
for scen in ("verify",):
    for (s, eng), runs in sorted(groups.items()):
        if s == scen:
            for r in runs:
                print(f"== verify / {eng}: puts={r['puts']} checks={r['verify_checks']} mismatches={r['verify_mismatches']}")
# puts1m / puts2m (run_runs.sh with EXT=1) are the puts scenario with other --preload/--puts, relabelled
scens = sorted({s for (s, _) in groups if s != "verify"}, key=lambda x: (x != "puts", x.startswith("load"), x))
for scen in scens:
    for (s, eng), runs in sorted(groups.items()):
        if s != scen:
            continue
        print(f"== {scen} / {eng}  (n={len(runs)})  cache_mib={runs[0]['cache_mib']} memtable_mib={runs[0]['memtable_mib']} persist={runs[0]['persist']}")
        for c in COLS["load1m" if scen.startswith("load") else "puts"]:
            if any(c not in r for r in runs):
                continue
            vals = [float(r[c]) for r in runs]
            print(f"  {c:28s} median={statistics.median(vals):9.2f}   all=" + " ".join(f"{v:.2f}" for v in vals))
