"""Turn the raw runs into medians, ratios and target checks; write markdown and a plot."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .common import GB, ratio, summary

TARGET_MIB = 1024
FULL_COPY = ("imgmig", "disk-style", "store-and-forward", "floor", "imgmig-tls-off")  # as bench/realcriu.py
METHODS = (*FULL_COPY, "lazy")


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
    for mib in _all_sizes(results):
        for mode in results["plan"]["modes"]:
            key = f"{mib}/{mode}"
            if not any(r["mib"] == mib and r["mode"] == mode for r in runs):
                continue
            ftr[key], felt[key], dump[key] = {}, {}, {}
            for method in METHODS:
                sel = [r for r in runs if r["mib"] == mib and r["mode"] == mode and r["method"] == method]
                if sel:
                    ftr[key][method] = summary([r["total_s"] for r in sel])
                    felt[key][method] = summary([r["felt_gap_s"] for r in sel if "felt_gap_s" in r])
                    if method in FULL_COPY:  # lazy's dump hands only the non-page images on
                        dump[key][method] = summary([r["dump_s"] for r in sel])
            m = {k: _median(v) for k, v in ftr[key].items()}
            d = {k: _median(v) for k, v in dump[key].items()}
            # issue 11's ratios are TLS off: imgmig-tls-off against store-and-forward (tls: off too),
            # CRIU alone and disk-style; TLS on/off is the trust issue's
            ftr[key]["ratios"] = {
                "imgmig tls off/disk-style": ratio(m.get("imgmig-tls-off"), m.get("disk-style")),
                "imgmig tls off/store-and-forward": ratio(m.get("imgmig-tls-off"), m.get("store-and-forward")),
                "imgmig tls off/floor": ratio(m.get("imgmig-tls-off"), m.get("floor")),
                "TLS on/off": ratio(m.get("imgmig"), m.get("imgmig-tls-off")),
                "lazy/floor": ratio(m.get("lazy"), m.get("floor")),
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
        out["prepare"] = _prepare(results, runs)
    if any(r["method"] == "lazy" for r in runs):
        out["lazy"] = _lazy(results, runs, ftr)
    sim = results.get("simulated") or {}
    sim_off = results.get("simulated_tls_off") or {}
    link = dict(results.get("link") or {})
    if "socat_128k_runs_MBps" in link:
        link["socat_128k_MBps"] = summary(link.pop("socat_128k_runs_MBps"))
    if sim.get("throughput"):
        link["imgmig_sim_MBps"] = summary([r["link_MBps"] for r in sim["throughput"]])
        link["imgmig_sim_end_to_end_MBps"] = summary([r["end_to_end_MBps"] for r in sim["throughput"]])
    plain = sim_off.get("throughput") or []
    if plain:
        link["imgmig_sim_tls_off_MBps"] = summary([r["link_MBps"] for r in plain])
        if "imgmig_sim_MBps" in link:
            link["ratio_tls_on/off"] = ratio(link["imgmig_sim_MBps"]["median"],
                                             link["imgmig_sim_tls_off_MBps"]["median"])
    size = _target_size(results) if runs else None
    real = {(method, mode): [r for r in runs if r["method"] == method and r["mib"] == size and r["mode"] == mode]
            for method in ("imgmig", "imgmig-tls-off", "store-and-forward") for mode in results["plan"]["modes"]}
    warm = real.get(("imgmig", "warm")) or []
    if warm and all("link_MBps" in r for r in warm):
        link["imgmig_real_dump_MBps"] = summary([r["link_MBps"] for r in warm])
    if "socat_128k_MBps" in link:
        for name in ("imgmig_sim", "imgmig_sim_tls_off"):
            if f"{name}_MBps" in link:
                link[f"ratio_{name}/socat"] = ratio(link[f"{name}_MBps"]["median"], link["socat_128k_MBps"]["median"])
    out["link"] = link
    sources = [("simulated, TLS on", sim.get("throughput") or []), ("simulated, TLS off", plain)]
    sources += [(f"real, {REAL_LABELS[method]}, {size} MiB {mode}", rows) for (method, mode), rows in real.items()]
    daemons: dict[str, Any] = {}
    for label, rows in sources:
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
    # small files and concurrency run on the TLS-off pair (issue 11's targets are TLS off)
    many = sim if sim.get("small_files") and not sim_off.get("small_files") else sim_off  # "on": older runs
    out["simulated_tls"] = "off" if many is sim_off else "on"
    if many.get("small_files"):
        out["small_files"] = summary([r["files_per_s"] for r in many["small_files"]])
    if many.get("concurrency"):
        out["concurrency"] = {
            "one_MBps": summary([r["one"]["aggregate_MBps"] for r in many["concurrency"]]),
            "four_MBps": summary([r["four"]["aggregate_MBps"] for r in many["concurrency"]]),
            "ratio": summary([r["ratio"] for r in many["concurrency"]]),
        }
    out["targets"] = _targets(out, size, results["plan"])
    return out


def _all_sizes(results: dict[str, Any]) -> list[int]:
    """The sizes that have runs (full-copy and lazy sizes differ)."""
    return sorted({r["mib"] for r in results.get("migrations") or []})


def _lazy(results: dict[str, Any], runs: list[dict[str, Any]], ftr: dict[str, Any]) -> dict[str, Any]:
    """Per size: the lazy runs' figures, and their time until every page arrived against
    the full-copy imgmig runs of the same size and mode (where the plan has them)."""
    mode = results["plan"]["lazy_mode"]
    out: dict[str, Any] = {"mode": mode, "sizes": {}}
    for mib in results["plan"]["lazy_sizes"]:
        sel = [r for r in runs if r["method"] == "lazy" and r["mib"] == mib]
        if not sel:
            continue
        full = _median(ftr.get(f"{mib}/{mode}", {}).get("imgmig"))
        copied = [r for r in sel if r["every_page_s"] is not None]  # stopped runs (4 GiB) did not wait for it
        single = [r["requests_by_pages"].get("1", 0) / r["requests"] for r in copied if r["requests"]]
        out["sizes"][str(mib)] = {
            "freeze_to_running": summary([r["total_s"] for r in sel]),
            "images_handed": summary([r["dump_s"] for r in sel]),
            "claimed": summary([r["claimed_s"] for r in sel]),
            "felt_gap": summary([r["felt_gap_s"] for r in sel]),
            "copy_stopped": any(r.get("stopped") for r in sel),
            "every_page": summary([r["every_page_s"] for r in copied]),
            "copy_MBps": summary([r["pages_bytes"] / r["copy_s"] / 1e6 for r in copied]),
            "touch_before_per_s": summary([r["touch_before_per_s"] for r in sel if r["touch_before_per_s"]]),
            "touch_during_copy_per_s": summary([r["touch_during_copy_per_s"] for r in copied
                                                if r["touch_during_copy_per_s"] is not None]),
            "throughput_during/before": summary([r["touch_during_copy_per_s"] / r["touch_before_per_s"]
                                                 for r in copied if r["touch_before_per_s"]
                                                 and r["touch_during_copy_per_s"] is not None]),
            "requests": summary([r["requests"] for r in copied]),
            "single_page_share": summary(single),
            "imgmig_full_copy": full,
            # each run's time to the last page over the full-copy median: the spread of the ratio
            "every_page/imgmig": summary([r["every_page_s"] / full for r in copied]) if full and copied else None,
        }
    sizes = out["sizes"]
    small, large = min(results["plan"]["lazy_sizes"]), max(results["plan"]["lazy_sizes"])
    out["ratios"] = {} if small == large else {
        f"freeze-to-running {large} MiB / {small} MiB": ratio(
            _median(sizes.get(str(large), {}).get("freeze_to_running")),
            _median(sizes.get(str(small), {}).get("freeze_to_running"))),
    }
    return out


def _phases(results: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of each phase's end, seconds after the dump started: where the time goes."""
    phases: dict[str, Any] = {}
    for mib in results["plan"]["sizes"]:
        for mode in results["plan"]["modes"]:
            row: dict[str, Any] = {}
            for method in FULL_COPY:
                sel = [r for r in runs if r["mib"] == mib and r["mode"] == mode and r["method"] == method]
                if not sel:
                    continue
                moved = [_moved_at(r) for r in sel]
                row[method] = {
                    "dump": summary([r["dump_s"] for r in sel]),
                    "moved": summary([m for m in moved if m is not None]) if all(m is not None for m in moved)
                    else None,
                    "restore_after_moved": summary([r["total_s"] - m for r, m in zip(sel, moved, strict=True)])
                    if all(m is not None for m in moved) else summary([r["total_s"] - r["dump_s"] for r in sel]),
                    # free page reporting: memory the VM gave its host back while the run was timed
                    "vm_reported_MiB": summary([r["vm_reported_MiB"] for r in sel if "vm_reported_MiB" in r]),
                }
                if method == "store-and-forward" and all(r.get("link_s") is not None for r in sel):
                    # what streaming can win at most: the whole transfer hidden, dump and restore as fast
                    row[method]["transfer"] = summary([r["link_s"] for r in sel])
                    row[method]["overlap_bound"] = summary([(r["total_s"] - r["link_s"]) / r["total_s"] for r in sel])
            phases[f"{mib}/{mode}"] = row
    return phases


