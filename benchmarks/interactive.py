#!/usr/bin/env python3
"""Interactive prompts benchmark: what clicks and boxes give, against painted slices and Fill-between.

Simulated user, from each structure's reference mask (same cases and slice axis as ``within_volume.py``):

- one slice at a time (``2D`` rows): the 5 evaluation slices are the quantile slices of ``shared/data/README.md``
  with k = 5. A box is the bounding box of the reference on the slice (2 px margin, as a user drags it
  loosely); clicks are the innermost points of the largest region (distance-transform maxima, each new click
  away from the previous ones). Score: mean 2D Dice over the evaluation slices.
  ``box``, ``click-1`` (plain SAM), ``zero-shot-1``, ``zero-shot-3`` (self-similarity, Shaharabany et al.),
  ``learned-click-1`` / ``learned-box`` (prompt encoder learned from 2 painted slices, SAM^assist; the
  evaluation slices exclude the painted ones).
- whole volume (``3D`` rows): the prompt-propagation walk (SAM^auto) from the structure's middle slice,
  prompted with a box (``walk-box``), 3 zero-shot clicks (``walk-zero-shot-3``) or, after learning from 2
  painted slices, one click (``walk-learned-click-1``). Scored like ``within_volume.py``: Dice on every
  slice of the volume the user did not touch. Their Fill-walk / Fill-between rows at k = 3 (3 painted
  slices) come from ``benchmarks/results/within_volume.csv`` when it has them.

``actions`` counts what the user does: a painted slice, a click or a box is one action each.

    python benchmarks/interactive.py                      # CT12 + the MRI cases; CSV + Markdown in results/
    python benchmarks/interactive.py --structures liver spleen --cases totalseg-ct
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import platform
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from within_volume import find_cases, paint, select  # noqa: E402

from SAMFewshotLib.baselines import slice_axis_for, spread_painted_slices  # noqa: E402
from SAMFewshotLib.metrics import evaluate  # noqa: E402
from SAMFewshotLib.volume_io import read_label_map, read_volume  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
COLUMNS = ["dataset", "case", "structure", "scope", "method", "actions", "dice", "slices", "seconds", "date"]
METHODS_2D = ("box", "click-1", "zero-shot-1", "zero-shot-3", "learned-click-1", "learned-box")
METHODS_3D = ("walk-box", "walk-zero-shot-3", "walk-learned-click-1")
ACTIONS = {"box": 1, "click-1": 1, "zero-shot-1": 1, "zero-shot-3": 3, "learned-click-1": 2 + 1,
           "learned-box": 2 + 1, "walk-box": 1, "walk-zero-shot-3": 3, "walk-learned-click-1": 2 + 1,
           "fill-walk k=3": 3, "fill-between k=3": 3}
BOX_MARGIN = 2


def clicks_inside(mask: np.ndarray, count: int) -> list[tuple[float, float]]:
    """``count`` (x, y) clicks deep inside the largest region of a 2D mask, spread apart."""
    labelled, regions = ndimage.label(mask)
    largest = labelled == (1 + int(np.argmax(ndimage.sum(mask, labelled, range(1, regions + 1)))))
    depth = ndimage.distance_transform_edt(largest)
    points = []
    for _ in range(count):
        y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)
        if depth[y, x] <= 0:
            break
        points.append((float(x), float(y)))
        rows, cols = np.ogrid[: mask.shape[0], : mask.shape[1]]
        radius = max(2.0, float(ndimage.distance_transform_edt(largest)[y, x]))
        depth[(rows - y) ** 2 + (cols - x) ** 2 <= radius**2] = 0
    return points


def loose_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(mask)
    return (max(0, cols.min() - BOX_MARGIN), max(0, rows.min() - BOX_MARGIN),
            min(mask.shape[1] - 1, cols.max() + BOX_MARGIN), min(mask.shape[0] - 1, rows.max() + BOX_MARGIN))


def dice2d(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(a, b).sum() / total)


def run_structure(case, structure, args, writer, within_rows) -> list[dict]:
    from SAMFewshotLib.embeddings import slice_stack
    from SAMFewshotLib.interactive import InteractiveSession
    from SAMFewshotLib.prompt_learning import learn_prompt_encoder
    from SAMFewshotLib.prompt_propagation import walk_prompts
    from SAMFewshotLib.prompts import SlicePrompt
    from SAMFewshotLib.zero_shot import zero_shot_segment

    image = read_volume(case.folder / "image.nii.gz")
    reference = read_label_map(case.folder / "labels" / f"{structure}.nii.gz", image).array > 0
    axis = slice_axis_for(image.spacing)
    session = InteractiveSession(image, axis=axis, model=args.model, device=args.device, cache_dir=args.cache_dir)
    truth = slice_stack(reference, axis)
    evaluation = spread_painted_slices(reference, 5, axis)
    learned_from = spread_painted_slices(reference, 2, axis)
    rows, date = [], dt.date.today().isoformat()

    def record(scope, method, dice, slices, seconds):
        row = {"dataset": case.dataset, "case": case.name, "structure": structure, "scope": scope,
               "method": method, "actions": ACTIONS[method], "dice": f"{dice:.4f}", "slices": slices,
               "seconds": f"{seconds:.1f}", "date": date}
        writer.writerow(row)
        rows.append(row)
        print(f"{case.id} {structure:22s} {scope} {method:22s} actions {ACTIONS[method]:2d} Dice {dice:.3f} "
              f"({seconds:.1f} s)", flush=True)

    session.embeddings.ensure(sorted(set(evaluation) | set(learned_from)))
    started = time.perf_counter()
    encoder = learn_prompt_encoder(session, paint(reference, learned_from, axis), 1, seed=0)
    learn_seconds = time.perf_counter() - started

    prompts = {
        "box": lambda m: ("plain", SlicePrompt(box=loose_box(m))),
        "click-1": lambda m: ("plain", SlicePrompt(tuple(clicks_inside(m, 1)), (1,))),
        "zero-shot-1": lambda m: ("zero-shot", SlicePrompt(tuple(clicks_inside(m, 1)), (1,))),
        "zero-shot-3": lambda m: ("zero-shot", SlicePrompt(tuple(p := clicks_inside(m, 3)), (1,) * len(p))),
        "learned-click-1": lambda m: ("learned", SlicePrompt(tuple(clicks_inside(m, 1)), (1,))),
        "learned-box": lambda m: ("learned", SlicePrompt(box=loose_box(m))),
    }

    def predict(kind, prompt, index):
        if kind == "zero-shot":
            return zero_shot_segment(session, index, prompt, seed=0)
        return session.segment(index, prompt, prompt_encoder=encoder if kind == "learned" else None)

    for method in METHODS_2D:
        started = time.perf_counter()
        slices = [i for i in evaluation if not (method.startswith("learned") and i in learned_from)]
        scores = [dice2d(predict(*prompts[method](truth[i]), i).mask, truth[i]) for i in slices]
        extra = learn_seconds if method.startswith("learned") else 0.0
        record("2D", method, float(np.mean(scores)), len(slices), time.perf_counter() - started + extra)

    occupied = np.flatnonzero(truth.reshape(len(truth), -1).any(1))
    middle = int(occupied[len(occupied) // 2])
    walks = {"walk-box": ("box", None), "walk-zero-shot-3": ("zero-shot-3", None),
             "walk-learned-click-1": ("learned-click-1", encoder)}
    for method, (start_method, prompt_encoder) in walks.items():
        started = time.perf_counter()
        start = predict(*prompts[start_method](truth[middle]), middle)
        masks = walk_prompts(session, start, prompt_encoder=prompt_encoder, seed=0).masks
        predicted = np.zeros(reference.shape, bool)
        stack = slice_stack(predicted, axis)
        for item in masks:
            stack[item.index] = item.mask
        touched = [middle] + (list(learned_from) if prompt_encoder is not None else [])
        score = evaluate(predicted, reference, tuple(image.spacing)[::-1], slice_axis=axis, exclude_slices=touched)["dice"]
        extra = learn_seconds if prompt_encoder is not None else 0.0
        record("3D", method, score, len(masks), time.perf_counter() - started + extra)

    for method in ("fill-walk", "fill-between"):
        row = within_rows.get((case.dataset, case.name, structure, "3", method))
        if row:
            record("3D", f"{method} k=3", float(row["dice"]), len(row["painted_slices"].split()), float(row["seconds"]))
    return rows


def summary(rows: list[dict]) -> str:
    methods = list(dict.fromkeys((r["scope"], r["method"]) for r in rows))
    structures = list(dict.fromkeys(f"{r['case']}/{r['structure']}" if r["dataset"] != "totalseg-ct"
                                    else r["structure"] for r in rows))
    lines = ["| scope | method | user actions | mean Dice | structures |", "|---|---|---|---|---|"]
    for scope, method in methods:
        chosen = [float(r["dice"]) for r in rows if (r["scope"], r["method"]) == (scope, method)]
        lines.append(f"| {scope} | {method} | {ACTIONS[method]} | {np.mean(chosen):.3f} | {len(chosen)} |")
    lines += ["", "Per structure (Dice):", "", "| structure | " + " | ".join(m for _, m in methods) + " |",
              "|---|" + "---|" * len(methods)]
    for name in structures:
        cells = []
        for scope, method in methods:
            found = [r for r in rows if (r["scope"], r["method"]) == (scope, method)
                     and name in (r["structure"], f"{r['case']}/{r['structure']}")]
            cells.append(f"{float(found[0]['dice']):.3f}" if found else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--cases", nargs="*", default=None, help="case ids, names or datasets")
    parser.add_argument("--structures", nargs="*", default=None)
    parser.add_argument("--model", default="lite-medsam")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--limit", type=int, default=None, help="at most this many MRI cases per dataset")
    parser.add_argument("--output", default=str(RESULTS / "interactive.csv"))
    args = parser.parse_args(argv)

    pairs = select(find_cases(Path(args.data)), args.cases, args.structures)
    if args.limit:
        seen: dict[str, int] = {}
        kept = []
        for case, structure in pairs:
            if case.dataset != "totalseg-ct":
                seen.setdefault(case.dataset, 0)
                if case.id not in {c.id for c, _ in kept} and seen[case.dataset] >= args.limit:
                    continue
                if case.id not in {c.id for c, _ in kept}:
                    seen[case.dataset] += 1
            kept.append((case, structure))
        pairs = kept
    within = RESULTS / "within_volume.csv"
    within_rows = {}
    if within.exists():
        with open(within) as stream:
            within_rows = {(r["dataset"], r["case"], r["structure"], r["k"], r["method"]): r
                           for r in csv.DictReader(stream)}
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    with open(output, "w", newline="") as stream:
        writer = csv.DictWriter(stream, COLUMNS)
        writer.writeheader()
        for case, structure in pairs:
            rows += run_structure(case, structure, args, writer, within_rows)
            stream.flush()
    text = (f"Interactive prompts benchmark, {dt.date.today().isoformat()}, {platform.processor() or platform.machine()}, "
            f"model {args.model}\n\n" + summary(rows))
    output.with_suffix(".md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
