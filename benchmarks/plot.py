"""Plots and markdown tables from benchmark results (BENCHMARKS.md: never typed by hand).

    python benchmarks/plot.py benchmarks/results/*.json --out <dir>

For every results file (one device) and every (op, dtype) in it, writes
  <out>/<device-slug>__<op>__<dtype>__time.png     p50 time vs size (p20-p80 band), one panel per shape
                                                  family and mode, one line per provider, log-log
  <out>/<device-slug>__<op>__<dtype>__speedup.png  speed-up over "eager" (p50 / p50) vs size
and one markdown file <out>/results.md (also printed) with, per shape and mode, each provider's p50 ms,
its speed-up over eager and its peak / saved memory. (The end-to-end step's speed-ups are over "peft",
the unpatched model: BASELINES.) With no file arguments it reads
benchmarks/results/*.json. matplotlib is needed for the PNGs only (``pip install matplotlib``).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

MODES = ("fwd", "bwd", "fwd_bwd")
BASELINE = "eager"
# Ops whose speed-ups are taken over another provider than BASELINE (the end-to-end step: unpatched PEFT).
BASELINES = {"llama_adapter_e2e": "peft", "llama_adapter_e2e_cpu_smoke": "peft"}
# The shape field swept along the x axis of each op's plots; other ops: the numeric field with the most
# distinct values.
X_KEYS = {"adapter_block": "N", "gated_attention": "L", "qformer_cross_attention": "B",
          "gated_attention_decode": "B", "llama_adapter_e2e": "L", "llama_adapter_e2e_cpu_smoke": "L",
          "gated_cross_attention": "Lq"}
PROVIDER_ORDER = ("fastbridge", "fastbridge-nosplit", "fastbridge-atomicdq", "fastbridge-reference", "sdpa",
                  "sdpa_noprompt", "compile", "eager", "peft")
COLORS = {"fastbridge": "tab:red", "fastbridge-nosplit": "tab:pink", "fastbridge-atomicdq": "tab:brown",
          "fastbridge-reference": "tab:orange", "sdpa": "tab:green", "sdpa_noprompt": "tab:olive", "compile": "tab:purple", "eager": "tab:blue",
          "peft": "tab:blue"}


def baseline(op: str) -> str:
    """The provider an op's speed-ups are taken over."""
    return BASELINES.get(op, BASELINE)
MODE_STYLES = {"fwd": "-", "bwd": "--", "fwd_bwd": ":"}
MODE_MARKERS = {"fwd": "o", "bwd": "s", "fwd_bwd": "^"}  # a panel with single points shows no line style


def _validate(doc, where):
    try:
        from _harness import validate_results
    except Exception:  # noqa: BLE001 - plot.py also works where torch is missing
        if not isinstance(doc, dict) or "records" not in doc:
            raise ValueError(f"{where}: not a results file (no 'records')")
        return
    validate_results(doc, where)


def load(paths) -> list[tuple[Path, dict]]:
    out = []
    for p in paths:
        p = Path(p)
        doc = json.loads(p.read_text())
        _validate(doc, str(p))
        out.append((p, doc))
    return out


def _provider_rank(p: str) -> tuple:
    return (PROVIDER_ORDER.index(p) if p in PROVIDER_ORDER else len(PROVIDER_ORDER), p)


def x_key(op: str, records: list[dict]) -> str:
    if op in X_KEYS and all(X_KEYS[op] in r["shape"] for r in records):
        return X_KEYS[op]
    counts = defaultdict(set)
    for r in records:
        for k, v in r["shape"].items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                counts[k].add(v)
    if not counts:
        raise ValueError(f"{op}: no numeric shape field to plot against")
    return max(counts, key=lambda k: len(counts[k]))


def _fmt(v) -> str:
    return "" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))


def family_label(shape: dict, xk: str) -> str:
    return " ".join(f"{k}={_fmt(v)}" for k, v in shape.items() if k != xk)


def _sortable(v):
    return (0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, str(v))


def group(doc: dict):
    """{(op, dtype): {family: {(provider, mode): [(x, rec), ...]}}} plus the x key of each op."""
    by_op = defaultdict(list)
    for r in doc["records"]:
        by_op[(r["op"], r["dtype"])].append(r)
    out = {}
    for (op, dt), recs in sorted(by_op.items()):
        xk = x_key(op, recs)
        fams = defaultdict(lambda: defaultdict(list))
        for r in recs:
            fam = tuple((k, v) for k, v in r["shape"].items() if k != xk)
            fams[fam][(r["provider"], r["mode"])].append((r["shape"][xk], r))
        for fam in fams.values():
            for series in fam.values():
                series.sort(key=lambda t: _sortable(t[0]))
        ordered = dict(sorted(fams.items(), key=lambda kv: tuple(_sortable(v) for _, v in kv[0])))
        out[(op, dt)] = (xk, ordered)
    return out