def _prepare(results: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """imgmig's `prepare` before the freeze (bench/realcriu.py): its time, and each daemon's
    CPU for it per GB of the checkpoint that followed, by size, memory and method."""
    out: dict[str, Any] = {}
    for mib in _all_sizes(results):
        for mode in results["plan"]["modes"]:
            for method in ("imgmig", "imgmig-tls-off"):
                sel = [r for r in runs if r["mib"] == mib and r["mode"] == mode and r["method"] == method
                       and "prepare_s" in r and r.get("image_bytes")]
                if sel:
                    out.setdefault(f"{mib}/{mode}", {})[method] = {
                        "seconds": summary([r["prepare_s"] for r in sel]),
                        **{f"{name}_cpu_s_per_GB": summary([r["prepare_cpu_s"][name] / (r["image_bytes"] / GB)
                                                            for r in sel]) for name in ("proxy", "cache")}}
    return out


def _moved_at(run: dict[str, Any]) -> float | None:
    """When the images were all on B, seconds after the dump started. The cache times a
    checkpoint from its CHECKPOINT_BEGIN, which store-and-forward sends only once the dump
    ended: its transfer is added to the dump's duration."""
    if run["method"] == "store-and-forward" and run.get("link_s") is not None:
        return run["dump_s"] + run["link_s"]
    return run.get("link_s", run.get("copied_at_s"))


REAL_LABELS = {"imgmig": "TLS on", "imgmig-tls-off": "TLS off", "store-and-forward": "store-and-forward, TLS off"}
ISSUE_11 = "issue 11: full copy, TLS off"
TRUST = "trust issue (7): TLS on against TLS off"
LAZY = "issue 10: lazy migration"


def _targets(s: dict[str, Any], size: int | None, plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target as its issue states it, tagged with the issue ('issue'); no other rows."""
    t: list[dict[str, Any]] = []

    def adder(issue: str) -> Any:
        def add(name: str, value: float | None, op: str, bound: float) -> None:
            met = None if value is None else (value <= bound if op == "<=" else value >= bound)
            t.append({"issue": issue, "target": name, "value": value, "bound": f"{op} {bound}", "met": met})
        return add

    _issue_11_targets(s, adder(ISSUE_11), size, plan)
    trust = adder(TRUST)
    key = f"{size}/warm"
    r = (s.get("freeze_to_running") or {}).get(key, {}).get("ratios", {})
    trust(f"freeze-to-running imgmig TLS on / TLS off ({key})", r.get("TLS on/off"), "<=", 1.15)
    trust(f"proxy-to-cache throughput (simulated, {plan['sim_mib']} MiB) TLS on / TLS off",
          s["link"].get("ratio_tls_on/off"), ">=", 0.7)
    _lazy_targets(s, adder(LAZY), size)
    return t


def _issue_11_targets(s: dict[str, Any], add: Any, size: int | None, plan: dict[str, Any]) -> None:
    """Issue 11, item 4 (at `size`, 1 GiB by default, in both memory modes, TLS off; the
    other full-copy sizes "within the same ratios") and item 5 (no regressions)."""
    sizes = sorted(plan["sizes"], key=lambda mib: mib != size)  # the target size first
    for mib in sizes:
        for mode in plan["modes"]:
            key = f"{mib}/{mode}"
            r = (s.get("freeze_to_running") or {}).get(key, {}).get("ratios")
            if r is None:
                continue
            add(f"freeze-to-running imgmig / store-and-forward ({key})", r["imgmig tls off/store-and-forward"],
                "<=", 0.75)
            add(f"freeze-to-running imgmig / floor (CRIU alone) ({key})", r["imgmig tls off/floor"], "<=", 1.3)
            add(f"freeze-to-running imgmig / disk-style ({key})", r["imgmig tls off/disk-style"], "<=", 0.5)
    add(f"proxy-to-cache throughput (simulated, TLS off, {plan['sim_mib']} MiB) / socat 128K",
        s["link"].get("ratio_imgmig_sim_tls_off/socat"), ">=", 0.9)
    # each daemon, from the simulated TLS-off runs and the real imgmig, tls off migrations
    labels = ["simulated, TLS off", *(f"real, TLS off, {size} MiB {mode}" for mode in plan["modes"])]
    daemons = {f"{name} ({label})": s.get("daemons", {}).get(f"{name} ({label})")
               for label in labels for name in ("proxy", "cache")}
    for name, figs in daemons.items():
        add(f"{name} CPU-s per GB", _median(figs and figs["cpu_s_per_GB"]), "<=", 0.5)
    tls = f"simulated, TLS {s.get('simulated_tls', 'off')}"
    add(f"{plan['small_files']:,} small files, files/s end to end ({tls})", _median(s.get("small_files")),
        ">=", 5000)
    add(f"four concurrent checkpoints, aggregate / one ({tls})",
        _median((s.get("concurrency") or {}).get("ratio")), ">=", 0.8)
    for name, figs in daemons.items():
        add(f"{name} peak RSS beyond image bytes, MiB", figs and figs["peak_rss_beyond_images_MiB"], "<=", 64)


def _lazy_targets(s: dict[str, Any], add: Any, size: int | None) -> None:
    """Issue 10's targets, from the same run."""
    lazy = s.get("lazy")
    if not lazy:
        return
    key = f"{size}/{lazy['mode']}"
    at = lazy["sizes"].get(str(size), {})
    add(f"lazy freeze-to-running, s ({key})", _median(at.get("freeze_to_running")), "<=", 0.3)
    add(f"lazy freeze-to-running / floor ({key})",
        (s.get("freeze_to_running") or {}).get(key, {}).get("ratios", {}).get("lazy/floor"), "<=", 0.25)
    for name, value in lazy["ratios"].items():
        add(f"lazy {name}", value, "<=", 1.5)
    add(f"lazy longest felt stall, s ({key})", _median(at.get("felt_gap")), "<=", 0.5)
    for mib, figures in lazy["sizes"].items():
        if figures["every_page/imgmig"]:  # no full-copy runs at lazy-only sizes (4 GiB)
            add(f"lazy every page / imgmig full copy ({mib}/{lazy['mode']})",
                _median(figures["every_page/imgmig"]), "<=", 2)


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
             "Medians with (min-max) over the repetitions; seconds unless stated.", "", *_time_spent(results)]
    if s.get("loadavg_1m", {}).get("n"):
        lines += [f"Load average (1 min) on this 2-core machine during the runs: {_fmt(s['loadavg_1m'], 1)}; "
                  "other work shared the machine, so compare figures within this run only.", ""]
    if "freeze_to_running" in s:
        lines += ["## 1. Freeze to running (start of `criu dump` until `criu restore -d` returned)", "",
                  "imgmig runs with TLS on (as shipped) and, as 'imgmig, tls off', on a pair with `tls: off`; "
                  "store-and-forward runs with `tls: off`, like issue 11's targets. The ratios are issue 11's "
                  "(imgmig TLS off against each baseline) and the trust issue's (TLS on / off).", "",
                  "| size MiB | memory | imgmig (TLS on) | disk-style | store-and-forward (TLS off) | floor | "
                  "imgmig, tls off | lazy (TLS on) | tls off/disk | tls off/s&f | tls off/floor | TLS on/off | "
                  "lazy/floor |", "|---" * 13 + "|"]
        for key, row in s["freeze_to_running"].items():
            mib, mode = key.split("/")
            r = row["ratios"]
            lines.append(f"| {mib} | {mode} | " + " | ".join(_fmt(row.get(m)) for m in METHODS) + " | "
                         + " | ".join(_fmt(r[k]) for k in ("imgmig tls off/disk-style",
                                                           "imgmig tls off/store-and-forward",
                                                           "imgmig tls off/floor", "TLS on/off", "lazy/floor"))
                         + " |")
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
        if "lazy" in s:
            lines += _lazy_markdown(s["lazy"], results["plan"]["lazy_touch_per_s"],
                                    results["plan"].get("lazy_untouched_from_mib"),
                                    results["plan"].get("lazy_stopped_from_mib"))
        lines += ["", "### Where the time goes (medians, seconds after `criu dump` started)", "",
                  "'moved': imgmig and store-and-forward, the cache logged the checkpoint complete and verified "
                  "(timed by the cache from CHECKPOINT_BEGIN, which store-and-forward sends when the dump "
                  "ended: its transfer is added to the dump's duration); disk-style, tar|socat finished on B. "
                  "'restore': from then until `criu restore -d` returned (floor: from the end of the dump). "
                  "'handed back': MiB this VM gave back to its host (free page reporting, `reported_kib`) from "
                  "just before the dump until the restored process was checked; memory handed back is faulted in "
                  "again from the host when the run allocates it (bench/README.md, 'The warm/cold inversion').", "",
                  "| size MiB | memory | method | dump ended | moved | restore | handed back MiB |",
                  "|---|---|---|---|---|---|---|"]
        lines += _method_rows(s["phases"], lambda ph: [_fmt(ph["dump"]), _fmt(ph["moved"]),
                                                        _fmt(ph["restore_after_moved"]),
                                                        _fmt(ph.get("vm_reported_MiB"), 0)])
        lines += ["", "Overlap bound: store-and-forward's freeze-to-running without its transfer, over the whole, "
                  "per run (median, min-max): the imgmig / store-and-forward ratio that hiding the transfer "
                  "entirely would give, if imgmig's dump and restore took as long as store-and-forward's. Below "
                  "it, imgmig must also dump or restore faster (bench/README.md, 'Writing in place').", "",
                  "| size MiB | memory | store-and-forward's transfer, s | overlap bound |", "|---|---|---|---|"]
        for key, row in s["phases"].items():
            mib, mode = key.split("/")
            ph = row.get("store-and-forward") or {}
            if "overlap_bound" in ph:
                lines.append(f"| {mib} | {mode} | {_fmt(ph['transfer'])} | {_fmt(ph['overlap_bound'])} |")
        if s.get("prepare"):
            lines += ["", "### Memory made ready before the freeze (imgmig only, outside freeze-to-running)", "",
                      "What `imgmig migrate` does before it freezes the process, and so what these runs do: the "
                      "proxy's `prepare` makes both daemons allocate a memfd of the workload's resident size "
                      "(ImageStore.prepare, PREPARE in docs/protocol.md), into which the pages are then written. "
                      "Its time comes before the freeze; the daemons' CPU for it is not in section 4's CPU per GB "
                      "and is given here, per GB of the checkpoint. Store-and-forward stands for tools that do "
                      "not prepare, and its pair is not asked.", "",
                      "| size MiB | memory | method | prepare, s | proxy CPU-s per GB | cache CPU-s per GB |",
                      "|---|---|---|---|---|---|"]
            lines += _method_rows(s["prepare"], lambda pr: [_fmt(pr["seconds"]), _fmt(pr["proxy_cpu_s_per_GB"]),
                                                             _fmt(pr["cache_cpu_s_per_GB"])])
        lines += ["", "## 2. Dump cost (`criu dump` duration)", "",
                  "| size MiB | memory | --stream into proxy (streaming, TLS on) | --stream into proxy (forwarding "
                  "held, TLS off) | "
                  "-D tmpfs (floor runs) | -D tmpfs (disk-style runs) | streaming/tmpfs | held/tmpfs |",
                  "|---|---|---|---|---|---|---|---|"]
        for key, row in s["dump"].items():
            if not set(row) & set(FULL_COPY):
                continue
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
              f"| ratio imgmig (simulated, TLS on) / socat | {_fmt(link.get('ratio_imgmig_sim/socat'))} |",
              f"| ratio imgmig (simulated, TLS off) / socat | {_fmt(link.get('ratio_imgmig_sim_tls_off/socat'))} |"]
    lines += ["", "## 4. Daemons: CPU and memory",
              "", "CPU: user+system seconds of the whole daemon (all threads, /proc/PID/stat) over one checkpoint, "
              "per GB of image bytes. Memory: image bytes live in memfds, which are not RSS except while mapped "
              "for the digest (RssShmem); 'beyond images' is the peak of RssAnon+RssFile sampled every 10 ms; "
              "image bytes held are the sizes of the daemon's open memfds. 'real': the imgmig (TLS on) and "
              "imgmig, tls off migrations at the target size, per memory mode.", "",
              "| daemon | CPU-s per GB | peak RSS beyond images MiB | idle RSS MiB | peak RssShmem MiB | "
              "peak image bytes held MiB |", "|---|---|---|---|---|---|"]
    for name, f in s.get("daemons", {}).items():
        lines.append(f"| {name} | {_fmt(f['cpu_s_per_GB'])} | {f['peak_rss_beyond_images_MiB']:.1f} | "
                     f"{f['baseline_rss_MiB']:.1f} | {f['peak_rss_shmem_MiB']:.1f} | {f['peak_images_held_MiB']:.0f} |")
    lines += ["", f"## 5-6. Simulated CRIU clients (TLS {s.get('simulated_tls', 'off')})", "", "| what | value |",
              "|---|---|",
              f"| {results['plan']['small_files']} files of 4 KiB through proxy, cache and serve, files/s | "
              f"{_fmt(s.get('small_files'), 0)} |"]
    conc = s.get("concurrency")
    if conc:
        lines += [f"| one checkpoint of {results['plan']['concurrent_mib']} MiB, MB/s | {_fmt(conc['one_MBps'], 0)} |",
                  f"| four at once, aggregate MB/s | {_fmt(conc['four_MBps'], 0)} |",
                  f"| four / one | {_fmt(conc['ratio'])} |"]
    lines += ["", "## Targets", "",
              f"### {ISSUE_11}", "",
              "As issue 11 states them: freeze-to-running at 1 GiB in both memory modes, every figure TLS off "
              "(imgmig, tls off against store-and-forward with `tls: off`, CRIU alone and disk-style); 256 MiB "
              "'within the same ratios'; the link, CPU and memory figures, and the no-regression ones (small files, "
              "concurrency, RSS).", "", *_target_table(s["targets"], ISSUE_11)]
    lines += ["", "### Other issues' targets, from the same run", "", f"#### {TRUST}", ""]
    lines += _target_table(s["targets"], TRUST)
    lines += ["", f"#### {LAZY}", "", *_target_table(s["targets"], LAZY)]
    return "\n".join(lines) + "\n"


