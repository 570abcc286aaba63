"""Click to segment (SAMFewshot/SAMFewshotMRML/prompts.py) on real MRML from ``slicer-core`` and the real model.

Markups are placed in world RAS on the sample CT, as a user's clicks in a slice view would be; the mask comes
from LiteMedSAM on the slice's cached embedding. The spleen is painted on axial slices 18, 27, 35 and 43;
the prompts go on the unpainted slice 22.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

import mrml_helpers as h

pytestmark = pytest.mark.skipif(not h.HAS_MRML, reason="slicer-core (import slicer with vtkMRMLScene) is not installed")

if h.HAS_MRML:
    import slicer

    from SAMFewshotMRML import geometry, jobs, segments
    from SAMFewshotMRML.prompts import (
        PREVIEW_NAME_SUFFIX,
        PromptOptions,
        PromptTool,
        locate_prompt,
        prompt_nodes,
        view_normals_through,
    )
    from SAMFewshotMRML.workflow import PREVIEW_ATTRIBUTE

from conftest import TEST_CACHE_DIR as CACHE_DIR  # noqa: E402  (the session-wide embedding cache)

LIB = h.REPO / "SAMFewshotLib"
OPTIONS = {"cache_dir": str(CACHE_DIR), "device": "cpu", "seed": 0}
SLICE = 22  # axial, unpainted for the spleen
MIN_DICE = 0.85  # spleen on one slice from a box (0.93 measured)


def _input_error():
    from SAMFewshotLib.errors import InputError

    return InputError


# ---------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def arrays():
    return {"reference": h.read_array(h.SAMPLE_REFERENCE), "painted": h.read_array(h.SAMPLE_PAINTED)}


def spleen_box(arrays, k=SLICE, margin=2):
    """(i0, j0, i1, j1) voxel box around the spleen on slice k, ``margin`` voxels wider on each side."""
    rows, cols = np.nonzero(arrays["reference"][k] == h.SPLEEN)
    return cols.min() - margin, rows.min() - margin, cols.max() + margin, rows.max() + margin


def add_roi(scene, ijk_to_frame, box, k, parent=None):
    """An ROI node covering voxel ``box`` on slice k: its faces half a voxel outside the voxel centres.

    ``ijk_to_frame`` maps IJK to the frame the ROI is defined in (RAS of its parent transform).
    """
    i0, j0, i1, j1 = box
    a = (ijk_to_frame @ [i0 - 0.5, j0 - 0.5, k, 1])[:3]
    b = (ijk_to_frame @ [i1 + 0.5, j1 + 0.5, k, 1])[:3]
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    if parent is not None:
        roi.SetAndObserveTransformNodeID(parent.GetID())
    roi.SetCenter(*((a + b) / 2))
    roi.SetSize(*np.abs(b - a))
    return roi


def add_points(scene, positions, name="points"):
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    for position in positions:
        node.AddControlPoint(*[float(v) for v in position])
    return node


def ras_of(volume_node, i, j, k):
    """World RAS of a voxel of the volume node (parent transforms included)."""
    return (geometry.ijk_to_world(volume_node) @ [i, j, k, 1])[:3]


def painted_scene(arrays):
    """The sample CT and a segmentation with the painted liver and spleen (as test_slicer_mrml builds it)."""
    context = h.new_scene()
    volume = h.load_volume(context)
    segmentation = h.new_segmentation(context.scene, volume)
    liver = h.add_segment(segmentation, "Liver", (0.9, 0.5, 0.4))
    spleen = h.add_segment(segmentation, "Spleen", (0.6, 0.3, 0.8))
    segments.write_segment_mask(segmentation, liver, arrays["painted"] == h.LIVER, volume)
    segments.write_segment_mask(segmentation, spleen, arrays["painted"] == h.SPLEEN, volume)
    return context, volume, segmentation, liver, spleen


def moved_to(outcome, volume, segmentation, segment_id):
    """The fixture's outcome as if computed in another scene (no model run)."""
    request = dataclasses.replace(outcome.request, volume_node_id=volume.GetID(),
                                  segmentation_node_id=segmentation.GetID(), segment_id=segment_id)
    return dataclasses.replace(outcome, request=request)


