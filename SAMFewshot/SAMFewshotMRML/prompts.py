"""Click to segment: foreground/background points and a box placed in the slice views give a mask at once.

The user places markups (a fiducial list of foreground points, one of background points, an ROI as the box)
on one slice; the mask of that slice is previewed, and **Accept** writes it into the selected segment, where
few-shot propagation takes it as one more painted slice.

- **Where the clicks land.** Markup positions are world RAS. They go to the volume's local RAS through the
  volume's parent transform (linear or not), then to IJK, then through the same ``Reorientation`` that the
  propagation uses, to the voxel of the canonical array the model sees. The slice is the one that every point
  and the box centre share along the slice axis; anything else, or a point outside the volume, is refused
  with a message that says what to do.
- **Instant after the first click.** One ``InteractiveSession`` is kept per volume node and axis (for the most
  recent volume only): its slice embeddings stay in memory, so a further click on an encoded slice runs only
  SAM's decoder (a few tenths of a second on a CPU). A prompt encoder learned from painted slices is kept
  too, until the painting changes.
- **Methods.** "plain": SAM's own prompt encoder on points and/or a box (LiteMedSAM was trained with boxes
  only, so it needs a box); "zero-shot": a mask from foreground clicks only (``SAMFewshotLib.zero_shot``);
  "learned": a prompt encoder learned from the selected segment's painted slices
  (``SAMFewshotLib.prompt_learning``). Optionally the accepted slice's mask is walked to the neighbouring
  slices (``SAMFewshotLib.prompt_propagation``).
- **The workflow's rules.** Heavy work runs on the worker thread with copies (``PromptRequest`` in,
  ``PromptOutcome`` out, no MRML there). The result goes to a preview segmentation (``workflow.Workflow``'s);
  nothing changes until Accept. Accept only adds voxels, never on voxels of the segment or (unless allowed)
  of the segmentation's other segments, so nothing the user painted is overwritten; propagated slices skip
  every slice that already holds the segment. Accept is one undo step; Cancel or a failure leaves the scene
  unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import vtk

import slicer

from .geometry import Reorientation, geometry_from_matrix, ijk_to_ras, ijk_to_world, volume_from_node
from .jobs import Job, Progress
from .propagation import Options, Outcome, Request, SegmentResult
from .segments import occupied_slices, read_segment_mask, segment_color, segment_ids, write_segment_mask
from .workflow import UndoPoint, Workflow, _content_stamp

log = logging.getLogger(__name__)

METHODS = ("plain", "zero-shot", "learned")
METHOD_TEXT = {
    "plain": "box/points (plain SAM)",
    "zero-shot": "zero-shot from clicks",
    "learned": "learned from painted slices",
}
PROMPT_NODE_ATTRIBUTE = "SAMFewshot.Prompt"  # "foreground", "background" or "box" on the markups the module made
PREVIEW_NAME_SUFFIX = "click preview (SAMFewshot)"
DEFAULT_SEGMENT_NAME = "Clicked structure"
MODELS_WITHOUT_POINT_PROMPTS = ("lite-medsam",)  # trained with box prompts only: plain clicks mean nothing to it


def _error(message: str):
    from SAMFewshotLib.errors import InputError

    return InputError(message)


# ---------------------------------------------------------------------------------------------- markups


def control_points_world(markups_node) -> list[np.ndarray]:
    """World RAS positions of the defined control points of a markups node (none for None)."""
    if markups_node is None:
        return []
    defined = getattr(slicer.vtkMRMLMarkupsNode, "PositionDefined", None)
    positions = []
    for n in range(markups_node.GetNumberOfControlPoints()):
        if defined is not None and markups_node.GetNthControlPointPositionStatus(n) != defined:
            continue  # being placed, or its position was unset
        position = [0.0, 0.0, 0.0]
        markups_node.GetNthControlPointPositionWorld(n, position)
        positions.append(np.asarray(position, dtype=float))
    return positions


def roi_is_defined(roi_node) -> bool:
    return roi_node is not None and roi_node.GetNumberOfDefinedControlPoints() > 0


def roi_corners_world(roi_node) -> np.ndarray:
    """(8, 3) world RAS corners of an ROI (rotated ROIs and parent transforms included)."""
    to_world = roi_node.GetObjectToWorldMatrix()
    matrix = np.array([[to_world.GetElement(r, c) for c in range(4)] for r in range(4)])
    half = np.asarray(roi_node.GetSize(), dtype=float) / 2
    signs = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], dtype=float)
    corners = np.c_[signs * half, np.ones(8)]
    return (matrix @ corners.T).T[:, :3]


def roi_center_world(roi_node) -> np.ndarray:
    center = [0.0, 0.0, 0.0]
    roi_node.GetCenterWorld(center)
    return np.asarray(center, dtype=float)


@dataclass
class PromptNodes:
    """The markups the widget places: foreground points, background points and one box."""

    foreground: object
    background: object
    box: object

    def clear(self) -> None:
        """Remove every point and the box (the nodes stay, ready for the next clicks)."""
        for node in (self.foreground, self.background, self.box):
            if node is not None:
                node.RemoveAllControlPoints()

    def positions(self) -> list[np.ndarray]:
        """World RAS of every defined point and of the box centre."""
        positions = control_points_world(self.foreground) + control_points_world(self.background)
        if roi_is_defined(self.box):
            positions.append(roi_center_world(self.box))
        return positions

    @property
    def empty(self) -> bool:
        return not self.positions()


PROMPT_COLORS = {"foreground": (0.2, 0.9, 0.2), "background": (0.95, 0.25, 0.2), "box": (1.0, 0.85, 0.1)}


def prompt_nodes(scene) -> PromptNodes:
    """The module's prompt markups in the scene, created (once) when missing; found again after a reload."""
    found = {}
    for class_name in ("vtkMRMLMarkupsFiducialNode", "vtkMRMLMarkupsROINode"):
        for n in range(scene.GetNumberOfNodesByClass(class_name)):
            node = scene.GetNthNodeByClass(n, class_name)
            role = node.GetAttribute(PROMPT_NODE_ATTRIBUTE)
            if role and role not in found:
                found[role] = node
    names = {"foreground": "SAMFewshot foreground points", "background": "SAMFewshot background points",
             "box": "SAMFewshot box"}
    for role, name in names.items():
        if role in found:
            continue
        class_name = "vtkMRMLMarkupsROINode" if role == "box" else "vtkMRMLMarkupsFiducialNode"
        node = scene.AddNewNodeByClass(class_name, name)
        node.SetAttribute(PROMPT_NODE_ATTRIBUTE, role)
        node.SetSaveWithScene(False)  # prompts are transient, like the preview
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        if display is not None:
            display.SetSelectedColor(PROMPT_COLORS[role])
            display.SetColor(PROMPT_COLORS[role])
            if role != "box" and hasattr(display, "SetPointLabelsVisibility"):
                display.SetPointLabelsVisibility(False)
        found[role] = node
    return PromptNodes(found["foreground"], found["background"], found["box"])


