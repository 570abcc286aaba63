"""The Review area's guidance (SAMFewshot/SAMFewshotMRML/guidance.py) on real MRML from ``slicer-core``.

After a propagation every segment carries a ``SliceAdvice``: the library's per-slice confidence and suggested
slice, mapped to the volume node's own slice indices. Checked here: the advice of a real propagation (the
liver painted on 5 axial slices of the sample CT, one module-scoped run), the review list, the world
position the slice views jump to (round trip through RAS->IJK under linear and non-linear transforms), and
that the same CT stored flipped along the slice axis, under a transform, gets advice on the same anatomical
slices.

The flipped run checks that the model gets exactly the plain run's input and then reuses the plain run's
library result instead of adapting again (``test_slicer_mrml`` runs the model on a flipped volume and gets
the same result); what is tested is the mapping back to the node's slices and positions.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import mrml_helpers as h

pytestmark = pytest.mark.skipif(not h.HAS_MRML, reason="slicer-core (import slicer with vtkMRMLScene) is not installed")

if h.HAS_MRML:
    import slicer
    import vtk
    from vtk.util import numpy_support

    from SAMFewshotMRML import geometry, guidance, jobs, segments
    from SAMFewshotMRML.propagation import Options, SegmentResult, SliceAdvice, SliceNote, node_slice_indices
    from SAMFewshotMRML.workflow import Workflow

from conftest import TEST_CACHE_DIR as CACHE_DIR  # noqa: E402  (the session-wide embedding cache)

OPTIONS = {"cache_dir": CACHE_DIR, "device": "cpu", "seed": 0}
NAMES = {h.LIVER: "Liver"}  # one segment, as test_slicer_mrml: a second one would double the adaptation time
WORLD = h.matrix4((15, 0, 0), (10, -20, 5)) if h.HAS_MRML else None  # the flipped volume's parent transform


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def arrays():
    return {"ct": h.read_array(h.SAMPLE_CT), "painted": h.read_array(h.SAMPLE_PAINTED)}


def _painted_segmentation(scene, volume, painted):
    segmentation = h.new_segmentation(scene, volume)
    ids = {}
    for value, name in NAMES.items():
        ids[value] = h.add_segment(segmentation, name)
        segments.write_segment_mask(segmentation, ids[value], painted == value, volume)
    return segmentation, ids


@pytest.fixture(scope="module")
def plain(arrays):
    """The liver propagated from 5 painted axial slices through the worker-thread job; the library's inputs
    and results are recorded for the flipped test. (Run after test_slicer_mrml in one session, the module
    continues from that file's adaptation: same node and segment IDs, cached embeddings.)"""
    import SAMFewshotLib.pipeline as pipeline

    calls = []
    real = pipeline.segment_volume

    def recording(image, labels, **kwargs):
        result = real(image, labels, **kwargs)
        calls.append({"image": image.array.copy(), "labels": np.asarray(labels).copy(), "axis": kwargs["axis"],
                      "result": result})
        return result

    context = h.new_scene()
    volume = h.load_volume(context)
    segmentation, ids = _painted_segmentation(context.scene, volume, arrays["painted"])
    workflow = Workflow(context.scene)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "segment_volume", recording)
        job = workflow.start(workflow.prepare(volume, segmentation, options=Options(**OPTIONS)))
        finished = job.wait(timeout=3600)
    assert isinstance(finished, jobs.Finished), finished
    return {"context": context, "volume": volume, "segmentation": segmentation, "ids": ids,
            "outcome": finished.result, "calls": calls}


def _flipped_volume(context, ct):
    """The sample stored with its axial slices in reverse order, rotated, under a parent transform."""
    original = h.load_volume(context, name="original")
    n_k = ct.shape[0]
    new_to_old_ijk = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, n_k - 1], [0, 0, 0, 1]], dtype=float)
    local = h.matrix4((0, 0, 20)) @ geometry.ijk_to_ras(original) @ new_to_old_ijk
    volume = context.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "flipped")
    slicer.util.updateVolumeFromArray(volume, np.ascontiguousarray(ct[::-1]))
    volume.SetIJKToRASMatrix(geometry.numpy_to_vtk_matrix(local))
    volume.SetAndObserveTransformNodeID(h.add_linear_transform(context.scene, WORLD).GetID())
    return volume, h.matrix4((0, 0, 20))


