#!/usr/bin/env python3
"""Cross-volume: adapt on one patient's painted slices, segment another patient with the saved model.

For every MRI dataset of ``../shared/data`` with several cases, each case in turn is the source: its structure
is painted on k slices (the data README's spread rule, as in ``within_volume.py``), one decoder is adapted
on them and the source is segmented from them with the default method to serve as an atlas
(``train_adapted_model``, what ``samfewshot train`` does). The adapted model then segments every other case of
the dataset, no painting of the target (``apply_adapted_model``, what ``samfewshot apply`` does), both ways:
``atlas`` (the default: the segmented source registered onto the target, its border refined with the target's
intensities; ``labels as warped``: without that refinement) and ``decoder`` (the adapted decoder on every
slice); with three or more cases, also with the atlases of all the other cases fused (what ``samfewshot
train`` on all of them gives), refined or not. Dice is taken over the whole target volume, as is and keeping
only its largest 3D connected component. The within-volume Dice of the default method on the target (from
``benchmarks/results/within_volume.csv``, same k) is the reference point: issue #5 asks for cross-volume
within 0.05 of it at k = 10.

    python benchmarks/cross_volume.py --ks 10 --cache-dir /tmp/pl-cache
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import itertools
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from within_volume import CT_DATASETS, find_cases, machine_text, paint  # noqa: E402

from SAMFewshotLib.metrics import dice  # noqa: E402


AS_WARPED = ", labels as warped"  # the atlas's labels without the intensity refinement (the ablation)
# one source: apply_adapted_model's methods (the default first), and the atlas as warped
ONE_SOURCE = ("atlas", "atlas" + AS_WARPED, "decoder")
FUSED = "atlases of all other cases"  # with 3 or more cases: every other case's atlas, fused by vote
ALL_OTHERS = (FUSED, FUSED + AS_WARPED)


def largest_component(mask: np.ndarray) -> np.ndarray:
    regions, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(regions.ravel())[1:]
    return regions == (1 + int(np.argmax(sizes)))


def within_volume_dice(k: int) -> dict[tuple[str, str], float]:
    path = REPO / "benchmarks" / "results" / "within_volume.csv"
    if not path.exists():
        return {}
    return {(r["dataset"], r["case"], r["structure"]): float(r["dice"]) for r in csv.DictReader(open(path))
            if r["method"] == "register-box-walk" and int(r["k"]) == k}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--ks", nargs="+", type=int, default=[10])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "cross_volume")
    args = parser.parse_args(argv)

    from SAMFewshotLib.atlas import segment_with_atlases
    from SAMFewshotLib.baselines import slice_axis_for, spread_painted_slices
    from SAMFewshotLib.pipeline import apply_adapted_model, get_model, train_adapted_model
    from SAMFewshotLib.volume_io import read_label_map, read_volume

    model = get_model("lite-medsam", args.device)
    by_dataset: dict[str, list] = {}
    for case in find_cases(args.data.resolve()):
        if case.dataset not in CT_DATASETS:
            by_dataset.setdefault(case.dataset, []).append(case)
    rows = []
    for dataset, cases in sorted(by_dataset.items()):
        if len(cases) < 2:
            continue
        loaded = {}
        for case in cases:
            (structure,) = case.structures()
            image = read_volume(case.folder / "image.nii.gz")
            loaded[case.id] = (structure, image, read_label_map(case.folder / "labels" / f"{structure}.nii.gz",
                                                                image).array > 0)
        for k in args.ks:
            within = within_volume_dice(k)
            atlases, seconds = {}, {}
            for source in cases:
                structure, image, ref = loaded[source.id]
                axis = slice_axis_for(image.spacing)
                painted = list(spread_painted_slices(ref, k, axis))
                started = time.perf_counter()
                adapted = train_adapted_model([(image, paint(ref.astype(np.uint8), painted, axis))], model=model,
                                              axis=axis, cache_dir=args.cache_dir, label_names={1: structure})
                adapt_seconds = seconds[source.id] = time.perf_counter() - started
                atlases[source.id] = adapted.atlases[0]
                for target in cases:
                    if target.id == source.id:
                        continue
                    _, target_image, target_ref = loaded[target.id]
                    for method in ONE_SOURCE:
                        started = time.perf_counter()
                        if method.endswith(AS_WARPED):
                            labels = segment_with_atlases(adapted.atlases, target_image, refine=False,
                                                          seed=int(adapted.settings.get("seed", 0))) > 0
                        else:
                            labels = apply_adapted_model(adapted, target_image, model=model,
                                                         cache_dir=args.cache_dir, method=method) > 0
                        row = {"dataset": dataset, "structure": structure, "k": k, "method": method,
                               "source": source.name, "target": target.name, "dice": dice(labels, target_ref),
                               "dice_largest_component": dice(largest_component(labels), target_ref),
                               "within_volume_dice": within.get((dataset, target.name, structure), float("nan")),
                               "adapt_seconds": adapt_seconds, "apply_seconds": time.perf_counter() - started}
                        rows.append(row)
                        print(f"{dataset} k={k} {method} {source.name} -> {target.name}: Dice {row['dice']:.3f} "
                              f"(largest component {row['dice_largest_component']:.3f}; within-volume "
                              f"{row['within_volume_dice']:.3f})", flush=True)
            if len(cases) < 3:
                continue
            for target, method in itertools.product(cases, ALL_OTHERS):
                # what 'samfewshot train' on all the other cases gives: their atlases vote
                _, target_image, target_ref = loaded[target.id]
                others = [c for c in cases if c.id != target.id]
                started = time.perf_counter()
                labels = segment_with_atlases([atlases[c.id] for c in others], target_image,
                                              refine=not method.endswith(AS_WARPED)) > 0
                row = {"dataset": dataset, "structure": structure, "k": k, "method": method, "source": "the others",
                       "target": target.name, "dice": dice(labels, target_ref),
                       "dice_largest_component": dice(largest_component(labels), target_ref),
                       "within_volume_dice": within.get((dataset, target.name, structure), float("nan")),
                       "adapt_seconds": sum(seconds[c.id] for c in others),
                       "apply_seconds": time.perf_counter() - started}
                rows.append(row)
                print(f"{dataset} k={k} {method} -> {target.name}: Dice {row['dice']:.3f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out.with_suffix(".csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"{machine_text()} {dt.date.today().isoformat()}; command: `python benchmarks/cross_volume.py "
             + " ".join(sys.argv[1:] if argv is None else argv) + "`", "",
             "Mean over ordered (source, target) pairs of different cases (for the fused atlases: over targets):", "",
             "| dataset | k | method | pairs | cross-volume Dice | largest component | within-volume Dice (targets) "
             "| gap | s to train / apply |",
             "|---|---|---|---|---|---|---|---|---|"]
    for dataset in sorted({r["dataset"] for r in rows}):
        for k in args.ks:
            for method in ONE_SOURCE + ALL_OTHERS:
                subset = [r for r in rows if r["dataset"] == dataset and r["k"] == k and r["method"] == method]
                if not subset:
                    continue
                cross = np.mean([r["dice"] for r in subset])
                largest = np.mean([r["dice_largest_component"] for r in subset])
                inside = np.mean([r["within_volume_dice"] for r in subset])
                seconds = (f"{np.mean([r['adapt_seconds'] for r in subset]):.0f} / "
                           f"{np.mean([r['apply_seconds'] for r in subset]):.1f}")
                lines.append(f"| {dataset} | {k} | {method} | {len(subset)} | {cross:.3f} | {largest:.3f} | "
                             f"{inside:.3f} | {inside - max(cross, largest):.3f} | {seconds} |")
    text = "\n".join(lines) + "\n"
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