# ------------------------------------------------------------------------------------------- tables
def markdown(doc: dict, path: Path) -> str:
    lines = [f"## {doc['device']} ({path.name})", "",
             f"torch {doc['torch']}, triton {doc['triton']}, CUDA {doc['cuda']}, fastbridge "
             f"{str(doc['fastbridge'])[:12]}{' (modified tree)' if doc.get('fastbridge_dirty') else ''}, "
             f"{doc['date']}. Times: p50 ms (p20-p80 in the JSON); ×: speed-up over {BASELINE} (p50)"
             + "".join(f"; {op}: over {b}" for op, b in sorted(BASELINES.items())
                       if any(r["op"] == op for r in doc["records"])) + ".", ""]
    for (op, dt), (xk, fams) in group(doc).items():
        providers = sorted({p for fam in fams.values() for (p, _) in fam}, key=_provider_rank)
        base_p = baseline(op)
        others = [p for p in providers if p != base_p] if base_p in providers else []
        has_peak = any(r.get("peak_mb") is not None for fam in fams.values() for s in fam.values() for _, r in s)
        lines += [f"### {op}, {dt}", ""]
        head = ["shape", "mode"] + [f"{p} ms" for p in providers] + [f"{p} ×" for p in others]
        if has_peak:
            head += [f"{p} peak MB" for p in providers]
        head += [f"{p} saved MB" for p in providers]
        lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
        rows = defaultdict(dict)
        for fam_key, fam in fams.items():
            for (p, m), series in fam.items():
                for x, r in series:
                    rows[(fam_key, _sortable(x), x, m)][p] = r
        for (fam_key, _, x, m), recs in sorted(rows.items(), key=lambda kv: (
                tuple(_sortable(v) for _, v in kv[0][0]), kv[0][1], MODES.index(kv[0][3]))):
            shape = " ".join([f"{k}={_fmt(v)}" for k, v in fam_key] + [f"{xk}={_fmt(x)}"])
            cells = [shape, m]
            cells += [f"{recs[p]['ms']['p50']:.4g}" if p in recs else "" for p in providers]
            base = recs.get(base_p)
            for p in others:
                cells.append(f"{base['ms']['p50'] / recs[p]['ms']['p50']:.2f}" if base and p in recs else "")
            if has_peak:
                cells += [_fmt(recs[p].get("peak_mb")) if p in recs and recs[p].get("peak_mb") is not None else ""
                          for p in providers]
            cells += [_fmt(recs[p].get("saved_mb")) if p in recs and recs[p].get("saved_mb") is not None else ""
                      for p in providers]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def compact_table(records: list[dict]) -> str:
    """A terminal table of ``records`` (e.g. the ones one run measured): per (op, dtype) one block, a row
    per (shape, mode), a column per provider with its p50 in ms, then the speed-up (×) of fastbridge over
    the op's baseline and the peak memory in MB of both. Every column holds one unit, named in its header."""
    doc = {"records": records}
    out = []
    for (op, dt), (xk, fams) in group(doc).items():
        providers = sorted({p for fam in fams.values() for (p, _) in fam}, key=_provider_rank)
        base_p = baseline(op)
        ours = "fastbridge" if "fastbridge" in providers else None
        speed = ours is not None and base_p in providers and base_p != ours
        measured = {pp for fam in fams.values() for (pp, _), s in fam.items() for _, r in s
                    if r.get("peak_mb") is not None}
        peaks = [p for p in (ours, base_p) if p in providers and p in measured]
        head = ["shape", "mode"] + [f"{p} ms" for p in providers]
        if speed:
            head.append(f"× vs {base_p}")
        head += [f"{p} MB" for p in peaks]
        rows = defaultdict(dict)
        for fam_key, fam in fams.items():
            for (p, m), series in fam.items():
                for x, r in series:
                    rows[(fam_key, _sortable(x), x, m)][p] = r
        body = []
        for (fam_key, _, x, m), recs in sorted(rows.items(), key=lambda kv: (
                tuple(_sortable(v) for _, v in kv[0][0]), kv[0][1], MODES.index(kv[0][3]) if kv[0][3] in MODES else 9)):
            cells = [" ".join([f"{k}={_fmt(v)}" for k, v in fam_key] + [f"{xk}={_fmt(x)}"]), m]
            cells += [f"{recs[p]['ms']['p50']:.4g}" if p in recs else "-" for p in providers]
            if speed:
                ok = ours in recs and base_p in recs
                cells.append(f"{recs[base_p]['ms']['p50'] / recs[ours]['ms']['p50']:.2f}" if ok else "-")
            cells += [_fmt(recs[p].get("peak_mb")) if p in recs and recs[p].get("peak_mb") is not None else "-"
                      for p in peaks]
            body.append(cells)
        widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]

        def line(cells):  # shape and mode left-aligned, numbers right-aligned
            return "  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w)
                             for i, (c, w) in enumerate(zip(cells, widths)))

        out += [f"{op}, {dt}", line(head), *(line(c) for c in body), ""]
    return "\n".join(out).rstrip() + "\n" if out else ""