def view_normals_through(slice_nodes, positions, tolerance_mm: float) -> list[np.ndarray]:
    """World normals of the slice views whose plane holds every position (within ``tolerance_mm``).

    The widget passes the Red/Yellow/Green slice nodes: points placed in a view lie on its plane, so this
    names the axis the user clicked in (for ``locate_prompt``'s ``view_normals``).
    """
    normals = []
    if not positions:
        return normals
    for slice_node in slice_nodes:
        if slice_node is None:
            continue
        to_ras = slice_node.GetSliceToRAS()
        normal = np.array([to_ras.GetElement(r, 2) for r in range(3)])
        origin = np.array([to_ras.GetElement(r, 3) for r in range(3)])
        length = np.linalg.norm(normal)
        if not length:
            continue
        normal /= length
        if all(abs(float(np.dot(p - origin, normal))) <= tolerance_mm for p in positions):
            normals.append(normal)
    return normals


# ---------------------------------------------------------------------------------------------- geometry


def _world_to_ijk(volume_node) -> Callable[[np.ndarray], np.ndarray]:
    """World RAS -> continuous IJK of the volume node (through linear or non-linear parent transforms)."""
    ras_to_ijk = np.linalg.inv(ijk_to_ras(volume_node))
    parent = volume_node.GetParentTransformNode()
    if parent is None:
        to_local = None
    else:
        to_local = vtk.vtkGeneralTransform()
        slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(None, parent, to_local)

    def convert(position):
        position = [float(v) for v in position]
        if to_local is not None:
            position = list(to_local.TransformPoint(position))
        return (ras_to_ijk @ np.r_[position, 1.0])[:3]

    return convert


def _world_direction_to_ijk(volume_node, normal) -> np.ndarray:
    """A world direction (e.g. a view normal) in the volume's IJK (linear part only)."""
    to_world = ijk_to_world(volume_node)
    return np.linalg.solve(to_world[:3, :3], np.asarray(normal, dtype=float))


