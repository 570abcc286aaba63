#!/usr/bin/env python3
"""Between the painted slices only: registration-guided fill against Slicer's Fill between slices.

No model is involved (the decoder only walks beyond the painted range), so this runs in a few minutes on a
CPU and covers every structure of the development data, including the CT structures that were never used to
choose the registration's settings (``--structures all``). For each structure and k (the data README's spread
rule), Dice is taken over the unpainted slices between the first and last painted slice.

    python benchmarks/between_painted.py                    # the 12 README CT structures + MRI
    python benchmarks/between_painted.py --structures all   # every mask of the development data
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from within_volume import CT12, find_cases, machine_text  # noqa: E402

from SAMFewshotLib.baselines import fill_between_slices, slice_axis_for, spread_painted_slices  # noqa: E402
from SAMFewshotLib.painted_slices import pixel_spacing, slice_spacing  # noqa: E402
from SAMFewshotLib.registered_fill import fill_between_by_registration  # noqa: E402
from SAMFewshotLib.volume_io import read_label_map, read_volume  # noqa: E402


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--structures", nargs="*", default=None,
                        help="'all', or names; default: the 12 README CT structures, hippocampus, left_atrium")
    parser.add_argument("--ks", nargs="+", type=int, default=[3, 5, 10])
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    wanted = None if args.structures == ["all"] else set(args.structures or CT12 + ("hippocampus", "left_atrium"))

    rows = []
    for case in find_cases(args.data.resolve()):
        image = read_volume(case.folder / "image.nii.gz")
        axis = slice_axis_for(image.spacing)
        slices = np.moveaxis(image.array, axis, 0)
        for structure in case.structures():
            if wanted is not None and structure not in wanted:
                continue
            mask = np.moveaxis(read_label_map(case.folder / "labels" / f"{structure}.nii.gz", image).array > 0,
                               axis, 0)
            for k in args.ks:
                painted = spread_painted_slices(mask, k, 0)
                between = [i for i in range(painted[0] + 1, painted[-1]) if i not in painted]
                if not between:
                    continue
                labels = np.zeros(mask.shape, np.uint8)
                labels[painted] = mask[painted]
                contour = fill_between_slices(labels, 0, crop=True)
                started = time.perf_counter()
                registered, gaps = fill_between_by_registration(
                    slices, labels, painted, contour, pixel_spacing=pixel_spacing(image.spacing, axis),
                    slice_spacing=slice_spacing(image.spacing, axis))
                seconds = time.perf_counter() - started
                row = {"case": case.id, "structure": structure, "k": k, "readme_ct": structure in CT12,
                       "fill_between": dice(contour[between] == 1, mask[between]),
                       "registered": dice(registered[between] == 1, mask[between]),
                       "gaps": len(gaps), "fallbacks": sum(not g.registered for g in gaps), "seconds": seconds}
                rows.append(row)
                print(f"{case.id} {structure} k={k}: Fill-between {row['fill_between']:.3f}, registered "
                      f"{row['registered']:.3f} ({row['fallbacks']}/{row['gaps']} gaps fell back, {seconds:.1f} s)",
                      flush=True)

    given = " ".join(sys.argv[1:] if argv is None else argv)
    lines = [f"{machine_text()} {dt.date.today().isoformat()}; command: `python benchmarks/between_painted.py"
             + (f" {given}" if given else "") + "`", "",
             "Mean Dice over the unpainted slices between the first and last painted slice:", "",
             "| structures | n | " + " | ".join(f"k={k} Fill-between | k={k} registered" for k in args.ks) + " |",
             "|---|---|" + "---|---|" * len(args.ks)]
    groups = [("README CT (settings chosen here)", lambda r: r["readme_ct"]),
              ("other CT (never used to choose)", lambda r: not r["readme_ct"] and r["case"].startswith("totalseg")),
              ("MRI", lambda r: not r["case"].startswith("totalseg"))]
    for name, keep in groups:
        subset = [r for r in rows if keep(r)]
        if not subset:
            continue
        cells = []
        for k in args.ks:
            at_k = [r for r in subset if r["k"] == k]
            cells += [f"{np.mean([r['fill_between'] for r in at_k]):.3f}", f"{np.mean([r['registered'] for r in at_k]):.3f}"]
        lines.append(f"| {name} | {len({(r['case'], r['structure']) for r in subset})} | " + " | ".join(cells) + " |")
    worse = [r for r in rows if r["registered"] < r["fill_between"] - 0.02]
    lines += ["", f"More than 0.02 below Fill-between: {len(worse)} of {len(rows)} structure/k pairs"
              + (": " + ", ".join(f"{r['structure']} k={r['k']} ({r['registered']:.3f} vs {r['fill_between']:.3f})"
                                  for r in worse) if worse else "") + ".",
              f"Registration time: {np.mean([r['seconds'] for r in rows]):.1f} s per structure and k on average."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