def _method_rows(table: dict[str, dict[str, Any]], cells: Callable[[dict[str, Any]], list[str]]) -> list[str]:
    """A markdown row per size, memory mode and method of a {"MIB/MODE": {method: figures}} table."""
    rows = []
    for key, row in table.items():
        mib, mode = key.split("/")
        rows += [f"| {mib} | {mode} | {method} | " + " | ".join(cells(figures)) + " |"
                 for method, figures in row.items()]
    return rows


def _time_spent(results: dict[str, Any]) -> list[str]:
    """Where the run's time went: by part, and the runs' own set-up summed by kind (`setup_s`)."""
    parts = results.get("elapsed_by_part_s") or {}
    setup: dict[str, float] = {}
    for run in results.get("migrations") or []:
        for kind, seconds in run.get("setup_s", {}).items():
            setup[kind] = setup.get(kind, 0.0) + seconds
    if not parts:
        return []
    line = "Time by part: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in parts.items()) + "."
    if setup:
        largest_first = sorted(setup.items(), key=lambda kv: -kv[1])
        line += (" Of the migrations' wall time, set-up around what is measured: "
                 + ", ".join(f"{kind} {seconds:.0f} s" for kind, seconds in largest_first) + ".")
    return [line, ""]


def _target_table(targets: list[dict[str, Any]], issue: str) -> list[str]:
    lines = ["| target | value | bound | met |", "|---|---|---|---|"]
    for t in targets:
        if t["issue"] == issue:
            met = "n/a" if t["met"] is None else ("yes" if t["met"] else "NO")
            lines.append(f"| {t['target']} | {_fmt(t['value'])} | {t['bound']} | {met} |")
    return lines


