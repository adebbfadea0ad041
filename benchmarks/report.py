"""Summarise the accuracy results that benchmarks/accuracy.py appends to its JSONL file.

    python benchmarks/report.py [--results benchmarks/results/accuracy.jsonl] [--preset configs/cifar10_cpu_demo.yaml]
        [--since 2026-12-07T04:00] [--arms real_kd synth_dda ...]
        [--pair dda_self synth_dda]... [--plot accuracy.png]

Prints, for one preset (default: the preset with the most lines):
  * a Markdown table per arm: n, mean top-1, sample std (n-1), min, max, seeds, and the ratio of
    the mean to the real_kd mean when real_kd was run;
  * paired differences A-B over the seeds both arms share: n, mean, sample std of the differences
    and a 95 % two-sided t interval (mean +- t_{0.975,n-1} sd / sqrt(n));
  * with ``--plot``, a PNG of test top-1 per epoch: per arm the mean over seeds, shaded min..max.

An arm run more than once for a seed (``accuracy.py --rerun``) counts with its latest line.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = ROOT / "benchmarks" / "results" / "accuracy.jsonl"

# Two-sided 95 % quantiles t_{0.975, df} of Student's t for df = 1..30 (beyond: t_quantile's expansion).
T_975 = {
    1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
    11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086,
    21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042,
}


def t_quantile(df: int) -> float:
    """t_{0.975, df}: from the table up to df 30; beyond, the Cornish-Fisher expansion of t about the
    normal quantile to the third order in 1/df (within 1e-4 of the exact value there), to 3 decimals.
    (The normal 1.96 would make a 40-seed interval 3 % too narrow.)"""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df in T_975:
        return T_975[df]
    z = 1.959963984540054
    t = (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
         + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))
    return round(t, 3)


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def sample_std(xs: list[float]) -> float | None:
    """Standard deviation with n-1 in the denominator; None for fewer than two values."""
    if len(xs) < 2:
        return None
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def read_rows(path: str | Path) -> list[dict]:
    """The JSON lines of a results file, in file order; blank lines are skipped."""
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            print(f"warning: {path}:{n} is not JSON; ignored")
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def choose_preset(rows: list[dict], preset: str | None = None) -> tuple[str | None, list[dict]]:
    """The rows of ``preset``; without one, of the preset with the most lines (the first seen on a tie)."""
    if preset is None:
        counts = Counter(r.get("preset") for r in rows)
        if not counts:
            return None, []
        preset = max(counts, key=counts.get)  # max keeps the first of equal counts, in first-seen order
    return preset, [r for r in rows if r.get("preset") == preset]


def latest_per_seed(rows: list[dict]) -> tuple[list[dict], dict[tuple[str, int], int]]:
    """One row per (arm, seed), the latest line of each; also how many lines each repeated pair had.

    The kept rows stay in the order of their pair's first line, so arms keep their first-seen order.
    """
    latest: dict[tuple[str, int], dict] = {}
    counts: Counter = Counter()
    for r in rows:
        key = (r["arm"], r["seed"])
        counts[key] += 1
        latest[key] = r  # a dict keeps a key's first position: order of the first line, content of the last
    return list(latest.values()), {k: c for k, c in counts.items() if c > 1}


def arm_order(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["arm"] for r in rows))


def by_arm(rows: list[dict]) -> dict[str, dict[int, dict]]:
    """arm -> seed -> row, after the latest-line rule."""
    kept, _ = latest_per_seed(rows)
    out: dict[str, dict[int, dict]] = {}
    for r in kept:
        out.setdefault(r["arm"], {})[r["seed"]] = r
    return out


def summarize(rows: list[dict]) -> list[dict]:
    """Per arm (first-seen order): n, mean, sample std, min, max of top-1, its seeds, and mean / real_kd mean."""
    arms = by_arm(rows)
    out = []
    for arm, seeds in arms.items():
        top1 = [seeds[s]["top1"] for s in seeds]
        out.append({"arm": arm, "n": len(top1), "mean": mean(top1), "std": sample_std(top1), "min": min(top1), "max": max(top1), "seeds": sorted(seeds)})
    ref = next((s["mean"] for s in out if s["arm"] == "real_kd"), None)
    for s in out:
        s["ratio_real_kd"] = s["mean"] / ref if ref else None
    return out


def paired(rows: list[dict], a: str, b: str) -> dict:
    """Differences a - b of top-1 over the seeds both arms share, with a 95 % t interval (None below n = 2)."""
    arms = by_arm(rows)
    sa, sb = arms.get(a, {}), arms.get(b, {})
    seeds = sorted(set(sa) & set(sb))
    diffs = [sa[s]["top1"] - sb[s]["top1"] for s in seeds]
    res = {"a": a, "b": b, "seeds": seeds, "n": len(diffs), "diffs": diffs, "mean": None, "std": None, "low": None, "high": None}
    if not diffs:
        return res
    res["mean"] = mean(diffs)
    sd = sample_std(diffs)
    if sd is not None:
        half = t_quantile(len(diffs) - 1) * sd / math.sqrt(len(diffs))
        res.update(std=sd, low=res["mean"] - half, high=res["mean"] + half)
    return res


def _f(x: float | None, fmt: str = ".2f") -> str:
    return "n/a" if x is None else format(x, fmt)


def summary_table(summary: list[dict]) -> str:
    lines = ["| arm | n | mean top-1 % | std | min | max | seeds | mean/real_kd |", "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        seeds = " ".join(str(x) for x in s["seeds"])
        lines.append(f"| {s['arm']} | {s['n']} | {s['mean']:.2f} | {_f(s['std'])} | {s['min']:.2f} | {s['max']:.2f} | {seeds} | {_f(s['ratio_real_kd'], '.3f')} |")
    return "\n".join(lines)


def paired_table(results: list[dict]) -> str:
    lines = ["| A - B | n | mean difference | std | 95 % interval | seeds |", "|---|---|---|---|---|---|"]
    for p in results:
        interval = "n/a" if p["low"] is None else f"[{p['low']:.2f}, {p['high']:.2f}]"
        diff = "no shared seed" if p["mean"] is None else f"{p['mean']:+.2f}"
        seeds = " ".join(str(x) for x in p["seeds"])
        lines.append(f"| {p['a']} - {p['b']} | {p['n']} | {diff} | {_f(p['std'])} | {interval} | {seeds} |")
    return "\n".join(lines)


def epoch_bands(rows: list[dict]) -> dict[str, dict]:
    """Per arm: epochs 1..E and the mean, min and max of test top-1 over the seeds that reached each epoch."""
    out = {}
    for arm, seeds in by_arm(rows).items():
        curves = [r.get("epochs") or [] for r in seeds.values()]
        curves = [c for c in curves if c]
        if not curves:
            continue
        length = max(len(c) for c in curves)
        cols = [[c[k] for c in curves if len(c) > k] for k in range(length)]
        out[arm] = {
            "n": len(curves),
            "epoch": list(range(1, length + 1)),
            "mean": [mean(v) for v in cols],
            "min": [min(v) for v in cols],
            "max": [max(v) for v in cols],
        }
    return out


def plot(rows: list[dict], path: str | Path, title: str | None = None) -> Path:
    """Test top-1 per epoch, one line per arm (mean over seeds) with a min..max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for arm, band in epoch_bands(rows).items():
        (line,) = ax.plot(band["epoch"], band["mean"], marker="o", label=f"{arm} (n={band['n']})")
        ax.fill_between(band["epoch"], band["min"], band["max"], color=line.get_color(), alpha=0.2)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("test top-1 (%)")
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=str(DEFAULT_RESULTS), help=f"JSONL written by accuracy.py (default {DEFAULT_RESULTS.relative_to(ROOT)} in the repository)")
    parser.add_argument("--preset", default=None, help="config path as given to accuracy.py (default: the preset with the most lines)")
    parser.add_argument("--pair", nargs=2, action="append", metavar=("A", "B"), help="paired difference A - B (repeatable; default: every pair of arms)")
    parser.add_argument("--plot", default=None, metavar="PNG", help="write test top-1 per epoch to this PNG")
    parser.add_argument("--since", default=None, metavar="DATE", help="only lines dated at or after DATE (ISO 8601, e.g. 2026-12-07T04:00): the runs of a given code")
    parser.add_argument("--arms", nargs="+", default=None, metavar="ARM", help="only these arms, in this order")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if not Path(args.results).exists():
        raise SystemExit(f"error: {args.results} does not exist; run benchmarks/accuracy.py first")
    every = read_rows(args.results)
    if args.since is not None:
        since = datetime.datetime.fromisoformat(args.since).replace(tzinfo=datetime.UTC) if "+" not in args.since else datetime.datetime.fromisoformat(args.since)
        every = [r for r in every if r.get("date") and datetime.datetime.fromisoformat(r["date"]) >= since]
    if args.arms is not None:
        every = sorted((r for r in every if r.get("arm") in args.arms), key=lambda r: args.arms.index(r["arm"]))
    preset, rows = choose_preset(every, args.preset)
    if not rows:
        raise SystemExit(f"error: no results for preset {preset!r} in {args.results}")
    if args.preset is None:
        print(f"preset {preset} ({len(rows)} of {len(every)} lines; the preset with the most lines, choose one with --preset)")
    else:
        print(f"preset {preset} ({len(rows)} of {len(every)} lines)")
    overrides = list(dict.fromkeys(tuple(r.get("overrides") or []) for r in rows))
    if len(overrides) > 1:
        print(f"note: these lines carry {len(overrides)} different override lists: {[list(o) for o in overrides]}")
    _, repeated = latest_per_seed(rows)
    for (arm, seed), count in repeated.items():
        print(f"note: {arm} seed {seed} has {count} lines; the latest one counts")
    commits = sorted({str(r.get("commit")) for r in rows})
    print(f"commits: {', '.join(commits)}\n")
    print(summary_table(summarize(rows)))
    arms = arm_order(rows)
    pairs = args.pair or list(itertools.combinations(arms, 2))
    for a, b in pairs:
        for name in (a, b):
            if name not in arms:
                raise SystemExit(f"error: --pair names arm {name!r}, which has no results for this preset; arms: {', '.join(arms)}")
    if pairs:
        print("\npaired differences of top-1 (percentage points), over the seeds both arms share:\n")
        print(paired_table([paired(rows, a, b) for a, b in pairs]))
    if args.plot:
        print(f"\nplot: {plot(rows, args.plot, title=preset)}")


if __name__ == "__main__":
    main()