# -------------------------------------------------------------------------------------------- plots
def _size_label(v) -> str:
    if isinstance(v, (int, float)) and v >= 1024 and v % 1024 == 0:
        return f"{int(v) // 1024}k"
    return _fmt(v)


def _axes_style(ax, xs) -> None:
    """Log axes with plain-number tick labels; x ticks at the measured sizes."""
    from matplotlib import ticker

    ax.set_xscale("log", base=2)
    xs = sorted(set(xs))
    ax.set_xticks(xs)
    ax.set_xticklabels([_size_label(x) for x in xs])
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.grid(True, which="both", alpha=0.3)
    ax.tick_params(labelsize=7)


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 3)
    return math.ceil(n / cols), cols


def plot_doc(doc: dict, path: Path, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    slug = path.stem
    written = []
    for (op, dt), (xk, fams) in group(doc).items():
        fam_items = list(fams.items())
        modes = [m for m in MODES if any(m == mm for fam in fams.values() for (_, mm) in fam)]
        # time: rows = families, cols = modes
        nrow, ncol = len(fam_items), len(modes)
        fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 2.9 * nrow), squeeze=False)
        for i, (fam_key, fam) in enumerate(fam_items):
            label = family_label(dict(fam_key), xk)
            for j, m in enumerate(modes):
                ax = axes[i][j]
                for p in sorted({p for (p, mm) in fam if mm == m}, key=_provider_rank):
                    series = fam[(p, m)]
                    xs = [x for x, _ in series]
                    p50 = [r["ms"]["p50"] for _, r in series]
                    ax.plot(xs, p50, marker=MODE_MARKERS.get(m, "o"), ms=4, color=COLORS.get(p), label=p)
                    ax.fill_between(xs, [r["ms"]["p20"] for _, r in series], [r["ms"]["p80"] for _, r in series],
                                    color=COLORS.get(p), alpha=0.2, lw=0)
                _axes_style(ax, [x for (p, mm), series in fam.items() if mm == m for x, _ in series])
                ax.set_yscale("log")
                ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
                ax.yaxis.set_minor_formatter(ticker.NullFormatter())
                ax.set_title(f"{m}: {label}", fontsize=8)
                if i == nrow - 1:
                    ax.set_xlabel(xk, fontsize=8)
                if j == 0:
                    ax.set_ylabel("ms (p50, p20-p80)", fontsize=8)
                if ax.get_lines():
                    ax.legend(fontsize=7)
        fig.suptitle(f"{op} {dt} on {doc['device']}: time vs {xk}", fontsize=10)
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))
        f = out / f"{slug}__{op}__{dt}__time.png"
        fig.savefig(f, dpi=110)
        plt.close(fig)
        written.append(f)

        # speed-up over eager: one panel per family, a line per (provider, mode)
        base_p = baseline(op)
        if not any(p == base_p for fam in fams.values() for (p, _) in fam):
            continue
        nrow, ncol = _grid(len(fam_items))
        fig, axes = plt.subplots(nrow, ncol, figsize=(4.4 * ncol, 3.0 * nrow), squeeze=False)
        for k, (fam_key, fam) in enumerate(fam_items):
            ax = axes[k // ncol][k % ncol]
            series_pts = []  # (provider, mode, [(x, speed-up)])
            for p in sorted({p for (p, _) in fam if p != base_p}, key=_provider_rank):
                for m in modes:
                    if (p, m) not in fam or (base_p, m) not in fam:
                        continue
                    base = {x: r["ms"]["p50"] for x, r in fam[(base_p, m)]}
                    pts = [(x, base[x] / r["ms"]["p50"]) for x, r in fam[(p, m)] if x in base]
                    if pts:
                        series_pts.append((p, m, pts))
            if series_pts and len({x for _, _, pts in series_pts for x, _ in pts}) == 1:
                # one size only: lines and their styles would be single dots; bars grouped by mode instead
                provs = sorted({p for p, _, _ in series_pts}, key=_provider_rank)
                bar_modes = [m for m in modes if any(mm == m for _, mm, _ in series_pts)]
                width = 0.8 / len(provs)
                for i, p in enumerate(provs):
                    vals = {m: pts[0][1] for pp, m, pts in series_pts if pp == p}
                    pos = [j + (i - (len(provs) - 1) / 2) * width for j, m in enumerate(bar_modes) if m in vals]
                    hs = [vals[m] for m in bar_modes if m in vals]
                    bars = ax.bar(pos, hs, width=width * 0.9, color=COLORS.get(p), label=p)
                    for b, h in zip(bars, hs):
                        ax.annotate(f"{h:.2f}", (b.get_x() + b.get_width() / 2, h), ha="center", va="bottom",
                                    fontsize=6)
                ax.set_xticks(range(len(bar_modes)))
                ax.set_xticklabels(bar_modes, fontsize=7)
                ax.axhline(1.0, color="k", lw=0.8)
                ax.grid(True, axis="y", alpha=0.3)
                x0 = series_pts[0][2][0][0]
                ax.set_xlabel(f"mode ({xk}={_size_label(x0)})", fontsize=8)
            else:
                for p, m, pts in series_pts:
                    ax.plot([x for x, _ in pts], [s for _, s in pts], MODE_STYLES.get(m, "-"),
                            marker=MODE_MARKERS.get(m, "o"), ms=4, color=COLORS.get(p), label=f"{p} {m}")
                ax.axhline(1.0, color="k", lw=0.8)
                _axes_style(ax, [x for series in fam.values() for x, _ in series])
                ax.set_xlabel(xk, fontsize=8)
            ax.set_title(family_label(dict(fam_key), xk), fontsize=8)
            ax.set_ylabel(f"speed-up over {base_p} (×)", fontsize=8)
            if series_pts:
                ax.legend(fontsize=6)
        for k in range(len(fam_items), nrow * ncol):
            axes[k // ncol][k % ncol].set_visible(False)
        fig.suptitle(f"{op} {dt} on {doc['device']}: speed-up over {base_p} (p50)", fontsize=10)
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))
        f = out / f"{slug}__{op}__{dt}__speedup.png"
        fig.savefig(f, dpi=110)
        plt.close(fig)
        written.append(f)
    return written