def _advice_by_name(outcome) -> dict[str, SliceAdvice]:
    return {s.name: s.advice for s in outcome.segments}


def _slice_view_index(scene, volume, ras) -> int:
    """Jump a slice view, turned to the volume's slices, to ``ras``; the slice it then shows (RAS->IJK)."""
    slice_node = scene.AddNewNodeByClass("vtkMRMLSliceNode")
    slice_node.SetLayoutName("Review")
    slice_node.RotateToVolumePlane(volume)  # the default (axial) view turned to the volume's axial slices
    slicer.vtkMRMLSliceNode.JumpAllSlices(scene, *(float(v) for v in ras))  # offset mode: the plane moves
    plane_point = geometry.vtk_to_numpy_matrix(slice_node.GetSliceToRAS())[:3, 3]
    scene.RemoveNode(slice_node)
    return guidance.slice_index_at(volume, 0, plane_point)


# ---------------------------------------------------------------------------------------------- without the model


@pytest.mark.parametrize("permutation", [(0, 1, 2), (1, 0, 2), (2, 1, 0), (1, 2, 0)])
@pytest.mark.parametrize("flips", [(), (0,), (1, 2), (0, 1, 2)])
def test_canonical_slices_map_to_the_node_slices_at_the_same_place(permutation, flips):
    """Slice c of the canonical array and the node slice it maps to lie in the same plane of the world."""
    from SAMFewshotLib.volume_io import Volume

    shape = (5, 6, 7)
    direction = np.asarray(h.matrix4((8, -5, 12))[:3, :3])
    # a storage order: numpy axes permuted and flipped, geometry adjusted (as test_slicer_mrml does)
    stored_shape = tuple(shape[p] for p in permutation)
    columns, spacing, origin = np.zeros((3, 3)), [0.0] * 3, np.array([-100.0, 50.0, 20.0])
    base_spacing = (0.8, 0.9, 3.0)
    for new_axis, old_axis in enumerate(permutation):
        sign = -1.0 if new_axis in flips else 1.0
        columns[:, 2 - new_axis] = sign * direction[:, 2 - old_axis]
        spacing[2 - new_axis] = base_spacing[2 - old_axis]
        if new_axis in flips:
            origin += direction[:, 2 - old_axis] * base_spacing[2 - old_axis] * (shape[old_axis] - 1)
    stored = Volume(np.zeros(stored_shape, np.int16), tuple(spacing), tuple(origin), tuple(columns.ravel()))
    reorientation = geometry.Reorientation.for_direction(stored.direction)
    canonical = reorientation.volume_to_canonical(stored)

    def plane_offset(volume, numpy_axis, index):  # where slice ``index`` lies along that axis' direction
        cols = np.asarray(volume.direction).reshape(3, 3)
        axis_dir = cols[:, 2 - numpy_axis]
        point = np.asarray(volume.origin) + axis_dir * volume.spacing[2 - numpy_axis] * index
        return float(np.dot(point, axis_dir)), axis_dir

    for canonical_axis in range(3):
        node_axis = reorientation.axis_from_canonical(canonical_axis)
        mapping = node_slice_indices(reorientation, canonical_axis, stored_shape)
        assert sorted(mapping) == list(range(stored_shape[node_axis]))
        for c, n in enumerate(mapping):
            offset_c, dir_c = plane_offset(canonical, canonical_axis, c)
            offset_n, dir_n = plane_offset(stored, node_axis, int(n))
            assert abs(abs(float(np.dot(dir_c, dir_n))) - 1.0) < 1e-9
            assert offset_c * float(np.dot(dir_c, dir_n)) == pytest.approx(offset_n, abs=1e-6)


def _synthetic_segment(name="Liver", segment_id="liver"):
    notes = [
        SliceNote(0, 1.0, "outside", False),
        SliceNote(1, 0.35, "end", True, 40.0),
        SliceNote(2, 0.8, "walked", False, 10.0),
        SliceNote(3, 1.0, "painted", False),
        SliceNote(4, 0.41, "interpolated", False, 30.0),
        SliceNote(5, 0.6, "interpolated", False, 20.0),
        SliceNote(6, 1.0, "painted", False),
        SliceNote(7, 0.9, "end", False, 1.0),
    ]
    advice = SliceAdvice(segment_id, 0, "axial", notes, 4)
    mask = np.zeros((8, 4, 4), np.uint8)
    return SegmentResult(segment_id, name, None, mask, 0, (3, 6), None, advice)


