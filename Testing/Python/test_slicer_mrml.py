"""The module's MRML glue (SAMFewshot/SAMFewshotMRML) on real MRML from ``slicer-core``, on the sample CT.

One propagation of the liver (5 painted axial slices) runs once per module (``propagated``) and is reused by
the preview/apply/undo tests; the flipped/oblique run and the saved-model run reuse its cached embeddings.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pytest

import mrml_helpers as h

pytestmark = pytest.mark.skipif(not h.HAS_MRML, reason="slicer-core (import slicer with vtkMRMLScene) is not installed")

if h.HAS_MRML:
    import slicer
    import vtk

    from SAMFewshotMRML import geometry, jobs, segments
    from SAMFewshotMRML.propagation import Options
    from SAMFewshotMRML.workflow import PREVIEW_ATTRIBUTE, PREVIEW_OPACITY, Workflow, added_voxels

from conftest import TEST_CACHE_DIR as CACHE_DIR  # noqa: E402  (the session-wide embedding cache)

from SAMFewshotLib.adapted_model import AdaptedModel  # noqa: E402
OPTIONS = {"cache_dir": CACHE_DIR, "device": "cpu", "seed": 0}
MIN_DICE = 0.8  # liver, unpainted slices (issue 4)
UNPAINTED = [k for k in range(48) if k not in h.PAINTED_LIVER_SLICES]


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def arrays():
    return {
        "ct": h.read_array(h.SAMPLE_CT),
        "reference": h.read_array(h.SAMPLE_REFERENCE),
        "painted": h.read_array(h.SAMPLE_PAINTED),
    }


def painted_scene(arrays, with_spleen=False):
    """A scene with the sample CT and a segmentation whose Liver segment holds the 5 painted slices."""
    context = h.new_scene()
    volume = h.load_volume(context)
    segmentation = h.new_segmentation(context.scene, volume)
    liver = h.add_segment(segmentation, "Liver", (0.9, 0.5, 0.4))
    segments.write_segment_mask(segmentation, liver, arrays["painted"] == h.LIVER, volume)
    spleen = None
    if with_spleen:
        spleen = h.add_segment(segmentation, "Spleen", (0.6, 0.3, 0.8))
        segments.write_segment_mask(segmentation, spleen, arrays["painted"] == h.SPLEEN, volume)
    return context, volume, segmentation, liver, spleen


@pytest.fixture(scope="module")
def propagated(arrays):
    """The one full propagation of the file: liver from 5 painted slices, through the worker-thread job."""
    context, volume, segmentation, liver, _ = painted_scene(arrays)
    workflow = Workflow(context.scene)
    request = workflow.prepare(volume, segmentation, options=Options(**OPTIONS))
    events = []
    job = workflow.start(request)
    outcome = job.wait(timeout=1800, on_event=events.append)
    assert isinstance(outcome, jobs.Finished), outcome
    return {"outcome": outcome.result, "events": events, "liver": liver}


def fresh_preview(arrays, propagated):
    """A new scene like the fixture's, showing the fixture's result as a preview (no model run)."""
    context, volume, segmentation, liver, _ = painted_scene(arrays)
    outcome = propagated["outcome"]
    request = dataclasses.replace(outcome.request, volume_node_id=volume.GetID(),
                                  segmentation_node_id=segmentation.GetID())
    workflow = Workflow(context.scene)
    preview = workflow.show_preview(dataclasses.replace(outcome, request=request))
    return context, volume, segmentation, liver, workflow, preview


# ---------------------------------------------------------------------------------------------- geometry


def test_volume_from_node_matches_simpleitk_reading_the_file(arrays):
    import SimpleITK as sitk

    context = h.new_scene()
    volume = geometry.volume_from_node(h.load_volume(context))
    image = sitk.ReadImage(str(h.SAMPLE_CT))
    assert np.array_equal(volume.array, arrays["ct"])
    assert np.allclose(volume.spacing, image.GetSpacing())
    assert np.allclose(volume.origin, image.GetOrigin(), atol=1e-4)
    assert np.allclose(volume.direction, image.GetDirection(), atol=1e-6)


def test_volume_from_node_applies_linear_parent_transforms():
    context = h.new_scene()
    node = h.load_volume(context)
    outer = h.add_linear_transform(context.scene, h.matrix4((10, 0, 25), (5, -7, 12)), "outer")
    inner = h.add_linear_transform(context.scene, h.matrix4((0, -15, 0), (1, 2, 3)), "inner")
    inner.SetAndObserveTransformNodeID(outer.GetID())
    node.SetAndObserveTransformNodeID(inner.GetID())
    in_world = geometry.volume_from_node(node)
    local = geometry.volume_from_node(node, world=False)
    assert not np.allclose(in_world.direction, local.direction)
    slicer.vtkSlicerTransformLogic.hardenTransform(node)  # Slicer's own code moves the geometry into the node
    hardened = geometry.volume_from_node(node, world=False)
    assert np.allclose(in_world.spacing, hardened.spacing)
    assert np.allclose(in_world.origin, hardened.origin, atol=1e-4)
    assert np.allclose(in_world.direction, hardened.direction, atol=1e-6)


def test_node_from_volume_round_trips_and_writes_what_simpleitk_reads(tmp_path):
    import SimpleITK as sitk
    from SAMFewshotLib.volume_io import Volume

    context = h.new_scene()
    direction = h.matrix4((20, -10, 35))[:3, :3]
    original = Volume(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6), (0.7, 1.1, 2.5), (10.0, -20.0, 30.0),
                      tuple(direction.ravel()))
    node = geometry.node_from_volume(context.scene, original, "round trip")
    back = geometry.volume_from_node(node)
    assert np.array_equal(back.array, original.array)
    assert back.same_geometry(original)
    storage = context.scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(tmp_path / "volume.nrrd"))
    assert storage.WriteData(node)
    image = sitk.ReadImage(str(tmp_path / "volume.nrrd"))
    assert np.array_equal(sitk.GetArrayFromImage(image), original.array)
    assert np.allclose(image.GetOrigin(), original.origin, atol=1e-4)
    assert np.allclose(image.GetDirection(), original.direction, atol=1e-5)


def _physical_points(volume, kji):
    """LPS positions of voxel indices (N, 3) in (k, j, i) order."""
    columns = np.asarray(volume.direction).reshape(3, 3)
    ijk = np.asarray(kji)[:, ::-1].astype(float)
    return np.asarray(volume.origin) + (columns @ (ijk * np.asarray(volume.spacing)).T).T


@pytest.mark.parametrize("permutation", [(0, 1, 2), (1, 0, 2), (2, 1, 0), (0, 2, 1), (1, 2, 0), (2, 0, 1)])
@pytest.mark.parametrize("flips", [(), (0,), (1, 2), (0, 1, 2)])
def test_reorientation_keeps_every_voxel_in_place_and_undoes_storage_order(permutation, flips):
    from SAMFewshotLib.volume_io import Volume

    rng = np.random.default_rng(0)
    base = Volume(rng.integers(0, 1000, (5, 6, 7)).astype(np.int16), (0.8, 0.9, 3.0), (-100.0, 50.0, 20.0),
                  tuple(h.matrix4((8, -5, 12))[:3, :3].ravel()))
    # The same image stored another way: numpy axes permuted and flipped, geometry adjusted to match.
    array = np.flip(np.transpose(base.array, permutation), flips) if flips else np.transpose(base.array, permutation)
    columns = np.asarray(base.direction).reshape(3, 3)
    new_columns, spacing, origin = np.zeros((3, 3)), [0.0] * 3, np.asarray(base.origin, dtype=float).copy()
    for new_numpy_axis, old_numpy_axis in enumerate(permutation):
        new_itk, old_itk = 2 - new_numpy_axis, 2 - old_numpy_axis
        sign = -1.0 if new_numpy_axis in flips else 1.0
        new_columns[:, new_itk] = sign * columns[:, old_itk]
        spacing[new_itk] = base.spacing[old_itk]
        if new_numpy_axis in flips:
            origin += columns[:, old_itk] * base.spacing[old_itk] * (base.array.shape[old_numpy_axis] - 1)
    stored = Volume(array, tuple(spacing), tuple(origin), tuple(new_columns.ravel()))

    reorientation = geometry.Reorientation.for_direction(stored.direction)
    canonical = reorientation.volume_to_canonical(stored)
    expected = geometry.Reorientation.for_direction(base.direction).volume_to_canonical(base)
    assert np.array_equal(canonical.array, expected.array)
    assert canonical.same_geometry(expected)
    assert np.array_equal(reorientation.from_canonical(canonical.array), stored.array)
    points = np.argwhere(np.ones(stored.shape, bool))
    values = stored.array[tuple(points.T)]
    canonical_points = np.round(np.linalg.solve(
        np.asarray(canonical.direction).reshape(3, 3) * np.asarray(canonical.spacing),
        (_physical_points(stored, points) - np.asarray(canonical.origin)).T).T).astype(int)[:, ::-1]
    assert np.array_equal(canonical.array[tuple(canonical_points.T)], values)
    for axis in range(3):
        assert reorientation.axis_from_canonical(reorientation.axis_to_canonical(axis)) == axis
        assert canonical.shape[reorientation.axis_to_canonical(axis)] == stored.shape[axis]


# ---------------------------------------------------------------------------------------------- segments


def test_masks_round_trip_through_shared_layers_overlaps_and_transforms(arrays):
    context = h.new_scene()
    volume = h.load_volume(context)
    volume.SetAndObserveTransformNodeID(h.add_linear_transform(context.scene, h.matrix4((0, 0, 30), (4, 5, 6))).GetID())
    segmentation = h.new_segmentation(context.scene, volume)
    segmentation.SetAndObserveTransformNodeID(
        h.add_linear_transform(context.scene, h.matrix4((12, 0, 0), (-3, 0, 9)), "segmentation transform").GetID())
    liver, spleen, empty = (h.add_segment(segmentation, n) for n in ("Liver", "Spleen", "Empty"))
    liver_mask = (arrays["reference"] == h.LIVER).astype(np.uint8)
    spleen_mask = (arrays["reference"] == h.SPLEEN).astype(np.uint8)
    segments.write_segment_mask(segmentation, liver, liver_mask, volume)
    segments.write_segment_mask(segmentation, spleen, spleen_mask, volume)
    assert segmentation.GetSegmentation().GetNumberOfLayers() == 1  # shared layer, told apart by label value
    assert np.array_equal(segments.read_segment_mask(segmentation, liver, volume), liver_mask)
    assert np.array_equal(segments.read_segment_mask(segmentation, spleen, volume), spleen_mask)
    assert not segments.read_segment_mask(segmentation, empty, volume).any()

    overlap = np.zeros_like(liver_mask)
    overlap[20, 40:60, 40:60] = 1  # overlaps the spleen or the liver: "add" never removes from other segments
    segments.write_segment_mask(segmentation, liver, overlap, volume, mode="add")
    assert np.array_equal(segments.read_segment_mask(segmentation, liver, volume), liver_mask | overlap)
    assert np.array_equal(segments.read_segment_mask(segmentation, spleen, volume), spleen_mask)
    # the same into the second segment of a shared layer: its voxels must not land in the first one
    more = np.zeros_like(spleen_mask)
    more[22, 10:30, 60:90] = 1
    segments.write_segment_mask(segmentation, spleen, more, volume, mode="add")
    spleen_mask = spleen_mask | more
    assert np.array_equal(segments.read_segment_mask(segmentation, spleen, volume), spleen_mask)
    assert np.array_equal(segments.read_segment_mask(segmentation, liver, volume), liver_mask | overlap)

    # Slicer's own transform code as the reference: harden both, then read without any transform.
    slicer.vtkSlicerTransformLogic.hardenTransform(volume)
    slicer.vtkSlicerTransformLogic.hardenTransform(segmentation)
    assert np.array_equal(segments.read_segment_mask(segmentation, spleen, volume), spleen_mask)


def test_masks_land_on_the_right_voxels_of_a_segmentation_with_a_finer_grid():
    from SAMFewshotLib.volume_io import Volume

    context = h.new_scene()
    identity = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    coarse = geometry.node_from_volume(context.scene, Volume(np.zeros((6, 8, 10), np.int16), (2.0, 2.0, 4.0),
                                                             (0.0, 0.0, 0.0), identity), "coarse")
    fine = geometry.node_from_volume(context.scene, Volume(np.zeros((12, 16, 20), np.int16), (1.0, 1.0, 2.0),
                                                           (-0.5, -0.5, -1.0), identity), "fine")
    segmentation = h.new_segmentation(context.scene, fine)  # the user's segmentation is on the fine grid
    segment = h.add_segment(segmentation, "A")
    first = np.zeros((6, 8, 10), np.uint8)
    first[2, 2:5, 3:7] = 1
    second = np.zeros_like(first)
    second[3, 2:5, 3:7] = 1
    segments.write_segment_mask(segmentation, segment, first, coarse, mode="add")
    segments.write_segment_mask(segmentation, segment, second, coarse, mode="add")
    assert np.array_equal(segments.read_segment_mask(segmentation, segment, coarse), first | second)
    assert segments.read_segment_mask(segmentation, segment, fine).sum() == 8 * (first | second).sum()


def test_painted_segments_are_listed_with_their_axis_and_slices(arrays):
    context, volume, segmentation, _, _ = painted_scene(arrays, with_spleen=True)
    h.add_segment(segmentation, "Kidney")
    lines = [p.describe() for p in Workflow(context.scene).painted_segments(volume, segmentation)]
    assert lines == [
        "Liver: 5 axial slices: 10, 18, 27, 35, 43",
        "Spleen: 4 axial slices: 18, 27, 35, 43",
        "Kidney: not painted yet",
    ]


def test_prepare_refuses_when_nothing_is_painted(arrays):
    from SAMFewshotLib.errors import InputError

    context = h.new_scene()
    volume = h.load_volume(context)
    segmentation = h.new_segmentation(context.scene, volume)
    h.add_segment(segmentation, "Liver")
    with pytest.raises(InputError, match="Nothing to propagate"):
        Workflow(context.scene).prepare(volume, segmentation)
    with pytest.raises(InputError, match="segmentation"):
        Workflow(context.scene).prepare(volume, None)


def test_added_voxels_never_touch_painted_or_set_voxels():
    preview = np.ones((4, 3, 3), np.uint8)
    current = np.zeros_like(preview)
    current[1, 0, 0] = 1  # painted slice 1 holds one voxel: the whole slice stays as painted
    added = added_voxels(preview, current, axis=0, painted=(3,))
    assert not added[1].any() and not added[3].any()
    assert added[0].all() and added[2].all()
    assert not added_voxels(preview, preview, axis=None).any()


# ---------------------------------------------------------------------------------------------- jobs


def test_job_reports_progress_then_result():
    def work(report, cancel):
        for n in range(3):
            report(jobs.Progress(f"step {n}", n + 1, 3))
        return 42

    events = []
    outcome = jobs.Job(work).start().wait(timeout=10, on_event=events.append)
    assert isinstance(outcome, jobs.Finished) and outcome.result == 42
    assert any(isinstance(e, jobs.Progress) for e in events)


def test_job_cancel_stops_the_work_and_reports_cancelled():
    started = threading.Event()

    def work(report, cancel):
        started.set()
        while True:
            if cancel.is_set():
                from SAMFewshotLib.errors import Cancelled

                raise Cancelled("stopped")
            time.sleep(0.01)

    job = jobs.Job(work).start()
    started.wait(5)
    job.cancel()
    assert isinstance(job.wait(timeout=5), jobs.Cancelled)


def test_job_failure_carries_the_error_and_traceback():
    def work(report, cancel):
        raise ValueError("broken input")

    outcome = jobs.Job(work).start().wait(timeout=5)
    assert isinstance(outcome, jobs.Failed)
    assert str(outcome.error) == "broken input" and "ValueError" in outcome.details


# ---------------------------------------------------------------------------------------------- propagation


def test_propagation_reports_named_stages(propagated):
    texts = " | ".join(e.text for e in propagated["events"] if isinstance(e, jobs.Progress))
    assert "Liver: " in texts
    assert "adapting the model" in texts and "propagating" in texts


def test_preview_has_the_result_with_the_volume_geometry_and_leaves_the_segmentation_alone(arrays, propagated):
    context, volume, segmentation, liver, workflow, preview = fresh_preview(arrays, propagated)
    assert preview.GetAttribute(PREVIEW_ATTRIBUTE) == "1"
    assert preview.GetDisplayNode().GetOpacity() == pytest.approx(PREVIEW_OPACITY)
    # Geometry identical: the reference geometry and the labelmap grid are the volume's.
    volume_geometry = slicer.vtkSegmentationConverter.SerializeImageGeometry(_oriented_geometry(volume))
    reference_name = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    assert preview.GetSegmentation().GetConversionParameter(reference_name) == volume_geometry
    preview_id = workflow.preview.segments[0].preview_segment_id
    labelmap = slicer.vtkOrientedImageData()
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    logic.GetSegmentBinaryLabelmapRepresentation(preview, preview_id, labelmap, False)
    matrix = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(matrix)
    assert np.allclose(geometry.vtk_to_numpy_matrix(matrix), geometry.ijk_to_ras(volume))
    # The result: painted slices identical, Dice on the others.
    result = segments.read_segment_mask(preview, preview_id, volume)
    painted = list(h.PAINTED_LIVER_SLICES)
    assert np.array_equal(result[painted], (arrays["painted"] == h.LIVER)[painted])
    score = h.dice(result[UNPAINTED], arrays["reference"][UNPAINTED] == h.LIVER)
    assert score >= MIN_DICE, f"liver Dice on unpainted slices {score:.3f} < {MIN_DICE}"
    # The user's segment is still just the painting.
    assert np.array_equal(segments.read_segment_mask(segmentation, liver, volume), arrays["painted"] == h.LIVER)


def _oriented_geometry(volume_node):
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(volume_node.GetImageData().GetDimensions())
    image.SetImageToWorldMatrix(geometry.numpy_to_vtk_matrix(geometry.ijk_to_ras(volume_node)))
    return image


def test_apply_adds_the_result_keeps_painted_voxels_and_undo_restores(arrays, propagated):
    context, volume, segmentation, liver, workflow, preview = fresh_preview(arrays, propagated)
    expected_preview = segments.read_segment_mask(preview, workflow.preview.segments[0].preview_segment_id, volume)
    before = segments.read_segment_mask(segmentation, liver, volume)
    assert workflow.apply() == [liver]
    assert context.scene.GetNodeByID(preview.GetID()) is None  # the preview is gone
    applied = segments.read_segment_mask(segmentation, liver, volume)
    painted = list(h.PAINTED_LIVER_SLICES)
    assert np.array_equal(applied[painted], (arrays["painted"] == h.LIVER)[painted])
    assert np.array_equal(applied[UNPAINTED], expected_preview[UNPAINTED])
    assert h.dice(applied[UNPAINTED], arrays["reference"][UNPAINTED] == h.LIVER) >= MIN_DICE
    assert workflow.can_undo
    workflow.undo()
    assert segments.segment_ids(segmentation) == [liver]
    assert np.array_equal(segments.read_segment_mask(segmentation, liver, volume), before)
    assert not workflow.can_undo


def test_apply_keeps_slices_painted_or_erased_after_the_preview(arrays, propagated):
    context, volume, segmentation, liver, workflow, preview = fresh_preview(arrays, propagated)
    preview_mask = segments.read_segment_mask(preview, workflow.preview.segments[0].preview_segment_id, volume)
    edited = (arrays["painted"] == h.LIVER).astype(np.uint8)
    edited[22] = 0
    edited[22, 30:50, 20:40] = 1  # a slice painted after the preview, differently from the preview
    edited[18, :, :60] = 0  # part of a painted slice erased after the preview
    segments.write_segment_mask(segmentation, liver, edited, volume)
    workflow.apply()
    applied = segments.read_segment_mask(segmentation, liver, volume)
    for k in (*h.PAINTED_LIVER_SLICES, 22):
        assert np.array_equal(applied[k], edited[k]), f"slice {k} was changed by Apply"
    others = [k for k in UNPAINTED if k != 22]
    assert np.array_equal(applied[others], preview_mask[others])


def test_undo_is_refused_after_the_segmentation_was_edited(arrays, propagated):
    from SAMFewshotLib.errors import InputError

    context, volume, segmentation, liver, workflow, _ = fresh_preview(arrays, propagated)
    workflow.apply()
    extra = np.zeros_like(arrays["painted"], dtype=np.uint8)
    extra[5, 10:20, 10:20] = 1
    segments.write_segment_mask(segmentation, liver, extra, volume, mode="add")
    assert not workflow.can_undo
    with pytest.raises(InputError, match="edited after Apply"):
        workflow.undo()


def test_cancel_preview_leaves_the_scene_as_before(arrays, propagated):
    context, volume, segmentation, _, _ = painted_scene(arrays)
    before = h.scene_snapshot(context.scene, volume)
    outcome = propagated["outcome"]
    workflow = Workflow(context.scene)
    request = dataclasses.replace(outcome.request, volume_node_id=volume.GetID(),
                                  segmentation_node_id=segmentation.GetID())
    workflow.show_preview(dataclasses.replace(outcome, request=request))
    workflow.cancel_preview()
    assert h.scene_snapshot(context.scene, volume) == before


def test_cancelled_and_failed_runs_leave_the_scene_unchanged(arrays, propagated):
    context, volume, segmentation, _, _ = painted_scene(arrays)
    workflow = Workflow(context.scene)
    before = h.scene_snapshot(context.scene, volume)

    # Cancel while it runs (embeddings are cached: it is adapting when the first report comes).
    job = workflow.start(workflow.prepare(volume, segmentation, options=Options(**OPTIONS)))
    deadline = time.monotonic() + 600
    while not any(isinstance(e, jobs.Progress) for e in job.poll()) and job.outcome is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    job.cancel()
    outcome = job.wait(timeout=30)
    assert isinstance(outcome, jobs.Cancelled)
    assert time.monotonic() - job.cancel_requested_at < 5, "Cancel took longer than a few seconds"

    # A run that fails (no such checkpoint) reports the error for the user.
    failing = workflow.prepare(volume, segmentation, options=Options(model="vit_b:/no/such/sam_vit_b.pth", **OPTIONS))
    outcome = workflow.start(failing).wait(timeout=120)
    assert isinstance(outcome, jobs.Failed)
    assert "no such file" in str(outcome.error)
    assert h.scene_snapshot(context.scene, volume) == before
    assert workflow.preview is None


def test_painted_slices_after_apply_include_slices_edited_later(arrays, propagated):
    context, volume, segmentation, liver, workflow, _ = fresh_preview(arrays, propagated)
    workflow.apply()
    (painted,) = workflow.painted_segments(volume, segmentation)
    assert painted.indices == h.PAINTED_LIVER_SLICES and not painted.edited_after_apply
    fix = segments.read_segment_mask(segmentation, liver, volume)
    fix[22] = 0
    fix[22, 30:50, 20:40] = 1
    segments.write_segment_mask(segmentation, liver, fix, volume)
    (painted,) = workflow.painted_segments(volume, segmentation)
    assert painted.indices == tuple(sorted((*h.PAINTED_LIVER_SLICES, 22))) and painted.edited_after_apply
    request = workflow.prepare(volume, segmentation)
    labels = request.tasks[0].labels
    assert np.array_equal(labels[22], fix[22]) and not labels[[k for k in UNPAINTED if k != 22]].any()


def test_nothing_here_keeps_the_slice_empty_and_the_propagation_stops_there(arrays, propagated):
    from SAMFewshotLib.errors import InputError

    before = propagated["outcome"].segments[0].mask
    assert before[45:].any(axis=(1, 2)).all()  # the liver goes on to the last slice, and the result follows it
    context, volume, segmentation, liver, _ = painted_scene(arrays)
    workflow = Workflow(context.scene)
    workflow.mark_empty(volume, segmentation, liver, 0, 45)  # the user looked at slice 45: "Nothing here"
    workflow.mark_empty(volume, segmentation, liver, 0, 45)  # twice is once
    (painted,) = workflow.painted_segments(volume, segmentation)
    assert painted.empty == (45,) and painted.describe().endswith("; nothing on 45")
    with pytest.raises(InputError, match="has voxels on slice 10"):
        workflow.mark_empty(volume, segmentation, liver, 0, 10)
    request = workflow.prepare(volume, segmentation, options=Options(**OPTIONS))
    assert request.tasks[0].empty == (45,) and request.tasks[0].indices == h.PAINTED_LIVER_SLICES
    after = workflow.run_now(request).segments[0].mask
    assert not after[45:].any()
    assert h.dice(after[:45], before[:45]) >= 0.98  # nothing else changes
    assert workflow.clear_empty(segmentation, [liver]) == 1
    assert workflow.painted_segments(volume, segmentation)[0].empty == ()


def test_a_slice_erased_after_apply_counts_as_nothing_here(arrays, propagated):
    context, volume, segmentation, liver, workflow, _ = fresh_preview(arrays, propagated)
    workflow.apply()
    mask = segments.read_segment_mask(segmentation, liver, volume)
    assert mask[46].any()
    mask[46] = 0  # the user erased a slice the result got wrong
    segments.write_segment_mask(segmentation, liver, mask, volume)
    (painted,) = workflow.painted_segments(volume, segmentation)
    assert painted.empty == (46,) and painted.indices == h.PAINTED_LIVER_SLICES
    assert workflow.prepare(volume, segmentation).tasks[0].empty == (46,)


# ---------------------------------------------------------------------------------------------- orientation


def test_flipped_oblique_volume_under_a_transform_gives_the_same_result(arrays, propagated):
    """The sample stored with K and J swapped and I reversed, rotated, under a parent transform."""
    context = h.new_scene()
    original = h.load_volume(context, name="original")
    n_i = arrays["ct"].shape[2]

    def store(a):  # B[k2, j2, i2] = A[j2, k2, n_i - 1 - i2]
        return np.ascontiguousarray(np.transpose(a, (1, 0, 2))[:, :, ::-1])

    def unstore(b):
        return np.ascontiguousarray(np.transpose(b[:, :, ::-1], (1, 0, 2)))

    new_to_old_ijk = np.array([[-1, 0, 0, n_i - 1], [0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=float)
    local = h.matrix4((0, 0, 20)) @ geometry.ijk_to_ras(original) @ new_to_old_ijk
    volume = context.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "flipped oblique")
    slicer.util.updateVolumeFromArray(volume, store(arrays["ct"]))
    volume.SetIJKToRASMatrix(geometry.numpy_to_vtk_matrix(local))
    volume.SetAndObserveTransformNodeID(
        h.add_linear_transform(context.scene, h.matrix4((15, 0, 0), (10, -20, 5))).GetID())
    segmentation = context.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")  # in world space, no transform
    segmentation.CreateDefaultDisplayNodes()
    liver = h.add_segment(segmentation, "Liver")
    segments.write_segment_mask(segmentation, liver, store(arrays["painted"] == h.LIVER), volume)

    workflow = Workflow(context.scene)
    (painted,) = workflow.painted_segments(volume, segmentation)
    assert painted.axis == 1 and painted.describe() == "Liver: 5 axial slices: 10, 18, 27, 35, 43"
    outcome = workflow.run_now(workflow.prepare(volume, segmentation, options=Options(**OPTIONS)))
    assert outcome.encoded_slices == 0, "the same image stored another way must reuse the cached embeddings"
    preview = workflow.show_preview(outcome)
    result = unstore(segments.read_segment_mask(preview, workflow.preview.segments[0].preview_segment_id, volume))
    expected = propagated["outcome"].segments[0].mask
    assert h.dice(result, expected) >= 0.99
    assert h.dice(result[UNPAINTED], arrays["reference"][UNPAINTED] == h.LIVER) >= MIN_DICE


# ---------------------------------------------------------------------------------------------- adapted models


def test_saved_adapted_model_segments_a_volume_without_painting(arrays, propagated, tmp_path):
    source = Workflow(h.new_scene().scene)
    source.adapted_models = {s.name: s.adapted for s in propagated["outcome"].segments}
    source.atlas_sources = {s.name: s.atlas_source for s in propagated["outcome"].segments}
    (path,) = source.save_adapted_models(tmp_path)
    assert path.name == "Liver.safetensors"

    context = h.new_scene()
    volume = h.load_volume(context, name="next patient")
    workflow = Workflow(context.scene)
    outcome = workflow.run_now(workflow.prepare_saved_models(volume, None, [path], Options(**OPTIONS)))
    workflow.show_preview(outcome)
    (segment_id,) = workflow.apply()
    created = context.scene.GetFirstNodeByClass("vtkMRMLSegmentationNode")
    assert created.GetSegmentation().GetSegment(segment_id).GetName() == "Liver"
    result = segments.read_segment_mask(created, segment_id, volume)
    # The saved model holds the propagated volume as its atlas, registered here onto the same CT loaded again;
    # no painted slice is pasted back, so the bar is the propagation's minus a margin: this checks the
    # save/load/apply path, not the model's quality.
    assert len(AdaptedModel.load(path).atlases) == 1
    assert h.dice(result, arrays["reference"] == h.LIVER) >= MIN_DICE - 0.1
    workflow.undo()  # the segment that Apply created goes away again
    assert segments.segment_ids(created) == []