def _lazy_markdown(lazy: dict[str, Any], touch: int, untouched_from: int | None,
                   stopped_from: int | None) -> list[str]:
    stopped = (f" From {stopped_from} MiB on the run stops the copy once the restore returned and the felt stall was "
               "read (from the first state line written 2 s after the restore; bench/README.md, 'Time'): every page "
               "is not waited for there (time budget), so 'every page', copy MB/s, reads/s during the copy and "
               "requests are not measured at that size." if stopped_from else "")
    without_reader = (f" From {untouched_from} MiB on the workload runs WITHOUT that reader (its page faults slow "
                      "the background copy, bench/README.md, 'Time'): reads/s is n/a there, and 'felt' counts the "
                      "freeze and the interpreter's own faults only." if untouched_from else "")
    lines = ["", f"### Lazy (post-copy) migration, {lazy['mode']} memory", "",
             "Freeze-to-running as above (`criu restore --lazy-pages -d` returned: the process runs on B, its "
             "memory still on A); 'every page': until `criu lazy-pages` exited, every page on B; 'felt': the "
             "workload's longest tick gap from the freeze to the end of the copy (page faults after the restore "
             f"count). The workload reads one byte of {touch} random pages a second; 'reads/s' is the rate it "
             f"achieved, before the freeze and during the background copy.{without_reader} `criu lazy-pages` runs "
             "at nice 19 once the restore returned (its poll loop spins). 'requests': lazy-pages' requests "
             "through the tunnel, and the share of them for a single page (page faults). 'full copy': imgmig's "
             "freeze-to-running at the same size and memory state, when every page is on B too. 'images handed': "
             "the lazy dump's non-page images were all written to the proxy; 'claimed': the restore on B had "
             f"claimed the checkpoint (both from the start of the dump).{stopped}",
             "",
             "| size MiB | freeze to running | images handed, claimed (medians) | felt | every page | copy MB/s | "
             "reads/s before | reads/s during "
             "copy | during/before | requests | single-page share | full copy | every page / full copy |",
             "|---" * 13 + "|"]
    for mib, f in lazy["sizes"].items():
        full = (f"{_fmt(f['imgmig_full_copy'])} | {_fmt(f['every_page/imgmig'])}" if f["every_page/imgmig"]
                else "no full-copy run at this size | n/a")
        every = (f"not waited for at {mib} MiB (time budget)" if f.get("copy_stopped") and not f["every_page"].get("n")
                 else _fmt(f["every_page"], 1))
        lines.append(f"| {mib} | {_fmt(f['freeze_to_running'])} | {_fmt(_median(f['images_handed']))}, "
                     f"{_fmt(_median(f['claimed']))} | {_fmt(f['felt_gap'])} | "
                     f"{every} | {_fmt(f['copy_MBps'], 0)} | {_fmt(f['touch_before_per_s'], 0)} | "
                     f"{_fmt(f['touch_during_copy_per_s'], 0)} | {_fmt(f['throughput_during/before'])} | "
                     f"{_fmt(f['requests'], 0)} | {_fmt(f['single_page_share'])} | {full} |")
    lines += [""] + [f"- {name}: {_fmt(value)}" for name, value in lazy["ratios"].items()]
    return lines


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    s = results["summary"]["freeze_to_running"]
    sizes = _all_sizes(results)
    modes = results["plan"]["modes"]
    lazy = results["summary"].get("lazy")
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        for method, marker in zip(METHODS, "osD^vP", strict=True):
            _line(ax, [(mib, s.get(f"{mib}/{mode}", {}).get(method)) for mib in sizes], marker=marker, label=method)
        if lazy and lazy["mode"] == mode:
            _line(ax, [(int(mib), f["every_page"]) for mib, f in lazy["sizes"].items()], marker="X", linestyle="--",
                  label="lazy: every page on B")
        ax.set_title(f"freeze to running, {mode} memory")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(_minor_label))
        ax.set_xticks(sizes, [str(mib) for mib in sizes])
        ax.set_xlabel("process size (MiB)")
        ax.set_ylabel("seconds (median, min-max)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _line(ax: Any, points: list[tuple[int, dict[str, Any] | None]], **style: Any) -> None:
    """Medians with min-max error bars, where there are figures."""
    shown = [(mib, v) for mib, v in points if v and "median" in v]
    if shown:
        ax.errorbar([mib for mib, _ in shown], [v["median"] for _, v in shown],
                    yerr=[[v["median"] - v["min"] for _, v in shown], [v["max"] - v["median"] for _, v in shown]],
                    capsize=3, **style)


def _minor_label(value: float, _: object) -> str:
    """Label 2, 3 and 5 of each decade on the log axis, so a short range still reads."""
    return f"{value:g}" if f"{value:.0e}"[0] in "235" else ""