def test_review_list_texts_and_uncertain_ends_from_synthetic_advice():
    liver = _synthetic_segment()
    items = guidance.review_items([liver], per_segment=None)
    assert [i.index for i in items] == [1, 4, 5, 2, 7]  # ascending, no painted or outside slice
    assert items[0].text == "Liver: slice 1 (axial): 0.35, uncertain end"
    assert items[1].text == "Liver: slice 4 (axial): 0.41, interpolated"
    assert [i.index for i in guidance.review_items([liver], per_segment=2)] == [1, 4]
    assert guidance.uncertain_ends_text([liver]) == (
        "Uncertain ends: Liver at axial slice 1. Check whether the structure stops there.")
    suggestion = guidance.suggestion([liver])
    assert suggestion.index == 4 and guidance.suggestion_text(suggestion) == "Go to suggested slice: 4 (axial, Liver)"
    # a second segment with more at stake wins the suggestion; the merged list stays ascending
    spleen = _synthetic_segment("Spleen", "spleen")
    spleen.advice.slices[5] = SliceNote(5, 0.1, "interpolated", False, 500.0)
    spleen.advice.suggested = 5
    both = guidance.review_items([liver, spleen])
    confidences = [i.confidence for i in both]
    assert confidences == sorted(confidences) and both[0].text == "Spleen: slice 5 (axial): 0.10, interpolated"
    assert guidance.suggestion([liver, spleen]).segment_name == "Spleen"
    # saved-model results have no advice: nothing to review
    plain = SegmentResult(None, "Model", None, liver.mask, 0)
    assert guidance.review_items([plain]) == [] and guidance.suggestion([plain]) is None
    assert guidance.uncertain_ends_text([plain]) == ""


def _grid_transform_node(scene, bounds_ras):
    """A non-linear (displacement grid) transform: a smooth bend of a few millimetres."""
    node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "bend")
    low, high = np.min(bounds_ras, axis=0) - 20, np.max(bounds_ras, axis=0) + 20
    dims = (8, 8, 8)
    grid = vtk.vtkImageData()
    grid.SetOrigin(*low)
    grid.SetSpacing(*((high - low) / (np.array(dims) - 1)))
    grid.SetDimensions(*dims)
    grid.AllocateScalars(vtk.VTK_DOUBLE, 3)
    displacement = numpy_support.vtk_to_numpy(grid.GetPointData().GetScalars()).reshape(*dims[::-1], 3)
    z, y, x = np.meshgrid(*(np.linspace(0, np.pi, n) for n in dims[::-1]), indexing="ij")
    displacement[..., 0] = 3 * np.sin(z)
    displacement[..., 1] = -2 * np.sin(x)
    displacement[..., 2] = 2 * np.sin(y)
    transform = slicer.vtkOrientedGridTransform()
    transform.SetDisplacementGridData(grid)
    transform.SetInterpolationModeToCubic()
    node.SetAndObserveTransformToParent(transform)
    return node