@pytest.fixture(scope="module")
def box_result(arrays):
    """The box around the spleen on slice 22, segmented once on the worker thread (reused by several tests)."""
    context, volume, segmentation, liver, spleen = painted_scene(arrays)
    roi = add_roi(context.scene, geometry.ijk_to_ras(volume), spleen_box(arrays), SLICE)
    tool = PromptTool(context.scene)
    request = tool.prepare(volume, roi=roi, segmentation_node=segmentation, segment_id=spleen,
                           options=PromptOptions(**OPTIONS))
    events = []
    outcome = tool.start(request).wait(timeout=600, on_event=events.append)
    assert isinstance(outcome, jobs.Finished), getattr(outcome, "details", outcome)
    return {"outcome": outcome.result, "context": context, "volume": volume, "segmentation": segmentation,
            "liver": liver, "spleen": spleen, "roi": roi, "tool": tool}


# ---------------------------------------------------------------------------------------------- the box


def test_box_around_the_spleen_gives_a_mask_on_that_slice_only(arrays, box_result):
    outcome = box_result["outcome"]
    location = outcome.request.location
    assert (location.axis_name, location.node_axis, location.node_index) == ("axial", 0, SLICE)
    assert location.describe() == f"axial slice {SLICE}: a box"
    assert outcome.slices == (SLICE,)
    others = [k for k in range(outcome.mask.shape[0]) if k != SLICE]
    assert not outcome.mask[others].any()
    score = h.dice(outcome.mask[SLICE], arrays["reference"][SLICE] == h.SPLEEN)
    assert score >= MIN_DICE, f"spleen Dice on slice {SLICE}: {score:.3f} < {MIN_DICE}"
    assert "voxels on axial slice 22" in outcome.summary()


def test_a_second_click_on_the_slice_only_runs_the_decoder(box_result):
    tool, volume = box_result["tool"], box_result["volume"]
    request = tool.prepare(volume, roi=box_result["roi"], segmentation_node=box_result["segmentation"],
                           segment_id=box_result["spleen"], options=PromptOptions(**OPTIONS))
    assert request.image is None, "the session is kept: the volume is not copied again"
    started = time.perf_counter()
    again = tool.run_now(request)
    assert again.encoded_slices == 0
    assert time.perf_counter() - started < 15  # the decoder alone (about 0.3 s on an idle CPU)
    assert np.array_equal(again.mask, box_result["outcome"].mask)
    assert len(tool._sessions) == 1


def test_preview_accept_keeps_painted_voxels_and_other_segments_and_undo_restores(arrays, box_result):
    context, volume, segmentation, liver, spleen = painted_scene(arrays)
    # The user already painted a few spleen voxels on slice 22, one of them outside what the model finds, and a
    # third segment overlaps the predicted spleen: Accept must keep the first and not take the second's voxels.
    i0, j0, i1, j1 = spleen_box(arrays, margin=0)
    spleen_now = (arrays["painted"] == h.SPLEEN).astype(np.uint8)
    spleen_now[SLICE, j0 - 1, i0 - 1] = 1
    rows, cols = np.nonzero(box_result["outcome"].mask[SLICE])
    spleen_now[SLICE, rows[0], cols[0]] = 1
    segments.write_segment_mask(segmentation, spleen, spleen_now, volume)
    other = h.add_segment(segmentation, "Other", (0.2, 0.2, 0.9))
    other_mask = np.zeros_like(spleen_now)
    other_mask[SLICE, rows[-3:], cols[-3:]] = 1
    segments.write_segment_mask(segmentation, other, other_mask, volume)
    before = h.scene_snapshot(context.scene, volume)

    tool = PromptTool(context.scene)
    outcome = moved_to(box_result["outcome"], volume, segmentation, spleen)
    preview = tool.show_preview(outcome)
    assert preview.GetAttribute(PREVIEW_ATTRIBUTE) == "1" and preview.GetName().endswith(PREVIEW_NAME_SUFFIX)
    shown = segments.read_segment_mask(preview, tool.workflow.preview.segments[0].preview_segment_id, volume)
    assert np.array_equal(shown, outcome.mask & (other_mask == 0))
    assert np.array_equal(segments.read_segment_mask(segmentation, spleen, volume), spleen_now)  # nothing yet

    assert tool.accept() == spleen
    assert context.scene.GetNodeByID(preview.GetID()) is None
    after = segments.read_segment_mask(segmentation, spleen, volume)
    others = [k for k in range(after.shape[0]) if k != SLICE]
    assert np.array_equal(after[others], spleen_now[others]), "Accept changed another slice"
    assert np.all(after[SLICE] >= spleen_now[SLICE]), "Accept removed painted voxels"
    expected = spleen_now[SLICE] | (outcome.mask[SLICE] & (other_mask[SLICE] == 0))
    assert np.array_equal(after[SLICE], expected)
    assert np.array_equal(segments.read_segment_mask(segmentation, other, volume), other_mask)
    assert np.array_equal(segments.read_segment_mask(segmentation, liver, volume), arrays["painted"] == h.LIVER)
    assert h.dice(after[SLICE], arrays["reference"][SLICE] == h.SPLEEN) >= MIN_DICE

    assert tool.can_undo
    tool.undo()
    assert h.scene_snapshot(context.scene, volume) == before
    assert not tool.can_undo


