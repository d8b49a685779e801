"""Turn the raw runs into medians, ratios and target checks; write markdown and a plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .common import ratio, summary

TARGET_MIB = 1024
METHODS = ("imgmig", "disk-style", "store-and-forward", "floor", "imgmig-tls-off")  # as bench/realcriu.py


def _median(s: dict[str, Any] | None) -> float | None:
    return s.get("median") if s else None


def _target_size(results: dict[str, Any]) -> int:
    sizes = results["plan"]["sizes"]
    return TARGET_MIB if TARGET_MIB in sizes else max(sizes)


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    runs = results.get("migrations") or []
    ftr: dict[str, dict[str, dict[str, Any]]] = {}
    felt: dict[str, dict[str, dict[str, Any]]] = {}
    dump: dict[str, dict[str, dict[str, Any]]] = {}
    for mib in results["plan"]["sizes"]:
        for mode in results["plan"]["modes"]:
            key = f"{mib}/{mode}"
            ftr[key], felt[key], dump[key] = {}, {}, {}
            for method in METHODS:
                sel = [r for r in runs if r["mib"] == mib and r["mode"] == mode and r["method"] == method]
                if sel:
                    ftr[key][method] = summary([r["total_s"] for r in sel])
                    felt[key][method] = summary([r["felt_gap_s"] for r in sel if "felt_gap_s" in r])
                    dump[key][method] = summary([r["dump_s"] for r in sel])
            m = {k: _median(v) for k, v in ftr[key].items()}
            d = {k: _median(v) for k, v in dump[key].items()}
            ftr[key]["ratios"] = {
                "imgmig/disk-style": ratio(m.get("imgmig"), m.get("disk-style")),
                "imgmig/store-and-forward": ratio(m.get("imgmig"), m.get("store-and-forward")),
                "imgmig/floor": ratio(m.get("imgmig"), m.get("floor")),
                "TLS on/off": ratio(m.get("imgmig"), m.get("imgmig-tls-off")),
            }
            dump[key]["ratios"] = {
                "streaming dump into proxy / dump to tmpfs": ratio(d.get("imgmig"), d.get("floor")),
                "dump into proxy (forwarding held) / dump to tmpfs": ratio(d.get("store-and-forward"), d.get("floor")),
            }
    if runs:
        out["freeze_to_running"] = ftr
        out["felt_gap"] = felt
        out["loadavg_1m"] = summary([r["loadavg_1m"] for r in runs if "loadavg_1m" in r])
        out["dump"] = dump
        out["phases"] = _phases(results, runs)
    sim = results.get("simulated") or {}
    link = dict(results.get("link") or {})
    if "socat_128k_runs_MBps" in link:
        link["socat_128k_MBps"] = summary(link.pop("socat_128k_runs_MBps"))
    if sim.get("throughput"):
        link["imgmig_sim_MBps"] = summary([r["link_MBps"] for r in sim["throughput"]])
        link["imgmig_sim_end_to_end_MBps"] = summary([r["end_to_end_MBps"] for r in sim["throughput"]])
    plain = (results.get("simulated_tls_off") or {}).get("throughput") or []
    if plain:
        link["imgmig_sim_tls_off_MBps"] = summary([r["link_MBps"] for r in plain])
        if "imgmig_sim_MBps" in link:
            link["ratio_tls_on/off"] = ratio(link["imgmig_sim_MBps"]["median"],
                                             link["imgmig_sim_tls_off_MBps"]["median"])
    size = _target_size(results) if runs else None
    real = [r for r in runs if r["method"] == "imgmig" and r["mib"] == size and r["mode"] == "warm"]
    if real and all("link_MBps" in r for r in real):
        link["imgmig_real_dump_MBps"] = summary([r["link_MBps"] for r in real])
    if "socat_128k_MBps" in link and "imgmig_sim_MBps" in link:
        link["ratio_imgmig_sim/socat"] = ratio(link["imgmig_sim_MBps"]["median"], link["socat_128k_MBps"]["median"])
    out["link"] = link
    daemons: dict[str, Any] = {}
    for label, rows in (("simulated", sim.get("throughput") or []), ("simulated, TLS off", plain), ("real", real)):
        for name in ("proxy", "cache"):
            figs = [r["daemons"][name] for r in rows if "daemons" in r and r["daemons"][name].get("cpu_s_per_GB")]
            if figs:
                daemons[f"{name} ({label})"] = {
                    "cpu_s_per_GB": summary([f["cpu_s_per_GB"] for f in figs]),
                    "peak_rss_beyond_images_MiB": max(f["peak_rss_beyond_images_MiB"] for f in figs),
                    "baseline_rss_MiB": min(f["baseline_rss_MiB"] for f in figs),
                    "peak_images_held_MiB": max(f["peak_images_held_MiB"] for f in figs),
                    "peak_rss_shmem_MiB": max(f["peak_rss_shmem_MiB"] for f in figs),
                }
    out["daemons"] = daemons
    if sim.get("small_files"):
        out["small_files"] = summary([r["files_per_s"] for r in sim["small_files"]])
    if sim.get("concurrency"):
        out["concurrency"] = {
            "one_MBps": summary([r["one"]["aggregate_MBps"] for r in sim["concurrency"]]),
            "four_MBps": summary([r["four"]["aggregate_MBps"] for r in sim["concurrency"]]),
            "ratio": summary([r["ratio"] for r in sim["concurrency"]]),
        }
    out["targets"] = _targets(out, size)
    return out


def _phases(results: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of each phase's end, seconds after the dump started: where the time goes."""
    phases: dict[str, Any] = {}
    for mib in results["plan"]["sizes"]:
        for mode in results["plan"]["modes"]:
            row: dict[str, Any] = {}
            for method in METHODS:
                sel = [r for r in runs if r["mib"] == mib and r["mode"] == mode and r["method"] == method]
                if not sel:
                    continue
                moved = [r.get("link_s", r.get("copied_at_s")) for r in sel]
                row[method] = {
                    "dump": summary([r["dump_s"] for r in sel]),
                    "moved": summary([m for m in moved if m is not None]) if all(m is not None for m in moved)
                    else None,
                    "restore_after_moved": summary([r["total_s"] - m for r, m in zip(sel, moved, strict=True)])
                    if all(m is not None for m in moved) else summary([r["total_s"] - r["dump_s"] for r in sel]),
                }
            phases[f"{mib}/{mode}"] = row
    return phases


