#!/usr/bin/env python3
"""Simulated clinician: does "paint this slice next" reach a good segmentation with fewer painted slices?

For each structure, start from 2 painted slices (the data README's spread rule with k = 2), propagate with
the default method, then add one painted slice at a time (the reference mask on that slice) and propagate
again, up to ``--max-k`` slices, with three ways of choosing the next slice:

- ``suggested``: the slice SAMFewshot suggests (``SegmentationResult.suggested_slice``); where the reference
  has nothing there, the clinician marks it "nothing here" (``empty_slices``), which counts as a painted slice;
- ``random``: a random unpainted slice where the structure is (the clinician knows roughly where it is);
- ``even``: no choosing: for each k, the k slices of the spread rule (what within_volume.py measures).

Every propagation after the first continues from the previous decoders (``previous=``), as the Slicer module
does after a correction, for all three strategies alike. Dice is scored on every unpainted slice of the
volume. For the suggested strategy, the per-slice confidence is compared with the per-slice Dice (Spearman,
over unpainted slices where the reference or the result has the structure).

Writes a CSV (one row per structure / strategy / k), a Markdown summary and a plot of mean Dice against the
number of painted slices, one curve per strategy.

    python benchmarks/suggest_slices.py --structures liver aorta femur_left --max-k 8
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import math
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from within_volume import find_cases, machine_text, paint, score, select  # noqa: E402

STRATEGIES = ("suggested", "even", "random")
DEFAULT_CT = ("liver", "spleen", "kidney_left", "aorta", "femur_left", "vertebrae_L3", "iliopsoas_left",
              "urinary_bladder")


def slice_dice(pred: np.ndarray, ref: np.ndarray, axis: int, indices) -> np.ndarray:
    p, r = np.moveaxis(pred, axis, 0)[indices], np.moveaxis(ref, axis, 0)[indices]
    inter = (p & r).reshape(len(indices), -1).sum(1)
    total = p.reshape(len(indices), -1).sum(1) + r.reshape(len(indices), -1).sum(1)
    return np.where(total == 0, 1.0, 2.0 * inter / np.maximum(total, 1))


def confidence_rank(result, ref: np.ndarray, axis: int) -> float:
    """Spearman correlation between slice confidence and slice Dice (unpainted slices with the structure)."""
    from scipy.stats import spearmanr

    from SAMFewshotLib.confidence import per_slice

    confidence = per_slice(result.confidence)
    pred = result.labels > 0
    painted = set(result.painted.settled)
    stack_p, stack_r = np.moveaxis(pred, axis, 0), np.moveaxis(ref, axis, 0)
    keep = [i for i in range(stack_r.shape[0])
            if i not in painted and (stack_p[i].any() or stack_r[i].any())]
    if len(keep) < 3:
        return float("nan")
    dice = slice_dice(pred, ref, axis, keep)
    values = np.array([confidence[i] for i in keep])
    if np.ptp(values) == 0 or np.ptp(dice) == 0:
        return float("nan")
    return float(spearmanr(values, dice).statistic)


def simulate(case, structure: str, strategy: str, args, model) -> list[dict]:
    from SAMFewshotLib.baselines import slice_axis_for, spread_painted_slices
    from SAMFewshotLib.pipeline import segment_volume
    from SAMFewshotLib.volume_io import read_label_map, read_volume

    image = read_volume(case.folder / "image.nii.gz")
    ref = read_label_map(case.folder / "labels" / f"{structure}.nii.gz", image).array > 0
    axis = slice_axis_for(image.spacing)
    occupied = [int(i) for i in np.flatnonzero(np.moveaxis(ref, axis, 0).reshape(ref.shape[axis], -1).any(1))]
    spacing = np.asarray(image.spacing)[::-1]
    rng = np.random.default_rng(args.seed)
    painted = list(spread_painted_slices(ref, 2, axis))
    rows, previous = [], None
    for k in range(2, args.max_k + 1):
        if strategy == "even":
            painted = list(spread_painted_slices(ref, k, axis))
        started = time.perf_counter()
        empty = [i for i in painted if i not in occupied]  # checked, and nothing there
        labelled = [i for i in painted if i in occupied]
        result = segment_volume(image, paint(ref.astype(np.uint8), labelled, axis), model=model, axis=axis,
                                cache_dir=args.cache_dir, previous=previous, empty_slices=empty)
        seconds = time.perf_counter() - started
        previous = result.adaptation
        scores = score(result.labels > 0, ref, spacing, axis, sorted(painted))
        rank = confidence_rank(result, ref, axis) if strategy == "suggested" else float("nan")
        rows.append({"case": case.id, "structure": structure, "strategy": strategy, "k": k,
                     "painted": " ".join(map(str, sorted(painted))), "checked_empty": len(empty),
                     "dice": scores["dice"],
                     "spearman": rank, "suggested": result.suggested_slice, "seconds": seconds})
        print(f"{case.id} {structure} {strategy} k={k} dice={scores['dice']:.3f} rho={rank:.2f} "
              f"next={result.suggested_slice} ({seconds:.1f} s)", file=sys.stderr, flush=True)
        if strategy == "suggested":
            choice = result.suggested_slice
            if choice is None or choice in painted:
                choice = _largest_gap_middle(painted, occupied)
        elif strategy == "random":
            candidates = [i for i in occupied if i not in painted]
            choice = int(rng.choice(candidates)) if candidates else None
        else:
            continue
        if choice is None:
            break
        painted.append(int(choice))
    return rows


def _largest_gap_middle(painted, occupied) -> int | None:
    marks = sorted(set(painted) | {occupied[0] - 1, occupied[-1] + 1})
    gaps = [(b - a, (a + b) // 2) for a, b in zip(marks, marks[1:]) if b - a > 1]
    return max(gaps)[1] if gaps else None


def summarize(rows: list[dict], target: float) -> str:
    by = {}
    for row in rows:
        by.setdefault((row["strategy"], int(row["k"])), []).append(float(row["dice"]))
    ks = sorted({int(r["k"]) for r in rows})
    pairs = sorted({(r["case"], r["structure"]) for r in rows})
    lines = [f"{len(pairs)} structures: " + ", ".join(f"{s} ({c})" for c, s in pairs), "",
             "| strategy | " + " | ".join(f"k={k}" for k in ks) + " | slices to reach mean Dice "
             f"{target:.2f} |", "|---" * (len(ks) + 2) + "|"]
    reach = {}
    for strategy in STRATEGIES:
        means = []
        for k in ks:
            values = by.get((strategy, k), [])
            means.append(np.mean(values) if len(values) == len(pairs) else float("nan"))
        hit = next((k for k, m in zip(ks, means) if m >= target), None)
        reach[strategy] = hit
        cells = " | ".join("" if math.isnan(m) else f"{m:.3f}" for m in means)
        lines.append(f"| {strategy} | {cells} | {hit if hit else f'> {ks[-1]}'} |")
    lines += ["", f"Per structure, painted slices to reach Dice {target:.2f} (> {ks[-1]}: not reached):", "",
              "| structure | " + " | ".join(STRATEGIES) + " |", "|---" * (len(STRATEGIES) + 1) + "|"]
    for case, structure in pairs:
        cells = []
        for strategy in STRATEGIES:
            curve = sorted((int(r["k"]), float(r["dice"])) for r in rows
                           if (r["case"], r["structure"], r["strategy"]) == (case, structure, strategy))
            hit = next((k for k, d in curve if d >= target), None)
            cells.append("" if not curve else str(hit) if hit else f"> {curve[-1][0]}")
        lines.append(f"| {structure} | " + " | ".join(cells) + " |")
    rho = [float(r["spearman"]) for r in rows if r["strategy"] == "suggested" and not math.isnan(float(r["spearman"]))]
    lines.append("")
    if rho:
        lines.append(f"Confidence vs slice Dice (suggested strategy, every k): mean Spearman {np.mean(rho):.2f} "
                     f"(median {np.median(rho):.2f}, {len(rho)} propagations).")
    if reach.get("suggested") and reach.get("even"):
        saving = 1 - reach["suggested"] / reach["even"]
        lines.append(f"Painted slices to reach {target:.2f}: suggested {reach['suggested']}, even {reach['even']} "
                     f"({saving:.0%} fewer).")
    seconds = [float(r["seconds"]) for r in rows]
    lines.append(f"Mean time per propagation (continuing from the previous decoders): {np.mean(seconds):.1f} s.")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(5.5, 4))
    for strategy in STRATEGIES:
        ks = sorted({int(r["k"]) for r in rows if r["strategy"] == strategy})
        means = [np.mean([float(r["dice"]) for r in rows if r["strategy"] == strategy and int(r["k"]) == k])
                 for k in ks]
        ax.plot(ks, means, marker="o", label=strategy)
    ax.axhline(0.90, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("painted slices")
    ax.set_ylabel("mean Dice (unpainted slices)")
    ax.set_title("Which slice to paint next")
    ax.legend()
    ax.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--cases", nargs="*", default=["totalseg-ct/example", "hippocampus/042",
                                                        "left_atrium/CZPMV6KWZ4I7IJJP9FOK"])
    parser.add_argument("--structures", nargs="*", default=list(DEFAULT_CT) + ["hippocampus", "left_atrium"])
    parser.add_argument("--strategies", nargs="*", default=list(STRATEGIES))
    parser.add_argument("--max-k", type=int, default=10)
    parser.add_argument("--target", type=float, default=0.90)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "suggest_slices"))
    parser.add_argument("--summary-only", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    csv_path = out.with_suffix(".csv")
    rows = list(csv.DictReader(open(csv_path))) if csv_path.exists() else []
    done = {(r["case"], r["structure"], r["strategy"]) for r in rows}
    if not args.summary_only:
        from SAMFewshotLib.pipeline import get_model

        model = get_model("lite-medsam", args.device)
        pairs = select(find_cases(Path(args.data)), args.cases, args.structures)
        for case, structure in pairs:
            for strategy in args.strategies:
                if (case.id, structure, strategy) in done:
                    continue
                new = simulate(case, structure, strategy, args, model)
                write_header = not csv_path.exists()
                with open(csv_path, "a", newline="") as handle:
                    fields = list(rows[0]) if rows else list(new[0])
                    writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore", restval="")
                    if write_header:
                        writer.writeheader()
                    writer.writerows(new)
                rows.extend(new)
    text = (f"Run on {machine_text()}, {dt.date.today().isoformat()}; command: "
            f"`python benchmarks/suggest_slices.py --max-k {args.max_k}`\n\n" + summarize(rows, args.target))
    out.with_suffix(".md").write_text(text)
    plot(rows, out.with_suffix(".png"))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