def test_slice_positions_round_trip_through_ras_to_ijk_under_linear_and_nonlinear_transforms(arrays):
    context = h.new_scene()
    volume = h.load_volume(context)
    shape = arrays["ct"].shape
    mask = np.zeros(shape, np.uint8)
    mask[10:30, 40:60, 20:50] = 1
    corners = np.array([geometry.ijk_to_ras(volume) @ [i, j, k, 1] for i, j, k in
                        itertools.product((0, shape[2] - 1), (0, shape[1] - 1), (0, shape[0] - 1))])[:, :3]
    linear = h.add_linear_transform(context.scene, h.matrix4((10, -20, 30), (5, 6, -7)))
    bend = _grid_transform_node(context.scene, corners)
    bend.SetAndObserveTransformNodeID(linear.GetID())
    assert linear.IsTransformToWorldLinear() and not bend.IsTransformToWorldLinear()
    for parent in (None, linear, bend):
        volume.SetAndObserveTransformNodeID(parent.GetID() if parent is not None else None)
        for axis in range(3):
            for index in (0, 12, shape[axis] - 1):
                for with_mask in (None, mask):
                    ras = guidance.slice_position(volume, axis, index, with_mask)
                    assert guidance.slice_index_at(volume, axis, ras) == index, (parent, axis, index)
    # the position is the centre of the mask on that slice, moved by the transforms
    volume.SetAndObserveTransformNodeID(bend.GetID())
    ijk = guidance.world_to_ijk_point(volume, guidance.slice_position(volume, 0, 15, mask))
    assert np.allclose(ijk, [34.5, 49.5, 15], atol=1e-2)
    # a slice without the structure: the centre of the nearest slice that has it, on the asked slice
    ijk = guidance.world_to_ijk_point(volume, guidance.slice_position(volume, 0, 40, mask))
    assert np.allclose(ijk, [34.5, 49.5, 40], atol=1e-2)
    with pytest.raises(IndexError):
        guidance.slice_position(volume, 0, shape[0], mask)


# ---------------------------------------------------------------------------------------------- a real propagation


def test_outcome_carries_advice_for_each_propagated_segment(plain):
    from SAMFewshotLib.confidence import per_slice

    outcome = plain["outcome"]
    assert [s.name for s in outcome.segments] == list(NAMES.values())
    assert len(outcome.advice) == len(outcome.segments) == len(plain["calls"])
    for segment, call, value in zip(outcome.segments, plain["calls"], NAMES):
        advice = segment.advice
        assert advice.segment_id == segment.segment_id == plain["ids"][value]
        assert (advice.axis, advice.axis_name) == (0, "axial") and advice.axis == segment.axis
        assert [n.index for n in advice.slices] == list(range(segment.mask.shape[0]))
        assert all(0.0 <= n.confidence <= 1.0 for n in advice.slices)
        assert {n.index for n in advice.slices if n.kind == "painted"} == set(segment.indices)
        # the sample's axial slices are stored in the canonical order: the indices are the library's
        assert {n.index: n.confidence for n in advice.slices} == pytest.approx(per_slice(call["result"].confidence))
        assert advice.suggested == call["result"].suggested_slice


def test_suggested_slice_is_unpainted_inside_the_volume_and_its_position_maps_back(plain):
    volume = plain["volume"]
    review = guidance.Review.from_outcome(plain["outcome"])
    for segment in plain["outcome"].segments:
        suggested = segment.advice.suggested
        assert suggested is not None, f"{segment.name}: no suggestion"
        assert 0 <= suggested < segment.mask.shape[segment.advice.axis]
        assert suggested not in segment.indices
        assert segment.advice.note(suggested).kind != "painted"
        ras = guidance.slice_position(volume, segment.advice.axis, suggested, segment.mask)
        assert guidance.slice_index_at(volume, segment.advice.axis, ras) == suggested
    item = review.suggestion()
    assert item is not None and str(item.index) in guidance.suggestion_text(item)
    ras = review.position(plain["context"].scene, item)
    assert guidance.slice_index_at(volume, item.axis, ras) == item.index
    assert _slice_view_index(plain["context"].scene, volume, ras) == item.index


def test_review_list_of_a_propagation_is_ascending_without_painted_slices(plain):
    outcome = plain["outcome"]
    items = guidance.review_items(outcome.segments)
    assert items
    confidences = [i.confidence for i in items]
    assert confidences == sorted(confidences)
    painted = {s.name: set(s.indices) for s in outcome.segments}
    assert all(i.index not in painted[i.segment_name] and i.kind not in ("painted", "outside") for i in items)
    for name in painted:
        assert 0 < sum(i.segment_name == name for i in items) <= guidance.LIST_PER_SEGMENT
    for item in items:
        assert item.text.startswith(f"{item.segment_name}: slice {item.index} (axial): {item.confidence:.2f}, ")
    every = guidance.review_items(outcome.segments, per_segment=None)
    assert len(every) == sum(n.kind not in ("painted", "outside") for a in outcome.advice for n in a.slices)