def _targets(s: dict[str, Any], size: int | None) -> list[dict[str, Any]]:
    t: list[dict[str, Any]] = []

    def add(name: str, value: float | None, op: str, bound: float) -> None:
        met = None if value is None else (value <= bound if op == "<=" else value >= bound)
        t.append({"target": name, "value": value, "bound": f"{op} {bound}", "met": met})

    key = f"{size}/warm"
    r = (s.get("freeze_to_running") or {}).get(key, {}).get("ratios", {})
    add(f"freeze-to-running imgmig / disk-style ({key})", r.get("imgmig/disk-style"), "<=", 0.65)
    add(f"freeze-to-running imgmig / store-and-forward ({key})", r.get("imgmig/store-and-forward"), "<=", 0.75)
    add(f"freeze-to-running imgmig / floor ({key})", r.get("imgmig/floor"), "<=", 1.3)
    add(f"freeze-to-running TLS on / TLS off ({key})", r.get("TLS on/off"), "<=", 1.15)
    add("proxy-to-cache throughput (sim) TLS on / TLS off", s["link"].get("ratio_tls_on/off"), ">=", 0.7)
    d = (s.get("dump") or {}).get(key, {}).get("ratios", {})
    add(f"dump into proxy (forwarding held) / dump to tmpfs ({key})",
        d.get("dump into proxy (forwarding held) / dump to tmpfs"), "<=", 1.15)
    add(f"streaming dump into proxy / dump to tmpfs ({key})",
        d.get("streaming dump into proxy / dump to tmpfs"), "<=", 1.15)
    add("proxy-to-cache throughput (sim, 1 GiB) / socat 128K", s["link"].get("ratio_imgmig_sim/socat"), ">=", 0.9)
    for name, figs in s.get("daemons", {}).items():
        add(f"{name} CPU-s per GB", figs["cpu_s_per_GB"]["median"], "<=", 0.5)
        add(f"{name} peak RSS beyond image bytes, MiB", figs["peak_rss_beyond_images_MiB"], "<=", 64)
    add("10,000 small files, files/s end to end", _median(s.get("small_files")), ">=", 5000)
    add("four concurrent checkpoints, aggregate / one", _median((s.get("concurrency") or {}).get("ratio")),
        ">=", 0.8)
    return t


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, dict):
        if "median" not in v:
            return "n/a"
        return f"{v['median']:.{digits}f} ({v['min']:.{digits}f}-{v['max']:.{digits}f})"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def markdown(results: dict[str, Any]) -> str:
    s = results["summary"]
    lines = ["# imgmig benchmark", "",
             f"Run {results['started']}, {results.get('elapsed_s', 0):.0f} s; machine {results['machine']}; "
             f"plan {results['plan']}.", "",
             "Medians with (min-max) over the repetitions; seconds unless stated.", ""]
    if s.get("loadavg_1m", {}).get("n"):
        lines += [f"Load average (1 min) on this 2-core machine during the runs: {_fmt(s['loadavg_1m'], 1)}; "
                  "other work shared the machine, so compare figures within this run only.", ""]
    if "freeze_to_running" in s:
        lines += ["## 1. Freeze to running (start of `criu dump` until `criu restore -d` returned)", "",
                  "| size MiB | memory | imgmig | disk-style | store-and-forward | floor | imgmig, tls off | "
                  "imgmig/disk | imgmig/s&f | imgmig/floor | TLS on/off |", "|---" * 11 + "|"]
        for key, row in s["freeze_to_running"].items():
            mib, mode = key.split("/")
            r = row["ratios"]
            lines.append(f"| {mib} | {mode} | " + " | ".join(_fmt(row.get(m)) for m in METHODS) + " | "
                         + " | ".join(_fmt(r[k]) for k in ("imgmig/disk-style", "imgmig/store-and-forward",
                                                           "imgmig/floor", "TLS on/off")) + " |")
        lines += ["", "### Downtime felt by the process (longest gap between the workload's 2 ms ticks, "
                  "CLOCK_REALTIME)", "",
                  "The workload's ticker thread keeps the longest gap between its ticks, read after the restore; "
                  "it is the stall the process itself lived through, from its last tick before the freeze to its "
                  "first after the restore. CLOCK_MONOTONIC would hide it (CRIU restores it through a time "
                  "namespace).", "",
                  "| size MiB | memory | " + " | ".join(METHODS) + " |", "|---" * (2 + len(METHODS)) + "|"]
        for key, row in s["felt_gap"].items():
            mib, mode = key.split("/")
            lines.append(f"| {mib} | {mode} | " + " | ".join(_fmt(row.get(m)) for m in METHODS) + " |")
        lines += ["", "### Where the time goes (medians, seconds after `criu dump` started)", "",
                  "'moved': imgmig and store-and-forward, the cache logged the checkpoint complete and verified "
                  "(timed by the cache from CHECKPOINT_BEGIN); disk-style, tar|socat finished on B. 'restore': "
                  "from then until `criu restore -d` returned (floor: from the end of the dump).", "",
                  "| size MiB | memory | method | dump ended | moved | restore |", "|---|---|---|---|---|---|"]
        for key, row in s["phases"].items():
            mib, mode = key.split("/")
            for method, ph in row.items():
                lines.append(f"| {mib} | {mode} | {method} | {_fmt(ph['dump'])} | {_fmt(ph['moved'])} | "
                             f"{_fmt(ph['restore_after_moved'])} |")
        lines += ["", "## 2. Dump cost (`criu dump` duration)", "",
                  "| size MiB | memory | --stream into proxy (streaming) | --stream into proxy (forwarding held) | "
                  "-D tmpfs (floor runs) | -D tmpfs (disk-style runs) | streaming/tmpfs | held/tmpfs |",
                  "|---|---|---|---|---|---|---|---|"]
        for key, row in s["dump"].items():
            mib, mode = key.split("/")
            r = row["ratios"]
            lines.append(f"| {mib} | {mode} | {_fmt(row.get('imgmig'))} | {_fmt(row.get('store-and-forward'))} | "
                         f"{_fmt(row.get('floor'))} | {_fmt(row.get('disk-style'))} | "
                         f"{_fmt(r['streaming dump into proxy / dump to tmpfs'])} | "
                         f"{_fmt(r['dump into proxy (forwarding held) / dump to tmpfs'])} |")
    link = s.get("link", {})
    lines += ["", "## 3. Link A -> B (MB/s)", "", "| what | MB/s |", "|---|---|",
              f"| imgmig proxy-to-cache, simulated 1 GiB, TLS on (cache: CHECKPOINT_BEGIN to verified end) | "
              f"{_fmt(link.get('imgmig_sim_MBps'), 0)} |",
              f"| the same with tls: off (no encryption: sendfile and splice) | "
              f"{_fmt(link.get('imgmig_sim_tls_off_MBps'), 0)} |",
              f"| ratio TLS on / TLS off, simulated proxy-to-cache | {_fmt(link.get('ratio_tls_on/off'))} |",
              f"| imgmig end to end, simulated (dump start to last byte read by the restore) | "
              f"{_fmt(link.get('imgmig_sim_end_to_end_MBps'), 0)} |",
              f"| imgmig proxy-to-cache during the real 1 GiB dumps (bounded by CRIU's dump rate) | "
              f"{_fmt(link.get('imgmig_real_dump_MBps'), 0)} |",
              f"| socat -b 131072, tmpfs file to tmpfs file | {_fmt(link.get('socat_128k_MBps'), 0)} |",
              f"| iperf3 (3 s) | {_fmt(link.get('iperf3_MBps'), 0)} |",
              f"| ratio imgmig (simulated) / socat | {_fmt(link.get('ratio_imgmig_sim/socat'))} |"]
    lines += ["", "## 4. Daemons: CPU and memory",
              "", "CPU: user+system seconds of the whole daemon (all threads, /proc/PID/stat) over one checkpoint, "
              "per GB of image bytes. Memory: image bytes live in memfds, which are not RSS except while mapped "
              "for the digest (RssShmem); 'beyond images' is the peak of RssAnon+RssFile sampled every 10 ms; "
              "image bytes held are the sizes of the daemon's open memfds.", "",
              "| daemon | CPU-s per GB | peak RSS beyond images MiB | idle RSS MiB | peak RssShmem MiB | "
              "peak image bytes held MiB |", "|---|---|---|---|---|---|"]
    for name, f in s.get("daemons", {}).items():
        lines.append(f"| {name} | {_fmt(f['cpu_s_per_GB'])} | {f['peak_rss_beyond_images_MiB']:.1f} | "
                     f"{f['baseline_rss_MiB']:.1f} | {f['peak_rss_shmem_MiB']:.1f} | {f['peak_images_held_MiB']:.0f} |")
    lines += ["", "## 5-6. Simulated CRIU clients", "", "| what | value |", "|---|---|",
              f"| {results['plan']['small_files']} files of 4 KiB through proxy, cache and serve, files/s | "
              f"{_fmt(s.get('small_files'), 0)} |"]
    conc = s.get("concurrency")
    if conc:
        lines += [f"| one checkpoint of {results['plan']['concurrent_mib']} MiB, MB/s | {_fmt(conc['one_MBps'], 0)} |",
                  f"| four at once, aggregate MB/s | {_fmt(conc['four_MBps'], 0)} |",
                  f"| four / one | {_fmt(conc['ratio'])} |"]
    lines += ["", "## Targets", "", "| target | value | bound | met |", "|---|---|---|---|"]
    for t in s["targets"]:
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "NO")
        lines.append(f"| {t['target']} | {_fmt(t['value'])} | {t['bound']} | {met} |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = results["summary"]["freeze_to_running"]
    sizes = results["plan"]["sizes"]
    modes = results["plan"]["modes"]
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        for method, marker in zip(METHODS, "osD^v", strict=True):
            xs, ys, lo, hi = [], [], [], []
            for mib in sizes:
                v = s.get(f"{mib}/{mode}", {}).get(method)
                if v and "median" in v:
                    xs.append(mib)
                    ys.append(v["median"])
                    lo.append(v["median"] - v["min"])
                    hi.append(v["max"] - v["median"])
            if xs:
                ax.errorbar(xs, ys, yerr=[lo, hi], marker=marker, capsize=3, label=method)
        ax.set_title(f"freeze to running, {mode} memory")
        ax.set_xlabel("process size (MiB)")
        ax.set_ylabel("seconds (median, min-max)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