def canonical_index(reorientation: Reorientation, kji, shape) -> np.ndarray:
    """Continuous (k, j, i) of the node's array -> (n0, n1, n2) of the canonical (reoriented) array."""
    kji = np.asarray(kji, dtype=float)
    out = np.zeros(3)
    for n in range(3):
        c = 2 - n
        source = 2 - reorientation.order[c]  # numpy axis of the node's array
        value = kji[source]
        out[n] = shape[source] - 1 - value if reorientation.flip[c] else value
    return out


def node_slice_index(reorientation: Reorientation, canonical_axis: int, index: int, shape) -> int:
    """Slice ``index`` along canonical numpy ``canonical_axis`` -> its index along the node array's axis."""
    source = reorientation.axis_from_canonical(canonical_axis)
    return int(shape[source] - 1 - index) if reorientation.flip[2 - canonical_axis] else int(index)


@dataclass(frozen=True)
class PromptLocation:
    """Where the prompts are: one slice, in the node's array and in the canonical array the model sees."""

    node_axis: int  # numpy axis of the volume node's array
    node_index: int  # slice index along ``node_axis`` (as the painted slices are listed)
    axis: int  # numpy axis of the canonical array (the session's axis)
    index: int  # slice index along ``axis``
    axis_name: str  # "axial", "coronal" or "sagittal"
    prompt: object  # SAMFewshotLib.prompts.SlicePrompt, in the canonical slice's voxel coordinates
    reorientation: Reorientation
    shape: tuple[int, int, int]  # the node's array shape (K, J, I)

    def describe(self) -> str:
        prompt = self.prompt
        positive = sum(1 for label in prompt.point_labels if label == 1)
        negative = len(prompt.point_labels) - positive
        parts = []
        if positive:
            parts.append(f"{positive} foreground point{'s' if positive != 1 else ''}")
        if negative:
            parts.append(f"{negative} background point{'s' if negative != 1 else ''}")
        if prompt.box is not None:
            parts.append("a box")
        return f"{self.axis_name} slice {self.node_index}: {', '.join(parts)}"


def _axis_names(direction) -> list[str]:
    from SAMFewshotLib.painted_slices import anatomical_name

    return [anatomical_name(direction, axis) for axis in range(3)]


