"""Real MRML scenes for the module tests, from the ``slicer-core`` wheel (no Slicer application, no Qt).

``slicer-core`` gives real MRML, segmentation, volume and transform classes; the segmentation logic must be
given the scene (and kept alive) so that its converters are registered. ``slicer.mrmlScene`` is assigned
here because ``slicer.util`` helpers read it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "Testing" / "Data"
SAMPLE_CT = DATA / "sample_ct.nii.gz"
SAMPLE_REFERENCE = DATA / "sample_ct_reference.nii.gz"
SAMPLE_PAINTED = DATA / "sample_ct_painted.nii.gz"
PAINTED_LIVER_SLICES = (10, 18, 27, 35, 43)  # numpy axis 0 (axial) of the sample
LIVER, SPLEEN = 1, 2

for path in (REPO, REPO / "SAMFewshot"):  # SAMFewshotLib at the repo root, SAMFewshotMRML beside SAMFewshot.py
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

try:
    import slicer

    HAS_MRML = hasattr(slicer, "vtkMRMLScene")
except ImportError:  # no slicer-core
    slicer = None
    HAS_MRML = False


@dataclass
class Scene:
    scene: object
    segmentation_logic: object  # kept alive: it registers the segmentation converters
    volumes_logic: object


def new_scene() -> Scene:
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    segmentation_logic = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentation_logic.SetMRMLScene(scene)
    volumes_logic = slicer.vtkSlicerVolumesLogic()
    volumes_logic.SetMRMLScene(scene)
    return Scene(scene, segmentation_logic, volumes_logic)


def load_volume(context: Scene, path: Path = SAMPLE_CT, name: str = "CT"):
    """Read a file with Slicer's own reader (independent of the module's conversion code)."""
    node = context.volumes_logic.AddArchetypeVolume(str(path), name)
    assert node is not None, path
    return node


def read_array(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def new_segmentation(scene, volume_node, name: str = "Segmentation"):
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    return node


def add_segment(segmentation_node, name: str, color=(0.8, 0.4, 0.3)) -> str:
    segment_id = segmentation_node.GetSegmentation().AddEmptySegment("", name, list(color))
    assert segment_id, "segmentation converters are not registered (segmentation logic without a scene?)"
    return segment_id


def matrix4(rotation_degrees=(0.0, 0.0, 0.0), translation=(0.0, 0.0, 0.0)) -> np.ndarray:
    """4x4 rotation about x, then y, then z (degrees), then translation."""
    ax, ay, az = np.radians(rotation_degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    matrix = np.eye(4)
    matrix[:3, :3] = rz @ ry @ rx
    matrix[:3, 3] = translation
    return matrix


def add_linear_transform(scene, matrix: np.ndarray, name: str = "Transform"):
    from SAMFewshotMRML.geometry import numpy_to_vtk_matrix

    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    node.SetMatrixTransformToParent(numpy_to_vtk_matrix(matrix))
    return node


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a) != 0, np.asarray(b) != 0
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(a, b).sum() / total)


def scene_snapshot(scene, volume_node) -> dict:
    """Node IDs and every segment's voxels on ``volume_node``'s grid: equal snapshots = unchanged scene."""
    from SAMFewshotMRML.segments import read_segment_mask, segment_ids

    nodes = sorted(scene.GetNthNode(n).GetID() for n in range(scene.GetNumberOfNodes()))
    segments = {}
    for n in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")):
        node = scene.GetNthNodeByClass(n, "vtkMRMLSegmentationNode")
        for segment_id in segment_ids(node):
            segment = node.GetSegmentation().GetSegment(segment_id)
            segments[(node.GetID(), segment_id)] = (segment.GetName(),
                                                    read_segment_mask(node, segment_id, volume_node).tobytes())
    return {"nodes": nodes, "segments": segments}
