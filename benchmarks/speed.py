#!/usr/bin/env python3
"""Speed and memory benchmark: a 512 x 512 x 300 CT, 5 painted slices of the liver.

The case is built once from the development CT (``shared/data/totalseg-ct/example``, 122 x 101 x 112 voxels
at 3 mm) by resampling it to 512 x 512 x 300 voxels over the same field of view (linear for the image,
nearest neighbour for the liver mask), and painting 5 slices of the liver with the data README's spread rule.

Each scenario runs in its own subprocess, so that its peak resident memory is its own and no model, cache
or thread pool is shared by accident:

- ``plain``: the unoptimised path: the PyTorch fp32 encoder, every slice of the volume encoded up front,
  then adaptation and propagation. Encoding all 300 slices takes several minutes on a 2-core CPU, so
  unless ``--plain-full`` is given the encoder is timed on ``--plain-sample`` slices and its total is
  extrapolated (and marked so in the output).
- ``first``: what a user gets: the default engine (ONNX Runtime on the CPU), only the slices the
  propagation needs encoded, an empty embedding cache. Stages: load, encode, adapt, propagate, write.
- ``re-propagate``: in the same process after ``first`` (as in Slicer), the user paints one more slice;
  the embeddings are cached in memory and the decoders continue from the first run's.
- ``cli-again``: the command line run a second time on the same files (a new process, the disk cache warm).

Prints a table per scenario and, with ``--markdown FILE``, appends it to a Markdown file.

    python benchmarks/speed.py                          # CPU
    python benchmarks/speed.py --device cuda            # GPU
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SOURCE = REPO.parent / "shared" / "data" / "totalseg-ct" / "example"
SIZE = (512, 512, 300)  # ITK order: columns, rows, slices
STRUCTURE = "liver"
PAINTED = 5


def build_case(workdir: Path, source: Path = SOURCE) -> tuple[Path, Path, Path]:
    """image.nii.gz, painted.nii.gz (5 slices) and corrected.nii.gz (one more slice) under ``workdir``."""
    import SimpleITK as sitk

    from SAMFewshotLib.baselines import spread_painted_slices

    workdir.mkdir(parents=True, exist_ok=True)
    image_path, painted_path, corrected_path = (workdir / n for n in ("image.nii.gz", "painted.nii.gz",
                                                                        "corrected.nii.gz"))
    if image_path.exists() and painted_path.exists() and corrected_path.exists():
        return image_path, painted_path, corrected_path
    image = sitk.ReadImage(str(source / "image.nii.gz"))
    mask = sitk.ReadImage(str(source / "labels" / f"{STRUCTURE}.nii.gz"))
    extent = [sz * sp for sz, sp in zip(image.GetSize(), image.GetSpacing())]
    spacing = [e / n for e, n in zip(extent, SIZE)]

    def resample(volume, interpolator, pixel):
        return sitk.Resample(volume, SIZE, sitk.Transform(), interpolator, image.GetOrigin(), spacing,
                             image.GetDirection(), 0, pixel)

    big_image = resample(image, sitk.sitkLinear, sitk.sitkInt16)
    big_mask = resample(mask, sitk.sitkNearestNeighbor, sitk.sitkUInt8)
    reference = sitk.GetArrayFromImage(big_mask) > 0
    axis = 0  # slices are the largest spacing
    slices = spread_painted_slices(reference, PAINTED, axis)
    extra = (slices[1] + slices[2]) // 2  # the "correction": one more slice painted between two others
    for path, chosen in ((painted_path, slices), (corrected_path, sorted(slices + [extra]))):
        painted = np.zeros(reference.shape, np.uint8)
        painted[chosen] = reference[chosen]
        out = sitk.GetImageFromArray(painted)
        out.CopyInformation(big_mask)
        sitk.WriteImage(out, str(path), useCompression=True)
    sitk.WriteImage(big_image, str(image_path), useCompression=True)
    sitk.WriteImage(big_mask, str(workdir / "reference.nii.gz"), useCompression=True)
    return image_path, painted_path, corrected_path


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


def gpu_peak_mb(device: str) -> float | None:
    import torch

    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        return torch.cuda.max_memory_allocated() / 2**20
    return None


def dice_against_reference(labels: np.ndarray, workdir: Path, painted: list[int]) -> float:
    from SAMFewshotLib.metrics import dice
    from SAMFewshotLib.volume_io import read_volume

    reference = read_volume(workdir / "reference.nii.gz").array > 0
    keep = np.ones(reference.shape[0], bool)
    keep[painted] = False
    return float(dice(labels[keep] > 0, reference[keep]))


def scenario_first(args) -> dict:
    """``first`` then ``re-propagate`` in one process, as a Slicer session would run them."""
    import torch

    from SAMFewshotLib.pipeline import adapt_to_painted, get_model, propagate
    from SAMFewshotLib.volume_io import read_label_map, read_volume, write_label_map

    torch.set_num_threads(args.threads or torch.get_num_threads())
    workdir = Path(args.workdir)
    model = get_model("lite-medsam", args.device)  # loading the model is not part of a propagation
    cache = Path(args.cache_dir) / "user"
    out, previous = {}, None
    for name, labels_file in (("first", "painted.nii.gz"), ("re-propagate", "corrected.nii.gz")):
        encoded_before = (0, 0.0) if previous is None else (previous.embeddings.encoded_slices,
                                                            previous.embeddings.encode_seconds)
        started = time.perf_counter()
        image = read_volume(workdir / "image.nii.gz") if previous is None else previous.embeddings.volume
        painted = read_label_map(workdir / labels_file, image)
        loaded = time.perf_counter()
        adaptation = adapt_to_painted(image, painted.array, model=model, axis="auto", cache_dir=cache,
                                      previous=previous)
        result = propagate(adaptation, "default")
        propagated = time.perf_counter()
        write_label_map(result.labels, image, cache / f"{name}.nii.gz")
        written = time.perf_counter()
        embeddings = adaptation.embeddings
        encode = embeddings.encode_seconds - encoded_before[1]
        adapt = adaptation.timings["adapt"]  # the pipeline's own figure, encoding excluded
        out[name] = {
            "load": loaded - started,
            "encode": encode,
            "adapt": adapt,
            "propagate": (propagated - loaded) - encode - adapt,
            "write": written - propagated,
            "total": written - started,
            "slices encoded": embeddings.encoded_slices - encoded_before[0],
            "dice": dice_against_reference(result.labels, workdir, list(result.painted.indices)),
        }
        previous = adaptation
    out["first"]["peak RAM (MB)"] = peak_rss_mb()
    out["first"]["peak GPU (MB)"] = gpu_peak_mb(args.device)
    out["first"]["engine"] = "onnxruntime" if model.cpu_encoder is not None else "torch"
    return out


def scenario_plain(args) -> dict:
    """PyTorch fp32, every slice encoded up front, then the same adaptation and propagation."""
    import torch

    from SAMFewshotLib.embeddings import VolumeEmbeddings
    from SAMFewshotLib.painted_slices import find_painted_slices
    from SAMFewshotLib.pipeline import adapt_to_painted, get_model, propagate
    from SAMFewshotLib.volume_io import read_label_map, read_volume, write_label_map

    os.environ["SAMFEWSHOT_ENGINE"] = "torch"
    torch.set_num_threads(args.threads or torch.get_num_threads())
    workdir = Path(args.workdir)
    model = get_model("lite-medsam", args.device)
    started = time.perf_counter()
    image = read_volume(workdir / "image.nii.gz")
    painted = read_label_map(workdir / "painted.nii.gz", image)
    loaded = time.perf_counter()
    axis = find_painted_slices(painted.array, image.spacing, image.direction_matrix, "auto").axis
    # the slices encoded here go to the (empty) disk cache, where the pipeline below finds them
    cache = Path(args.cache_dir) / "plain"
    embeddings = VolumeEmbeddings(model, image, axis, cache_dir=cache)
    everything = list(range(embeddings.num_slices))
    sample = everything if args.plain_full else everything[:: max(1, len(everything) // args.plain_sample)]
    t = time.perf_counter()
    embeddings.ensure(sample)
    per_slice = (time.perf_counter() - t) / len(sample)
    encode = per_slice * len(everything)
    encoded = time.perf_counter()
    adaptation = adapt_to_painted(image, painted.array, model=model, axis=axis, cache_dir=cache)
    result = propagate(adaptation, "default")
    propagated = time.perf_counter()
    write_label_map(result.labels, image, cache / "plain.nii.gz")
    written = time.perf_counter()
    # slices the pipeline still had to encode (outside the sample) are already in the extrapolated total
    rest = propagated - encoded - adaptation.embeddings.encode_seconds
    adapt = adaptation.timings["adapt"]
    return {"plain": {
        "load": loaded - started,
        "encode": encode,
        "adapt": adapt,
        "propagate": rest - adapt,
        "write": written - propagated,
        "total": (loaded - started) + encode + rest + (written - propagated),
        "slices encoded": len(everything),
        "encoder s/slice": per_slice,
        "encode extrapolated from": None if args.plain_full else len(sample),
        "peak RAM (MB)": peak_rss_mb(),
        "peak GPU (MB)": gpu_peak_mb(args.device),
        "engine": "torch",
        "dice": dice_against_reference(result.labels, workdir, list(result.painted.indices)),
    }}


def scenario_cli_again(args) -> dict:
    """``samfewshot segment`` on the corrected labels, in a new process, with the disk cache warm."""
    workdir = Path(args.workdir)
    command = [sys.executable, "-m", "SAMFewshotLib.cli", "segment", str(workdir / "image.nii.gz"),
               str(workdir / "corrected.nii.gz"), "-o", str(Path(args.cache_dir) / "user" / "cli.nii.gz"),
               "--cache-dir", str(Path(args.cache_dir) / "user"), "--device", args.device, "--quiet"]
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(completed.stderr)
    return {"cli-again": {"total": time.perf_counter() - started, "output": completed.stdout.strip()}}


def encoder_speed(args) -> dict:
    """Seconds per slice of each encoder engine on the same 16 slices of the volume (same process)."""
    import torch

    from SAMFewshotLib.embeddings import VolumeEmbeddings
    from SAMFewshotLib.models import load_model
    from SAMFewshotLib.volume_io import read_volume

    torch.set_num_threads(args.threads or torch.get_num_threads())
    image = read_volume(Path(args.workdir) / "image.nii.gz")
    result = {}
    reference = None
    for engine in ("torch", "onnxruntime"):
        os.environ["SAMFEWSHOT_ENGINE"] = "torch" if engine == "torch" else "auto"
        model = load_model("lite-medsam", args.device)
        # the ONNX export lands in the user cache, as after a first use: "first" then measures a propagation
        cache = Path(args.cache_dir) / "user"
        embeddings = VolumeEmbeddings(model, image, 0, cache_dir=cache, use_disk_cache=False)
        if engine == "onnxruntime":
            model.prepare_cpu_encoder(cache)
            if model.cpu_encoder is None:
                continue
        indices = list(range(100, 116))
        embeddings.ensure(indices[:1])  # warm-up
        started = time.perf_counter()
        embeddings.ensure(indices[1:])
        seconds = (time.perf_counter() - started) / (len(indices) - 1)
        values = embeddings.get(indices[1:]).float()
        difference = None if reference is None else float((values - reference).abs().max())
        reference = values if reference is None else reference
        result[engine] = {"s/slice": seconds, "max |difference| vs torch": difference}
    return {"encoder": result}


SCENARIOS = {"first": scenario_first, "plain": scenario_plain, "cli-again": scenario_cli_again,
             "encoder": encoder_speed}


def run_scenario(name: str, args) -> dict:
    command = [sys.executable, __file__, "--scenario", name, "--workdir", args.workdir, "--cache-dir",
               args.cache_dir, "--device", args.device, "--plain-sample", str(args.plain_sample)]
    if args.plain_full:
        command.append("--plain-full")
    if args.threads:
        command += ["--threads", str(args.threads)]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"scenario {name} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def machine_text(device: str) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"
    if device != "cpu" and torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name(0)}"
    return text


def table(results: dict, device: str) -> str:
    stages = ["load", "encode", "adapt", "propagate", "write", "total", "slices encoded", "peak RAM (MB)",
              "peak GPU (MB)", "dice"]
    names = [n for n in ("plain", "first", "re-propagate") if n in results]
    lines = ["| stage | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for stage in stages:
        cells = []
        for n in names:
            value = results[n].get(stage)
            if value is None:
                cells.append("")
            elif stage == "slices encoded":
                cells.append(str(int(value)))
            elif stage == "dice":
                cells.append(f"{value:.3f}")
            elif "MB" in stage:
                cells.append(f"{value:.0f}")
            else:
                cells.append(f"{value:.1f} s")
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    plain, first = results.get("plain"), results.get("first")
    notes = []
    if plain and first:
        notes.append(f"speed-up of the first propagation over the plain fp32 path: {plain['total'] / first['total']:.1f}x")
    if plain and plain.get("encode extrapolated from"):
        notes.append(f"plain encode: {plain['encoder s/slice']:.2f} s/slice measured on "
                     f"{plain['encode extrapolated from']} slices, times {plain['slices encoded']} slices")
    if "cli-again" in results:
        notes.append(f"command line again on the corrected labels, disk cache warm: {results['cli-again']['total']:.1f} s "
                     f"({results['cli-again']['output']})")
    if "encoder" in results:
        for engine, values in results["encoder"].items():
            diff = values["max |difference| vs torch"]
            notes.append(f"encoder {engine}: {values['s/slice']:.2f} s/slice"
                         + ("" if diff is None else f" (max |difference| from torch {diff:.1e})"))
    if first:
        notes.append(f"engine of the first propagation: {first.get('engine')}")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "samfewshot-speed"))
    parser.add_argument("--cache-dir", default=None, help="embedding cache (default: a new empty folder)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--scenarios", nargs="+", default=["encoder", "plain", "first", "cli-again"])
    parser.add_argument("--plain-sample", type=int, default=16)
    parser.add_argument("--plain-full", action="store_true")
    parser.add_argument("--markdown", default=None, help="append the table to this Markdown file")
    parser.add_argument("--scenario", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.scenario:
        print(json.dumps(SCENARIOS[args.scenario](args)))
        return 0
    build_case(Path(args.workdir))
    if args.cache_dir is None:
        args.cache_dir = tempfile.mkdtemp(prefix="samfewshot-speed-cache-")
    results = {}
    for name in args.scenarios:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        results.update(run_scenario(name, args))
    header = (f"### {SIZE[0]}x{SIZE[1]}x{SIZE[2]} CT, {PAINTED} painted slices of the {STRUCTURE}, device {args.device}\n\n"
              f"{machine_text(args.device)}; {dt.date.today().isoformat()}; "
              f"command: `python benchmarks/speed.py --device {args.device}`\n\n")
    text = header + table(results, args.device)
    print(text)
    print(json.dumps(results, indent=1), file=sys.stderr)
    if args.markdown:
        with open(args.markdown, "a") as handle:
            handle.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