def locate_prompt(volume_node, foreground=None, background=None, roi=None, axis="auto",
                  view_normals=(), preferred_axis: int | None = None) -> PromptLocation:
    """Find the one slice the prompts lie on and convert them to a ``SlicePrompt`` on the canonical slice.

    Args:
        volume_node: the volume the prompts are placed on.
        foreground, background: markups fiducial nodes (or None) of foreground and background clicks.
        roi: a markups ROI node (or None) whose in-slice extent is the box; its centre sets the slice.
        axis: "auto", "axial", "coronal" or "sagittal". With "auto" the axis is one along which every point
            and the box centre lie on the same slice, preferring: a view in ``view_normals`` (world normals of
            the views holding the points), the node's numpy ``preferred_axis`` (e.g. the painted slices'),
            an ROI as thin as a slice, then the axis of largest spacing (axial on a tie, whatever the storage
            order).
    Raises:
        InputError: no prompt, a point outside the volume, prompts on different slices, an empty box.
    """
    from SAMFewshotLib.painted_slices import default_slice_axis
    from SAMFewshotLib.prompts import SlicePrompt

    if volume_node is None or volume_node.GetImageData() is None:
        raise _error("Choose the volume to segment.")
    spacing, _, direction = geometry_from_matrix(ijk_to_world(volume_node))
    reorientation = Reorientation.for_direction(direction)
    dims = volume_node.GetImageData().GetDimensions()
    shape = (dims[2], dims[1], dims[0])
    canonical_shape = tuple(shape[2 - reorientation.order[2 - n]] for n in range(3))
    canonical_direction = reorientation_direction(reorientation, direction)
    names = _axis_names(canonical_direction)
    to_ijk = _world_to_ijk(volume_node)

    points = []  # (description, label, canonical continuous index)
    for label, node, word in ((1, foreground, "foreground"), (0, background, "background")):
        for number, position in enumerate(control_points_world(node), start=1):
            kji = to_ijk(position)[::-1]
            if np.any(kji < -0.5) or np.any(kji > np.asarray(shape) - 0.5):
                raise _error(f"{word.capitalize()} point {number} ({_ras_text(position)}) is outside the volume "
                             f"'{volume_node.GetName()}'; place it on the image, or delete it.")
            points.append((f"{word} point {number}", label, canonical_index(reorientation, kji, shape)))
    box_center = box_corners = None
    if roi_is_defined(roi):
        center_kji = to_ijk(roi_center_world(roi))[::-1]
        if np.any(center_kji < -0.5) or np.any(center_kji > np.asarray(shape) - 0.5):
            raise _error(f"The box's centre ({_ras_text(roi_center_world(roi))}) is outside the volume "
                         f"'{volume_node.GetName()}'; draw the box on the image.")
        box_center = canonical_index(reorientation, center_kji, shape)
        box_corners = np.array([canonical_index(reorientation, to_ijk(c)[::-1], shape) for c in roi_corners_world(roi)])
    if not points and box_center is None:
        raise _error("Place foreground points or a box on a slice first.")
    if not any(label == 1 for _, label, _ in points) and box_center is None:
        raise _error("Background points alone do not say what to segment: add a foreground point or a box.")

    located = [(description, index) for description, _, index in points]
    if box_center is not None:
        located.append(("the box centre", box_center))

    def slice_of(index, a):
        return int(np.clip(np.floor(index[a] + 0.5), 0, canonical_shape[a] - 1))

    def on_one_slice(a):
        return len({slice_of(index, a) for _, index in located}) == 1

    if axis in (None, "", "auto"):
        order = []
        for normal in view_normals:
            ijk = _world_direction_to_ijk(volume_node, normal)
            node_axis = 2 - int(np.argmax(np.abs(ijk) * np.asarray(spacing)))
            order.append(reorientation.axis_to_canonical(node_axis))
        if preferred_axis is not None:
            order.append(reorientation.axis_to_canonical(int(preferred_axis)))
        if box_corners is not None:
            extent = box_corners.max(axis=0) - box_corners.min(axis=0)
            order.extend(int(a) for a in np.flatnonzero(extent < 1.0))
        # the axis of largest spacing, as for painted slices; on a tie the canonical axial one (axis 0)
        order.append(default_slice_axis(tuple(spacing[reorientation.order[c]] for c in range(3))))
        order.extend(range(3))
        chosen = next((a for a in order if on_one_slice(a)), None)
        if chosen is None:
            chosen = order[0]
            raise _error(_different_slices_message(located, chosen, names, reorientation, shape, slice_of)
                         + " Put them all on one slice (clear the prompts and click in one view).")
    else:
        from SAMFewshotLib.painted_slices import numpy_axis_for

        chosen = numpy_axis_for(axis, canonical_direction)
        if not on_one_slice(chosen):
            raise _error(_different_slices_message(located, chosen, names, reorientation, shape, slice_of)
                         + f" Put them all on one {names[chosen]} slice, or choose another slice axis.")
    index = slice_of(located[0][1], chosen)
    rows_axis, cols_axis = (a for a in range(3) if a != chosen)
    rows, cols = canonical_shape[rows_axis], canonical_shape[cols_axis]

    # sub-voxel positions are kept (SAM takes them), rounded so that float noise from the matrices does not
    # make the same click on the same anatomy differ between storage orders
    coords = tuple((round(float(np.clip(p[cols_axis], 0, cols - 1)), 4),
                    round(float(np.clip(p[rows_axis], 0, rows - 1)), 4)) for _, _, p in points)
    labels = tuple(label for _, label, _ in points)
    box = None
    if box_corners is not None:
        box = _box_on_slice(box_corners, box_center, rows_axis, cols_axis, rows, cols)
    prompt = SlicePrompt(coords, labels, box)
    node_axis = reorientation.axis_from_canonical(chosen)
    return PromptLocation(node_axis, node_slice_index(reorientation, chosen, index, shape), chosen, index,
                          names[chosen], prompt, reorientation, shape)


def reorientation_direction(reorientation: Reorientation, direction) -> np.ndarray:
    """The 3x3 LPS direction of the canonical array (as ``Reorientation.volume_to_canonical`` gives it)."""
    columns = np.asarray(direction, dtype=float).reshape(3, 3)
    out = np.zeros((3, 3))
    for c in range(3):
        out[:, c] = (-1.0 if reorientation.flip[c] else 1.0) * columns[:, reorientation.order[c]]
    return out


def _box_on_slice(corners, center, rows_axis, cols_axis, rows, cols):
    """(x0, y0, x1, y1): the first and last column and row whose voxel centres the box covers."""

    def span(axis, size):
        low, high = float(corners[:, axis].min()), float(corners[:, axis].max())
        first, last = int(np.ceil(low - 1e-6)), int(np.floor(high + 1e-6))
        if first > last:  # thinner than a voxel: the voxel holding its centre
            first = last = int(np.floor(center[axis] + 0.5))
        if last < 0 or first > size - 1:
            return None
        return max(first, 0), min(last, size - 1)

    x = span(cols_axis, cols)
    y = span(rows_axis, rows)
    if x is None or y is None:
        raise _error("The box lies outside the volume; draw it on the image.")
    if x[0] == x[1] and y[0] == y[1]:
        raise _error("The box is a single voxel: draw it around the structure (click two opposite corners).")
    return (float(x[0]), float(y[0]), float(x[1]), float(y[1]))