def test_flipped_volume_under_a_transform_gets_advice_on_the_same_anatomical_slices(arrays, plain):
    import SAMFewshotLib.pipeline as pipeline

    context = h.new_scene()
    volume, rotation = _flipped_volume(context, arrays["ct"])
    segmentation, _ = _painted_segmentation(context.scene, volume, np.ascontiguousarray(arrays["painted"][::-1]))
    recorded = list(plain["calls"])

    def same_input_same_result(image, labels, **kwargs):
        call = recorded.pop(0)
        assert np.array_equal(image.array, call["image"]), "the model must see the plain volume's voxels"
        assert np.array_equal(np.asarray(labels), call["labels"]) and kwargs["axis"] == call["axis"]
        return call["result"]

    workflow = Workflow(context.scene)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "segment_volume", same_input_same_result)
        outcome = workflow.run_now(workflow.prepare(volume, segmentation, options=Options(**OPTIONS)))
    assert not recorded
    n_k = arrays["ct"].shape[0]
    plain_advice, flipped_advice = _advice_by_name(plain["outcome"]), _advice_by_name(outcome)
    for name, expected in plain_advice.items():
        advice = flipped_advice[name]
        assert (advice.axis, advice.axis_name) == (0, "axial")
        assert advice.suggested == n_k - 1 - expected.suggested
        flipped_back = sorted((n._replace(index=n_k - 1 - n.index) for n in advice.slices), key=lambda n: n.index)
        assert flipped_back == expected.slices
    # The list: the same slices with the same confidences (ties may come in another order).
    plain_review, review = guidance.Review.from_outcome(plain["outcome"]), guidance.Review.from_outcome(outcome)
    assert {(i.segment_name, i.index, i.confidence) for i in review.items(None)} == {
        (i.segment_name, n_k - 1 - i.index, i.confidence) for i in plain_review.items(None)}
    # The suggestion: the same anatomical point, moved by the flipped volume's rotation and parent transform.
    plain_item, item = plain_review.suggestion(), review.suggestion()
    assert (item.segment_name, item.index) == (plain_item.segment_name, n_k - 1 - plain_item.index)
    expected_ras = (WORLD @ rotation @ np.r_[plain_review.position(plain["context"].scene, plain_item), 1.0])[:3]
    ras = review.position(context.scene, item)
    assert np.allclose(ras, expected_ras, atol=1e-3)
    assert guidance.slice_index_at(volume, 0, ras) == item.index
    assert _slice_view_index(context.scene, volume, ras) == item.index
    # the voxel under that point holds the same intensity as in the plain volume
    ijk = np.round(guidance.world_to_ijk_point(volume, ras)).astype(int)
    plain_ijk = np.round(guidance.world_to_ijk_point(plain["volume"], plain_review.position(
        plain["context"].scene, plain_item))).astype(int)
    assert arrays["ct"][::-1][ijk[2], ijk[1], ijk[0]] == arrays["ct"][plain_ijk[2], plain_ijk[1], plain_ijk[0]]


def test_nothing_here_marks_the_same_anatomical_slice_of_a_flipped_volume_under_a_transform(arrays):
    import SAMFewshotLib.pipeline as pipeline

    context = h.new_scene()
    volume, _ = _flipped_volume(context, arrays["ct"])
    segmentation, ids = _painted_segmentation(context.scene, volume, np.ascontiguousarray(arrays["painted"][::-1]))
    n_k = arrays["ct"].shape[0]
    workflow = Workflow(context.scene)
    workflow.mark_empty(volume, segmentation, ids[h.LIVER], 0, n_k - 1 - 45)  # the plain volume's slice 45
    (painted,) = workflow.painted_segments(volume, segmentation)
    assert painted.empty == (n_k - 1 - 45,)
    tag = vtk.reference("")
    assert segmentation.GetSegmentation().GetSegment(ids[h.LIVER]).GetTag("SAMFewshot.CheckedEmpty", tag)
    assert str(tag).startswith("axial:")
    seen = {}

    class Seen(Exception):
        pass

    def capture(image, labels, **kwargs):
        seen.update(kwargs)
        raise Seen

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "segment_volume", capture)
        with pytest.raises(Seen):
            workflow.run_now(workflow.prepare(volume, segmentation, options=Options(**OPTIONS)))
    assert seen["empty_slices"] == [45]  # what the model sees is the plain volume's order