def default_results_dir() -> Path:
    """Where the suite writes results unless told otherwise (benchmarks/conftest.py uses the same):
    $FASTBRIDGE_BENCH_OUT, else $XDG_CACHE_HOME/fastbridge/bench, else ~/.cache/fastbridge/bench. The
    committed GPU results live in benchmarks/results/ (pass --fb-results-dir benchmarks/results)."""
    import os

    env = os.environ.get("FASTBRIDGE_BENCH_OUT")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "fastbridge" / "bench"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="*", help="results JSON files (default: benchmarks/results/*.json)")
    ap.add_argument("--out", default=None, help="output directory (default: benchmarks/results/plots)")
    ap.add_argument("--no-png", action="store_true", help="write the markdown table only")
    ap.add_argument("--quiet", action="store_true", help="write results.md without printing it")
    args = ap.parse_args(argv)
    paths = [Path(p) for p in args.results] or sorted((HERE / "results").glob("*.json"))
    if not paths:
        print("plot.py: no results files given and none in benchmarks/results/", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else HERE / "results" / "plots"
    out.mkdir(parents=True, exist_ok=True)
    docs = load(paths)
    md = "\n".join(markdown(doc, p) for p, doc in docs)
    (out / "results.md").write_text(md + "\n")
    if not args.quiet:
        print(md)
    rc = 0
    written = []
    if not args.no_png:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("plot.py: matplotlib is not installed (pip install matplotlib): wrote the table only",
                  file=sys.stderr)
            rc = 1
        else:
            for p, doc in docs:
                written += plot_doc(doc, p, out)
    if args.quiet:
        print(f"wrote {out / 'results.md'} and {len(written)} plot(s) in {out}")
    else:
        for f in written:
            print(f"wrote {f}")
        print(f"wrote {out / 'results.md'}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