def test_accept_without_a_segmentation_creates_one_and_adds_nothing_twice(box_result):
    context = h.new_scene()
    volume = h.load_volume(context)
    tool = PromptTool(context.scene)
    original = box_result["outcome"]
    request = dataclasses.replace(original.request, volume_node_id=volume.GetID(), segmentation_node_id=None,
                                  segment_id=None, segment_name="Clicked structure", color=None)
    outcome = dataclasses.replace(original, request=request)
    tool.show_preview(outcome)
    segment_id = tool.accept()
    (created,) = [context.scene.GetNthNodeByClass(n, "vtkMRMLSegmentationNode")
                  for n in range(context.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"))]
    assert created.GetSegmentation().GetSegment(segment_id).GetName() == "Clicked structure"
    assert np.array_equal(segments.read_segment_mask(created, segment_id, volume), outcome.mask)

    again = dataclasses.replace(request, segmentation_node_id=created.GetID(), segment_id=segment_id)
    tool.show_preview(dataclasses.replace(outcome, request=again))
    before = h.scene_snapshot(context.scene, volume)
    with pytest.raises(_input_error(), match="Nothing to add"):
        tool.accept()
    assert h.scene_snapshot(context.scene, volume) == before
    tool.undo()  # the first Accept: the segment it created goes away
    assert segments.segment_ids(created) == []


def test_a_propagated_outcome_skips_the_painted_slices(arrays, box_result):
    """Masks on several slices (as "Propagate from this slice" gives them; made up here from the box result):
    the preview and Accept leave every slice that holds the segment as it is, and add the others."""
    context, volume, segmentation, _, spleen = painted_scene(arrays)
    outcome = moved_to(box_result["outcome"], volume, segmentation, spleen)
    mask = outcome.mask.copy()
    for k in (18, 21, 23):  # 18 is painted
        mask[k] = mask[SLICE]
    outcome = dataclasses.replace(outcome, mask=mask, slices=(18, 21, SLICE, 23))
    painted = (arrays["painted"] == h.SPLEEN).astype(np.uint8)
    tool = PromptTool(context.scene)
    preview = tool.show_preview(outcome)
    shown = segments.read_segment_mask(preview, tool.workflow.preview.segments[0].preview_segment_id, volume)
    assert not shown[18].any() and all(np.array_equal(shown[k], mask[k]) for k in (21, SLICE, 23))
    tool.accept()
    after = segments.read_segment_mask(segmentation, spleen, volume)
    assert np.array_equal(after[18], painted[18])
    for k in (21, SLICE, 23):
        assert np.array_equal(after[k], mask[k])
    others = [k for k in range(48) if k not in (21, SLICE, 23)]
    assert np.array_equal(after[others], painted[others])


def test_cancelled_preview_and_failed_run_leave_the_scene_unchanged(arrays, box_result):
    context, volume, segmentation, _, spleen = painted_scene(arrays)
    roi = add_roi(context.scene, geometry.ijk_to_ras(volume), spleen_box(arrays), SLICE)
    before = h.scene_snapshot(context.scene, volume)
    tool = PromptTool(context.scene)
    tool.show_preview(moved_to(box_result["outcome"], volume, segmentation, spleen))
    tool.cancel_preview()
    assert h.scene_snapshot(context.scene, volume) == before
    with pytest.raises(_input_error(), match="nothing to accept"):
        tool.accept()

    failing = tool.prepare(volume, roi=roi, segmentation_node=segmentation, segment_id=spleen,
                           options=PromptOptions(model="vit_b:/no/such/sam_vit_b.pth", **OPTIONS))
    result = tool.start(failing).wait(timeout=120)
    assert isinstance(result, jobs.Failed) and "no such file" in str(result.error)
    assert h.scene_snapshot(context.scene, volume) == before
    assert tool.preview_node is None


# ---------------------------------------------------------------------------------------------- refusals


def test_points_on_two_slices_or_outside_the_volume_are_refused():
    InputError = _input_error()
    context = h.new_scene()
    volume = h.load_volume(context)
    two_slices = add_points(context.scene, [ras_of(volume, 40, 50, 20), ras_of(volume, 45, 60, 30)])
    with pytest.raises(InputError, match=r"not on one slice: foreground point 1 on axial slice 20; "
                                         r"foreground point 2 on axial slice 30"):
        locate_prompt(volume, two_slices)
    with pytest.raises(InputError, match="not on one slice.*on one axial slice, or choose another slice axis"):
        locate_prompt(volume, two_slices, axis="axial")
    outside = add_points(context.scene, [ras_of(volume, 40, 50, 20), ras_of(volume, 40, 50, 60)])
    with pytest.raises(InputError, match="Foreground point 2 .* is outside the volume 'CT'"):
        locate_prompt(volume, outside)
    background_only = add_points(context.scene, [ras_of(volume, 40, 50, 20)])
    with pytest.raises(InputError, match="Background points alone"):
        locate_prompt(volume, None, background_only)
    with pytest.raises(InputError, match="Place foreground points or a box"):
        locate_prompt(volume)


def test_plain_clicks_without_a_box_are_refused_for_litemedsam():
    context = h.new_scene()
    volume = h.load_volume(context)
    points = add_points(context.scene, [ras_of(volume, 40, 50, 20)])
    with pytest.raises(_input_error(), match="trained with boxes only"):
        PromptTool(context.scene).prepare(volume, points, options=PromptOptions(**OPTIONS))
    with pytest.raises(_input_error(), match="choose the segment"):
        PromptTool(context.scene).prepare(volume, points, options=PromptOptions(method="learned", **OPTIONS))


def test_clicks_map_to_the_voxel_and_the_view_picks_the_axis():
    context = h.new_scene()
    volume = h.load_volume(context)
    # voxel (i, j, k) = (40, 50, 20); I runs to the right and J forward, so the canonical array (the model's
    # L, P, S) has both reversed
    points = add_points(context.scene, [ras_of(volume, 40, 50, 20), ras_of(volume, 44.4, 50, 20)])
    location = locate_prompt(volume, points)
    n_j, n_i = 101, 122
    assert location.node_index == 20 and location.axis_name == "axial"
    assert np.allclose(location.prompt.points, [(n_i - 1 - 40, n_j - 1 - 50), (n_i - 1 - 44.4, n_j - 1 - 50)])
    assert location.prompt.point_labels == (1, 1)
    # Both points are on coronal slice j = 50 too: a coronal view through them makes that the slice.
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(context.scene)
    views = []
    for name, orientation in (("Red", "Axial"), ("Green", "Coronal"), ("Yellow", "Sagittal")):
        view = context.scene.AddNewNodeByClass("vtkMRMLSliceNode")
        view.SetLayoutName(name)
        view.SetOrientation(orientation)
        views.append(view)
    views[0].JumpSliceByCentering(*ras_of(volume, 0, 0, 7))  # the axial view elsewhere
    views[1].JumpSliceByCentering(*ras_of(volume, 40, 50, 20))
    normals = view_normals_through(views, [ras_of(volume, 40, 50, 20), ras_of(volume, 44.4, 50, 20)], 1.5)
    assert len(normals) == 1
    coronal = locate_prompt(volume, points, view_normals=normals)
    assert coronal.axis_name == "coronal" and coronal.node_axis == 1 and coronal.node_index == 50
    assert coronal.describe() == "coronal slice 50: 2 foreground points"


def test_prompt_nodes_are_created_once_and_cleared():
    context = h.new_scene()
    nodes = prompt_nodes(context.scene)
    assert prompt_nodes(context.scene).foreground is nodes.foreground
    nodes.foreground.AddControlPoint(1.0, 2.0, 3.0)
    nodes.box.SetCenter(0.0, 0.0, 0.0)
    nodes.box.SetSize(10.0, 10.0, 0.0)
    assert not nodes.empty
    nodes.clear()
    assert nodes.empty


# ---------------------------------------------------------------------------------------------- geometry


def test_flipped_volume_under_a_transform_gets_the_same_voxels(arrays, box_result):
    """The sample stored with K and J swapped and I reversed, rotated, under a parent transform; the box is
    drawn around the same anatomy (in world space) and must give the untransformed result, voxel for voxel."""
    context = h.new_scene()
    original = h.load_volume(context, name="original")
    ct = slicer.util.arrayFromVolume(original)
    n_i = ct.shape[2]

    def store(a):  # B[k2, j2, i2] = A[j2, k2, n_i - 1 - i2]
        return np.ascontiguousarray(np.transpose(a, (1, 0, 2))[:, :, ::-1])

    def unstore(b):
        return np.ascontiguousarray(np.transpose(b[:, :, ::-1], (1, 0, 2)))

    new_to_old_ijk = np.array([[-1, 0, 0, n_i - 1], [0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=float)
    rotation = h.matrix4((0, 0, 20))
    parent_matrix = h.matrix4((15, 0, 0), (10, -20, 5))
    volume = context.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "flipped oblique")
    slicer.util.updateVolumeFromArray(volume, store(ct))
    volume.SetIJKToRASMatrix(geometry.numpy_to_vtk_matrix(rotation @ geometry.ijk_to_ras(original) @ new_to_old_ijk))
    volume.SetAndObserveTransformNodeID(h.add_linear_transform(context.scene, parent_matrix, "parent").GetID())
    # The ROI is rotated with the volume: defined in the original's RAS under a transform to the world.
    roi_frame = h.add_linear_transform(context.scene, parent_matrix @ rotation, "roi frame")
    roi = add_roi(context.scene, geometry.ijk_to_ras(original), spleen_box(arrays), SLICE, parent=roi_frame)
    segmentation = context.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")  # in world space, no transform
    segmentation.CreateDefaultDisplayNodes()
    spleen = h.add_segment(segmentation, "Spleen")

    # Points too: the same anatomy clicked on the transformed volume gives the same canonical prompt.
    point = add_points(context.scene, [ras_of(volume, n_i - 1 - 40, SLICE, 50)])
    reference_point = add_points(context.scene, [ras_of(original, 40, 50, SLICE)])
    moved, still = locate_prompt(volume, point), locate_prompt(original, reference_point)
    assert (moved.axis_name, moved.node_axis, moved.node_index) == ("axial", 1, SLICE)
    assert moved.index == still.index and np.allclose(moved.prompt.points, still.prompt.points, atol=1e-6)

    tool = PromptTool(context.scene)
    request = tool.prepare(volume, roi=roi, segmentation_node=segmentation, segment_id=spleen,
                           options=PromptOptions(**OPTIONS))
    expected = box_result["outcome"]
    assert request.location.prompt == expected.request.location.prompt
    outcome = tool.run_now(request)
    assert outcome.encoded_slices == 0, "the same image stored another way must reuse the cached embeddings"
    assert outcome.request.location.node_axis == 1 and outcome.slices == (SLICE,)
    assert np.array_equal(unstore(outcome.mask), expected.mask)
    tool.show_preview(outcome)
    tool.accept()
    written = unstore(segments.read_segment_mask(segmentation, spleen, volume))
    assert np.array_equal(written, expected.mask)


# ---------------------------------------------------------------------------------------------- other methods


def spleen_clicks(arrays, volume, k=SLICE, count=1):
    """World RAS of ``count`` voxels deep inside the spleen on slice k (the deepest first), and their (i, j)."""
    from scipy import ndimage

    depth = ndimage.distance_transform_edt(arrays["reference"][k] == h.SPLEEN)
    order = np.argsort(depth.ravel())[::-1][: count * 7 : 7]
    rows, cols = np.unravel_index(order, depth.shape)
    return [ras_of(volume, c, r, k) for r, c in zip(rows, cols)], list(zip(cols, rows))


@pytest.mark.skipif(not (LIB / "zero_shot.py").exists(), reason="SAMFewshotLib/zero_shot.py not written yet")
def test_zero_shot_from_foreground_clicks_is_the_library_result_on_the_clicked_voxels(arrays):
    from SAMFewshotLib.prompts import SlicePrompt
    from SAMFewshotLib.zero_shot import zero_shot_segment

    context, volume, segmentation, _, spleen = painted_scene(arrays)
    positions, voxels = spleen_clicks(arrays, volume, count=2)
    tool = PromptTool(context.scene)
    request = tool.prepare(volume, add_points(context.scene, positions), segmentation_node=segmentation,
                           segment_id=spleen, options=PromptOptions(method="zero-shot", **OPTIONS))
    outcome = tool.run_now(request)
    assert outcome.slices in ((SLICE,), ())
    # The library called directly on the canonical slice (I and J reversed) with the clicked voxels.
    session = next(iter(tool._sessions.values())).session
    n_j, n_i = arrays["reference"].shape[1:]
    prompt = SlicePrompt(tuple((float(n_i - 1 - i), float(n_j - 1 - j)) for i, j in voxels), (1,) * len(voxels))
    assert request.location.prompt == prompt
    direct = zero_shot_segment(session, SLICE, prompt)
    assert np.array_equal(outcome.mask[SLICE], direct.mask[::-1, ::-1])
    assert h.dice(outcome.mask[SLICE], arrays["reference"][SLICE] == h.SPLEEN) >= 0.4  # a loose floor: the glue's test


@pytest.mark.skipif(not (LIB / "prompt_learning.py").exists(),
                    reason="SAMFewshotLib/prompt_learning.py not written yet")
def test_learned_prompts_are_learned_once_from_the_painted_slices(arrays):
    context, volume, segmentation, _, spleen = painted_scene(arrays)
    positions, _ = spleen_clicks(arrays, volume)
    points = add_points(context.scene, positions)
    tool = PromptTool(context.scene)
    # two learning steps: this checks the glue (what is learned from, what is kept), not the learning's quality,
    # which SAMFewshotLib's own tests measure (a full learning takes minutes on a busy 2-core CPU)
    options = PromptOptions(method="learned", learning_steps=2, **OPTIONS)
    request = tool.prepare(volume, points, segmentation_node=segmentation, segment_id=spleen, options=options)
    assert request.examples is not None and np.array_equal(request.examples, arrays["painted"] == h.SPLEEN)
    outcome = tool.run_now(request)
    assert set(outcome.slices) <= {SLICE}
    cached = next(iter(tool._sessions.values()))
    (encoder,) = cached.encoders.values()
    assert list(cached.encoders) == [request.examples_key]
    tool.run_now(tool.prepare(volume, points, segmentation_node=segmentation, segment_id=spleen, options=options))
    assert next(iter(cached.encoders.values())) is encoder, "the learned encoder is kept until the painting changes"
    # painting another slice makes it learn again
    more = (arrays["painted"] == h.SPLEEN).astype(np.uint8)
    more[30] = arrays["reference"][30] == h.SPLEEN
    segments.write_segment_mask(segmentation, spleen, more, volume)
    changed = tool.prepare(volume, points, segmentation_node=segmentation, segment_id=spleen, options=options)
    assert changed.examples_key != request.examples_key


@pytest.mark.skipif(not (LIB / "prompt_propagation.py").exists(),
                    reason="SAMFewshotLib/prompt_propagation.py not written yet")
def test_propagating_from_the_slice_keeps_the_painted_slices(arrays):
    context, volume, segmentation, _, spleen = painted_scene(arrays)
    roi = add_roi(context.scene, geometry.ijk_to_ras(volume), spleen_box(arrays), SLICE)
    tool = PromptTool(context.scene)
    request = tool.prepare(volume, roi=roi, segmentation_node=segmentation, segment_id=spleen,
                           options=PromptOptions(propagate=True, **OPTIONS))
    outcome = tool.run_now(request)
    assert SLICE in outcome.slices and len(outcome.slices) > 1
    painted = (arrays["painted"] == h.SPLEEN).astype(np.uint8)
    tool.show_preview(outcome)
    tool.accept()
    after = segments.read_segment_mask(segmentation, spleen, volume)
    for k in (18, 27, 35, 43):  # the painted spleen slices stay exactly as painted
        assert np.array_equal(after[k], painted[k]), f"slice {k} was changed"
    assert after[SLICE].any()
    tool.undo()
    assert np.array_equal(segments.read_segment_mask(segmentation, spleen, volume), painted)