def _different_slices_message(located, axis, names, reorientation, shape, slice_of) -> str:
    by_slice: dict[int, list[str]] = {}
    for description, index in located:
        node_index = node_slice_index(reorientation, axis, slice_of(index, axis), shape)
        by_slice.setdefault(node_index, []).append(description)
    where = "; ".join(f"{', '.join(items)} on {names[axis]} slice {k}" for k, items in sorted(by_slice.items()))
    return f"The points and the box are not on one slice: {where}."


def _ras_text(position) -> str:
    return ", ".join(f"{v:.1f}" for v in position) + " RAS"


# ---------------------------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class PromptOptions:
    """How to segment from clicks. ``model``/``device``/``cache_dir`` as for propagation (``Options``)."""

    method: str = "plain"  # "plain", "zero-shot" or "learned"
    model: str = "lite-medsam"
    device: str = "auto"
    axis: str = "auto"  # "auto", "axial", "coronal" or "sagittal"
    cache_dir: str | None = None
    seed: int = 0
    tune_encoder_steps: int = 0  # zero-shot only: fine-tune the encoder on the coarse mask (slow)
    learning_steps: int | None = None  # learned only: prompt-learning steps (None: the library's default)
    propagate: bool = False  # walk the mask to the neighbouring slices (SAM-auto)
    allow_overlap: bool = False  # Accept may add voxels that belong to the segmentation's other segments


@dataclass
class PromptRequest:
    """Everything the worker needs, copied on the main thread (no MRML)."""

    volume_node_id: str
    segmentation_node_id: str | None
    segment_id: str | None
    segment_name: str
    color: tuple[float, float, float] | None
    location: PromptLocation
    options: PromptOptions
    session_key: tuple
    image: object | None = None  # Volume in the node's order (world geometry); None when the session exists
    examples: np.ndarray | None = None  # "learned": the segment's painted mask, node grid (K, J, I) uint8
    examples_key: str = ""


@dataclass
class PromptOutcome:
    request: PromptRequest
    mask: np.ndarray  # (K, J, I) uint8 on the volume node's grid: the slice (or propagated slices)
    slices: tuple[int, ...]  # node slice indices along ``request.location.node_axis`` that hold the mask
    seconds: float
    encoded_slices: int = 0

    def summary(self) -> str:
        location = self.request.location
        voxels = int(np.count_nonzero(self.mask))
        if not voxels:
            return f"Nothing found on {location.axis_name} slice {location.node_index}; move or add prompts."
        where = (f"{len(self.slices)} {location.axis_name} slices" if len(self.slices) > 1
                 else f"{location.axis_name} slice {location.node_index}")
        encoded = f", {self.encoded_slices} slice{'s' if self.encoded_slices != 1 else ''} encoded" \
            if self.encoded_slices else ""
        return f"{voxels} voxels on {where} ({self.seconds:.1f} s{encoded})."


def _reporter(report):
    if report is None:
        return None
    words = {"encoding": "encoding the slice", "loading": "loading the model"}

    def progress(stage: str, done: int, total: int) -> None:
        text = words.get(stage.split(" ")[0], stage)
        report(Progress(f"{text} {done}/{total}" if total else text, int(done), int(total)))

    return progress


def _check_cancel(cancel) -> None:
    if cancel is not None and cancel.is_set():
        from SAMFewshotLib.errors import Cancelled

        raise Cancelled("cancelled; nothing was written.")


@dataclass
class _Cached:
    session: object
    encoders: dict = field(default_factory=dict)  # examples key -> learned prompt encoder


# ---------------------------------------------------------------------------------------------- the tool


class PromptTool:
    """Click-to-segment state of one module session in one scene: sessions, the preview, the undo step.

    Main thread: ``prepare`` (reads the scene), ``show_preview``, ``accept``, ``cancel_preview``, ``undo``.
    Worker thread: ``start(request)`` runs ``run`` in a ``Job``; ``run_now`` runs it on the calling thread.
    """

    def __init__(self, scene):
        self.scene = scene
        self.workflow = Workflow(scene)  # a preview and undo step of its own, apart from the propagation's
        self._sessions: dict[tuple, _Cached] = {}
        self._lock = threading.Lock()
        self.last_outcome: PromptOutcome | None = None

    def reset(self) -> None:
        """Forget sessions, preview and undo (the scene is closing: node IDs will be reused)."""
        self._sessions = {}  # not under the lock: a running job may hold it for seconds
        self.workflow.reset()
        self.last_outcome = None

    # ---------------------------------------------------------------- main thread: reading the scene

    def prepare(self, volume_node, foreground=None, background=None, roi=None, segmentation_node=None,
                segment_id: str | None = None, options: PromptOptions | None = None,
                view_normals=()) -> PromptRequest:
        """Locate the prompts and copy what the worker needs. Raises InputError when they cannot be used."""
        options = options or PromptOptions()
        if options.method not in METHODS:
            raise _error(f"unknown method '{options.method}'; use {', '.join(METHODS)}.")
        segment_name, color, examples, examples_key, painted_axis = DEFAULT_SEGMENT_NAME, None, None, "", None
        if segment_id and segmentation_node is not None:
            segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
            if segment is None:
                raise _error(f"'{segmentation_node.GetName()}' has no segment '{segment_id}'; choose a segment.")
            segment_name, color = segment.GetName(), segment_color(segmentation_node, segment_id)
        elif segment_id:
            raise _error("Choose the segmentation that holds the segment.")
        if options.method == "learned":
            if not segment_id:
                raise _error("Learned prompts are learned from a segment's painted slices: choose the segment.")
            examples = read_segment_mask(segmentation_node, segment_id, volume_node)
            if not examples.any():
                raise _error(f"Segment '{segment_name}' has no painted slice to learn from: paint it on a few "
                             "slices first, or use another method.")
            examples_key = hashlib.sha1(np.packbits(examples).tobytes() + repr(examples.shape).encode()).hexdigest()
            painted_axis = _painted_axis(examples, volume_node)
        location = locate_prompt(volume_node, foreground, background, roi, options.axis, view_normals,
                                 preferred_axis=painted_axis)
        prompt = location.prompt
        if options.method == "plain" and prompt.box is None and options.model.split(":")[0] in \
                MODELS_WITHOUT_POINT_PROMPTS:
            raise _error("LiteMedSAM was trained with boxes only and ignores plain point prompts: draw a box, or "
                         "choose 'Zero-shot from clicks' or 'Learned from painted slices'.")
        if options.method == "zero-shot" and not prompt.positive_points:
            raise _error("Zero-shot segments from foreground clicks: add at least one foreground point.")
        prompt.check(_slice_shape(location))
        key = self._session_key(volume_node, location.axis, options)
        with self._lock:
            cached = self._sessions.get(key)
        image = None if cached is not None else volume_from_node(volume_node)
        return PromptRequest(volume_node.GetID(), segmentation_node.GetID() if segmentation_node else None,
                             segment_id or None, segment_name, color, location, options, key, image,
                             examples, examples_key)

    @staticmethod
    def _session_key(volume_node, canonical_axis: int, options: PromptOptions) -> tuple:
        image = volume_node.GetImageData()
        world = tuple(np.round(ijk_to_world(volume_node), 6).ravel())
        return (volume_node.GetID(), image.GetAddressAsString("vtkImageData"), image.GetMTime(), world,
                int(canonical_axis), options.model, options.device, str(options.cache_dir))

    # ---------------------------------------------------------------- worker thread

    def start(self, request: PromptRequest) -> Job:
        """Run the request on a worker thread; poll the returned job from the main thread."""
        return Job(lambda report, cancel: self.run(request, report, cancel), name="SAMFewshot prompts").start()

    def run_now(self, request: PromptRequest, report=None, cancel=None) -> PromptOutcome:
        """Run on the calling thread (scripts, tests)."""
        return self.run(request, report, cancel)

    def run(self, request: PromptRequest, report: Callable[[Progress], None] | None = None,
            cancel: threading.Event | None = None) -> PromptOutcome:
        """Segment the slice (worker thread): only copies are touched, never MRML."""
        started = time.perf_counter()
        progress = _reporter(report)
        location, options = request.location, request.options
        reorientation = location.reorientation
        with self._lock:
            cached = self._session(request, progress, cancel)
            session = cached.session
            session.embeddings.progress, session.embeddings.cancel = progress, cancel
            encoded_before = session.embeddings.encoded_slices
            try:
                prompt_encoder = None
                if options.method == "learned":
                    prompt_encoder = cached.encoders.get(request.examples_key)
                    if prompt_encoder is None:
                        from SAMFewshotLib import prompt_learning

                        examples = reorientation.to_canonical(np.asarray(request.examples, dtype=np.uint8))
                        extra = {}
                        if options.learning_steps is not None and hasattr(prompt_learning, "PromptLearningSettings"):
                            extra["settings"] = dataclasses.replace(prompt_learning.PromptLearningSettings(),
                                                                    steps=int(options.learning_steps))
                        prompt_encoder = prompt_learning.learn_prompt_encoder(
                            session, examples, 1, seed=options.seed, progress=progress, cancel=cancel, **extra)
                        cached.encoders = {request.examples_key: prompt_encoder}  # only the latest painting
                _check_cancel(cancel)
                if options.method == "zero-shot":
                    from SAMFewshotLib.zero_shot import zero_shot_segment

                    result = zero_shot_segment(session, location.index, location.prompt,
                                               tune_encoder_steps=options.tune_encoder_steps, seed=options.seed,
                                               progress=progress, cancel=cancel)
                else:
                    result = session.segment(location.index, location.prompt, prompt_encoder=prompt_encoder)
                masks = [result]
                if options.propagate:
                    _check_cancel(cancel)
                    from SAMFewshotLib.prompt_propagation import walk_prompts

                    masks = list(walk_prompts(session, result, prompt_encoder=prompt_encoder, seed=options.seed,
                                              progress=progress, cancel=cancel).masks)
                    if not any(m.index == result.index for m in masks):
                        masks.insert(0, result)
                _check_cancel(cancel)
            finally:
                session.embeddings.progress = session.embeddings.cancel = None
            encoded = session.embeddings.encoded_slices - encoded_before
        canonical_shape = session.image.shape
        canonical = np.zeros(canonical_shape, dtype=np.uint8)
        stack = np.moveaxis(canonical, location.axis, 0)  # a view, as slice_stack gives it
        for item in masks:
            stack[item.index][np.asarray(item.mask, dtype=bool)] = 1
        mask = reorientation.from_canonical(canonical)
        slices = tuple(int(k) for k in occupied_slices(mask, location.node_axis))
        return PromptOutcome(request, mask, slices, time.perf_counter() - started, int(encoded))

    def _session(self, request: PromptRequest, progress, cancel) -> _Cached:
        """The session of the request's volume and axis (created on first use; called with the lock held)."""
        cached = self._sessions.get(request.session_key)
        if cached is not None:
            return cached
        if request.image is None:
            raise _error("The volume changed while the prompts were read; click Segment slice again.")
        from SAMFewshotLib.interactive import InteractiveSession

        options = request.options
        image = request.location.reorientation.volume_to_canonical(request.image)
        session = InteractiveSession(image, axis=request.location.axis, model=options.model, device=options.device,
                                     cache_dir=options.cache_dir, progress=progress, cancel=cancel)
        # the most recent volume only: embeddings of other volumes are dropped with their sessions
        for key in [k for k in self._sessions if k[:4] != request.session_key[:4]]:
            del self._sessions[key]
        cached = _Cached(session)
        self._sessions[request.session_key] = cached
        return cached

    # ---------------------------------------------------------------- main thread: preview, accept, undo

    def show_preview(self, outcome: PromptOutcome):
        """Show the outcome in a preview segmentation (replacing any previous click preview)."""
        request = outcome.request
        volume_node = self.scene.GetNodeByID(request.volume_node_id)
        if volume_node is None:
            raise _error("The volume was removed while the slice was segmented; nothing was changed.")
        target = self.scene.GetNodeByID(request.segmentation_node_id) if request.segmentation_node_id else None
        if request.segmentation_node_id and target is None:
            raise _error("The segmentation was removed while the slice was segmented; nothing was changed.")
        mask = outcome.mask
        if target is not None and not request.options.allow_overlap:
            mask = mask & (self._other_segments(target, request.segment_id, volume_node) == 0)
        existing = self._existing_segment(target, SegmentResult(request.segment_id, request.segment_name, None,
                                                                mask, None))
        if existing and len(outcome.slices) > 1:  # propagated: slices holding the segment are kept as they are
            mask = mask.copy()
            current = read_segment_mask(target, existing, volume_node)
            axis = request.location.node_axis
            locked = [int(k) for k in occupied_slices(current, axis) if k != request.location.node_index]
            if locked:
                index = [slice(None)] * 3
                index[axis] = locked
                mask[tuple(index)] = 0
        result = SegmentResult(request.segment_id, request.segment_name, request.color, mask.astype(np.uint8),
                               request.location.node_axis, ())
        fake = Outcome(Request(request.volume_node_id, request.segmentation_node_id, None, Options()), [result],
                       outcome.seconds)
        node = self.workflow.show_preview(fake)
        base = target.GetName() if target is not None else volume_node.GetName()
        node.SetName(f"{base} {PREVIEW_NAME_SUFFIX}")
        self.last_outcome = outcome
        return node

    @staticmethod
    def _other_segments(target, segment_id, volume_node) -> np.ndarray:
        """The union of the segmentation's segments other than ``segment_id``, on the volume's grid."""
        dims = volume_node.GetImageData().GetDimensions()
        union = np.zeros((dims[2], dims[1], dims[0]), dtype=np.uint8)
        for other in segment_ids(target):
            if other != segment_id:
                union |= read_segment_mask(target, other, volume_node)
        return union

    @staticmethod
    def _existing_segment(target, result) -> str | None:
        """The ID of the segment Accept writes into, if it exists already (by ID, then by name)."""
        if target is None:
            return None
        segmentation = target.GetSegmentation()
        if result.segment_id and segmentation.GetSegment(result.segment_id) is not None:
            return result.segment_id
        return segmentation.GetSegmentIdBySegmentName(result.name) or None

    @property
    def preview_node(self):
        return self.workflow.preview_node

    def cancel_preview(self) -> None:
        """Drop the preview; the segmentation is untouched."""
        self.workflow.cancel_preview()
        self.last_outcome = None

    def accept(self) -> str:
        """Add the preview to the segment as painted voxels (one undo step); returns the segment ID.

        Only voxels the segment does not hold yet are added, and none of the segmentation's other segments
        (unless ``allow_overlap``); propagated slices that already hold the segment are skipped entirely.
        """
        preview = self.workflow.preview
        outcome = self.last_outcome
        if preview is None or outcome is None or self.preview_node is None:
            raise _error("There is nothing to accept: segment a slice first.")
        request = outcome.request
        volume_node = self.scene.GetNodeByID(preview.volume_node_id)
        if volume_node is None:
            self.cancel_preview()
            raise _error("The volume was removed; nothing was changed.")
        target = None
        if preview.segmentation_node_id:
            target = self.scene.GetNodeByID(preview.segmentation_node_id)
            if target is None:
                raise _error("The segmentation was removed after the slice was segmented; choose one and segment "
                             "the slice again.")
        entry = preview.segments[0]
        mask = read_segment_mask(self.preview_node, entry.preview_segment_id, volume_node) != 0
        existing = self._existing_segment(target, entry.result)
        dims = volume_node.GetImageData().GetDimensions()
        current = (read_segment_mask(target, existing, volume_node) if existing
                   else np.zeros((dims[2], dims[1], dims[0]), dtype=np.uint8))
        added = mask & (current == 0)
        axis = request.location.node_axis
        if len(outcome.slices) > 1:  # propagated: slices that hold the segment stay as they are
            locked = [int(k) for k in occupied_slices(current, axis) if k != request.location.node_index]
            if locked:
                index = [slice(None)] * 3
                index[axis] = locked
                added[tuple(index)] = False
        if target is not None and not request.options.allow_overlap:
            added &= self._other_segments(target, existing, volume_node) == 0
        if not added.any():
            raise _error("Nothing to add: every voxel of the preview is already in the segment or in another "
                         "segment. Move the prompts, or Reject.")
        # nothing was changed so far; from here on one undo step covers everything (a new segment included)
        if target is None:
            target = self.workflow._new_segmentation(volume_node)
        history = slicer.vtkSegmentationHistory()
        history.SetSegmentation(target.GetSegmentation())
        history.SaveState()
        target_id = existing or self.workflow._target_segment(target, entry.result)
        write_segment_mask(target, target_id, added, volume_node, "add")
        self.workflow.cancel_preview()
        self.workflow.undo_point = UndoPoint(target.GetID(), history, _content_stamp(target), {})
        self.last_outcome = None
        return target_id

    @property
    def can_undo(self) -> bool:
        return self.workflow.can_undo

    def undo(self) -> None:
        """Restore the segmentation as it was before the last Accept."""
        self.workflow.undo()


def _slice_shape(location: PromptLocation) -> tuple[int, int]:
    shape = tuple(location.shape[2 - location.reorientation.order[2 - n]] for n in range(3))
    rows_axis, cols_axis = (a for a in range(3) if a != location.axis)
    return shape[rows_axis], shape[cols_axis]


def _painted_axis(mask: np.ndarray, volume_node) -> int | None:
    """The node's numpy axis of a segment's painted slices, or None when it cannot be told."""
    from .segments import painted_slices_of

    spacing, _, direction = geometry_from_matrix(ijk_to_world(volume_node))
    axis, _, _, _ = painted_slices_of(mask, spacing, direction)
    return axis
