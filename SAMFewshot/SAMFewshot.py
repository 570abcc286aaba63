"""SAMFewshot: paint a structure on a few slices, click Propagate, review the result, Apply.

This file is wiring only: the panel, the parameter node and the Slicer-specific parts (dependency install,
dialogs, the QTimer that polls the worker). Everything that touches the scene lives in the Qt-free package
``SAMFewshotMRML`` (tested under plain pytest), the algorithm in ``SAMFewshotLib``.
"""

import enum
import logging
import os
import pathlib
import sys
import tempfile

import qt
import vtk

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode

_MODULE_DIR = os.path.dirname(os.path.abspath(__file__))


def _addSourceTreeToPath():
    """Running from the source tree: SAMFewshotLib sits in the repository root, not beside this file."""
    if os.path.isdir(os.path.join(_MODULE_DIR, "SAMFewshotLib")):
        return
    root = os.path.dirname(_MODULE_DIR)
    if os.path.isdir(os.path.join(root, "SAMFewshotLib")) and root not in sys.path:
        sys.path.append(root)


_addSourceTreeToPath()

from SAMFewshotMRML import dependencies  # noqa: E402  (after the path shim; imports no torch)
from SAMFewshotMRML import guidance  # noqa: E402
from SAMFewshotMRML.jobs import Cancelled, Failed, Finished, Progress  # noqa: E402
from SAMFewshotMRML.prompts import PromptOptions, PromptTool, prompt_nodes, view_normals_through  # noqa: E402
from SAMFewshotMRML.propagation import Options  # noqa: E402
from SAMFewshotMRML.workflow import ADAPTED_MODEL_SUFFIX, PREVIEW_ATTRIBUTE, Workflow  # noqa: E402

log = logging.getLogger(__name__)


def _resourcePath(relative):
    """Resources/<relative> beside this file (build and install trees), or ../Resources (source tree)."""
    for base in (os.path.join(_MODULE_DIR, "Resources"), os.path.join(os.path.dirname(_MODULE_DIR), "Resources")):
        candidate = os.path.join(base, relative)
        if os.path.exists(candidate):
            return candidate
    return os.path.join(_MODULE_DIR, "Resources", relative)


def _libraryHas(name):
    """Whether SAMFewshotLib has the module ``name`` (imports only the package's light __init__)."""
    import importlib.util

    try:
        return importlib.util.find_spec(f"SAMFewshotLib.{name}") is not None
    except ImportError:
        return False


def _firstNode(className, accept):
    nodes = slicer.util.getNodesByClass(className)
    return next((node for node in nodes if accept(node)), None)


#
# SAMFewshot
#


class SAMFewshot(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SAMFewshot")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["SAMFewshot contributors"]
        self.parent.helpText = _("""
Paint a structure on a few slices of one view (Segment Editor), click <b>Propagate</b>: a Segment Anything
model adapted to your slices segments the whole volume. Review the preview, then <b>Apply</b> (undoable) or
<b>Cancel</b>. Your painted slices are never overwritten. See the
<a href="https://github.com/SAMFewshot/SlicerSAMFewshot#slicer-module">documentation</a>.
""")
        self.parent.acknowledgementText = _("""
Uses LiteMedSAM (MedSAM, Ma et al., Nature Communications 2024) and Segment Anything (Kirillov et al., 2023);
few-shot adaptation after Xie et al., "Few-shot adaptation of SAM for 3D medical image segmentation".
""")
        self.parent.icon = qt.QIcon(_resourcePath("Icons/SAMFewshot.png"))


#
# Parameter node
#


class ModelChoice(enum.Enum):
    LITE_MEDSAM = "lite-medsam"
    SAM_VIT_B = "vit_b"
    SAM_VIT_L = "vit_l"
    SAM_VIT_H = "vit_h"

    def label(self):
        return {
            "lite-medsam": _("LiteMedSAM (built in, fast)"),
            "vit_b": _("SAM ViT-B (checkpoint file)"),
            "vit_l": _("SAM ViT-L (checkpoint file)"),
            "vit_h": _("SAM ViT-H (checkpoint file)"),
        }[self.value]


class DeviceChoice(enum.Enum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"

    def label(self):
        return {"auto": _("Automatic (GPU if available)"), "cpu": _("CPU"), "cuda": _("GPU (CUDA)")}[self.value]


class AxisChoice(enum.Enum):
    AUTO = "auto"
    AXIAL = "axial"
    CORONAL = "coronal"
    SAGITTAL = "sagittal"

    def label(self):
        return {"auto": _("Automatic (from the painting)"), "axial": _("Axial"), "coronal": _("Coronal"),
                "sagittal": _("Sagittal")}[self.value]


class PromptMethodChoice(enum.Enum):
    PLAIN = "plain"
    ZERO_SHOT = "zero-shot"
    LEARNED = "learned"

    def label(self):
        return {"plain": _("Box/points (plain SAM)"), "zero-shot": _("Zero-shot from clicks"),
                "learned": _("Learned from painted slices")}[self.value]


@parameterNodeWrapper
class SAMFewshotParameterNode:
    """What the panel shows; saved with the scene.

    inputVolume - the volume to segment.
    segmentation - the segmentation holding the painted slices; results are applied into its segments.
    model - LiteMedSAM, or a SAM ViT model given by ``checkpointPath``.
    device - auto, cpu or cuda.
    axis - the axis of the painted slices; automatic finds it from the painting.
    promptMethod - how clicks and boxes become a slice mask (Click to segment).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    segmentation: vtkMRMLSegmentationNode
    model: ModelChoice = ModelChoice.LITE_MEDSAM
    checkpointPath: pathlib.Path
    device: DeviceChoice = DeviceChoice.AUTO
    axis: AxisChoice = AxisChoice.AUTO
    promptMethod: PromptMethodChoice = PromptMethodChoice.PLAIN


#
# SAMFewshotWidget
#


class SAMFewshotWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    POLL_MS = 100

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._observedSegmentation = None
        self._uncheckedSegmentIds = set()
        self._listedFrom = None
        self._promptJob = None
        self._promptPending = False
        self._promptAuto = False
        self._observedPromptNodes = []
        self._quietPrompts = False
        self._review = None  # guidance.Review of the last propagation: slices to check, slice to paint next
        self._reviewItems = []
        self._suggestedItem = None
        self._shownItem = None  # the review item the slice views were last moved to ("Nothing here" acts on it)

    def resourcePath(self, filename):
        return _resourcePath(filename)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SAMFewshot.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SAMFewshotLogic()

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(self.POLL_MS)
        self._pollTimer.connect("timeout()", self.onPollJob)
        self._refreshTimer = qt.QTimer()
        self._refreshTimer.setSingleShot(True)
        self._refreshTimer.setInterval(500)
        self._refreshTimer.connect("timeout()", self.updateSegmentsList)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.checkpointPathLineEdit.nameFilters = ["SAM checkpoints (*.pth *.pt)"]
        self.ui.checkpointPathLineEdit.settingKey = "SAMFewshot/CheckpointPath"
        self.ui.propagateButton.connect("clicked(bool)", self.onPropagate)
        self.ui.cancelRunButton.connect("clicked(bool)", self.onCancelRun)
        self.ui.applyButton.connect("clicked(bool)", self.onApply)
        self.ui.cancelPreviewButton.connect("clicked(bool)", self.onCancelPreview)
        self.ui.undoButton.connect("clicked(bool)", self.onUndo)
        self.ui.showPreviewCheckBox.connect("toggled(bool)", self.onShowPreview)
        self.ui.refreshSegmentsButton.connect("clicked(bool)", self.updateSegmentsList)
        self.ui.segmentsListWidget.connect("itemChanged(QListWidgetItem*)", self.onSegmentItemChanged)
        self.ui.saveAdaptedModelsButton.connect("clicked(bool)", self.onSaveAdaptedModels)
        self.ui.applySavedModelsButton.connect("clicked(bool)", self.onApplySavedModels)
        self.ui.reviewSlicesListWidget.connect("itemClicked(QListWidgetItem*)", self.onReviewSliceClicked)
        self.ui.suggestedSliceButton.connect("clicked(bool)", self.onGoToSuggestedSlice)
        self.ui.nothingHereButton.connect("clicked(bool)", self.onNothingHere)
        self.ui.forgetEmptyButton.connect("clicked(bool)", self.onForgetEmpty)
        self.ui.runProgressBar.hide()
        self.ui.cancelRunButton.hide()
        self.setupClickToSegment()
        self.updateReview()

        self.initializeParameterNode()
        self.updateDeviceInfo()

    def cleanup(self):
        if self._job is not None:
            self._job.cancel()
        if self._promptJob is not None:
            self._promptJob.cancel()
        self._pollTimer.stop()
        self._promptPollTimer.stop()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()
        self.updateSegmentsList()
        self.updateDeviceInfo()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)

    def onSceneStartClose(self, caller, event):
        if self._job is not None:
            self._job.cancel()
            self._job = None
            self._showRunning(False)
        if self._promptJob is not None:
            self._promptJob.cancel()
            self._promptJob = None
        self.logic.workflow.reset()
        self.logic.prompts.reset()
        self._review = None
        self.updateReview()
        for node in self._observedPromptNodes:  # the scene's nodes go; the module makes new ones on the next click
            for event in self._promptEvents():
                self.removeObserver(node, event, self.onPromptsChanged)
        self._observedPromptNodes = []
        self._observeSegmentation(None)
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = _firstNode(
                "vtkMRMLScalarVolumeNode", lambda node: not node.IsA("vtkMRMLLabelMapVolumeNode"))
        if not self._parameterNode.segmentation:
            self._parameterNode.segmentation = _firstNode(
                "vtkMRMLSegmentationNode", lambda node: not node.GetAttribute(PREVIEW_ATTRIBUTE))

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self.onParameterNodeModified()

    def onParameterNodeModified(self, caller=None, event=None):
        node = self._parameterNode
        segmentation = node.segmentation if node else None
        if segmentation is not self._observedSegmentation:
            self._observeSegmentation(segmentation)
        if self.ui.promptSegmentSelector.currentNode() is not segmentation:
            self.ui.promptSegmentSelector.setCurrentNode(segmentation)
        listedFrom = (node.inputVolume, segmentation, node.axis) if node else None
        if listedFrom != self._listedFrom:
            self._listedFrom = listedFrom
            self.updateSegmentsList()
        self.updateButtons()

    def _observeSegmentation(self, segmentationNode):
        if self._observedSegmentation is not None:
            for event in self._segmentationEvents():
                self.removeObserver(self._observedSegmentation, event, self.onSegmentationChanged)
        self._observedSegmentation = segmentationNode
        if segmentationNode is not None:
            for event in self._segmentationEvents():
                self.addObserver(segmentationNode, event, self.onSegmentationChanged)

    @staticmethod
    def _segmentationEvents():
        return (slicer.vtkSegmentation.SegmentAdded, slicer.vtkSegmentation.SegmentRemoved,
                slicer.vtkSegmentation.SegmentModified, slicer.vtkSegmentation.RepresentationModified)

    def onSegmentationChanged(self, caller=None, event=None):
        self._refreshTimer.start()  # painting fires many events: list the segments once it pauses
        self.updateButtons()

    # ------------------------------------------------------------------ panel state

    def _options(self):
        node = self._parameterNode
        model = node.model.value
        if node.model != ModelChoice.LITE_MEDSAM:
            path = str(node.checkpointPath) if node.checkpointPath else ""
            if path in ("", "."):
                raise ValueError(
                    _("Choose the SAM checkpoint file (.pth) for {model}.").format(model=node.model.label()))
            model = f"{model}:{path}"
        return Options(model=model, device=node.device.value, axis=node.axis.value)

    def updateSegmentsList(self):
        widget = self.ui.segmentsListWidget
        widget.blockSignals(True)
        widget.clear()
        node = self._parameterNode
        if node and node.inputVolume and node.segmentation and node.inputVolume.GetImageData():
            try:
                painted = self.logic.workflow.painted_segments(node.inputVolume, node.segmentation, node.axis.value)
            except Exception as error:  # e.g. a non-linear transform between them
                painted = []
                self.ui.statusLabel.text = str(error)
            for segment in painted:
                item = qt.QListWidgetItem(segment.describe())
                item.setData(qt.Qt.UserRole, segment.segment_id)
                item.setFlags(qt.Qt.ItemIsUserCheckable | qt.Qt.ItemIsEnabled)
                checked = segment.ready and segment.segment_id not in self._uncheckedSegmentIds
                item.setCheckState(qt.Qt.Checked if checked else qt.Qt.Unchecked)
                if not segment.ready:
                    item.setFlags(qt.Qt.ItemIsUserCheckable)  # shown, greyed out
                widget.addItem(item)
        widget.blockSignals(False)
        self.updateButtons()

    def onSegmentItemChanged(self, item):
        segmentId = item.data(qt.Qt.UserRole)
        if item.checkState() == qt.Qt.Checked:
            self._uncheckedSegmentIds.discard(segmentId)
        else:
            self._uncheckedSegmentIds.add(segmentId)
        self.updateButtons()

    def _selectedSegmentIds(self):
        widget = self.ui.segmentsListWidget
        return [widget.item(row).data(qt.Qt.UserRole) for row in range(widget.count)
                if widget.item(row).checkState() == qt.Qt.Checked]

    def updateButtons(self):
        node = self._parameterNode
        running = self._job is not None
        workflow = self.logic.workflow if self.logic else None
        hasInputs = bool(node and node.inputVolume and node.segmentation)
        self.ui.propagateButton.enabled = hasInputs and not running and bool(self._selectedSegmentIds())
        self.ui.propagateButton.toolTip = (_("Segment the whole volume from the painted slices of the checked segments")
                                           if hasInputs else _("Choose a volume and a segmentation"))
        hasPreview = bool(workflow and workflow.preview_node is not None)
        self.ui.applyButton.enabled = hasPreview and not running
        self.ui.cancelPreviewButton.enabled = hasPreview and not running
        self.ui.showPreviewCheckBox.enabled = hasPreview
        self.ui.undoButton.enabled = bool(workflow and workflow.can_undo) and not running
        self.ui.saveAdaptedModelsButton.enabled = bool(workflow and workflow.adapted_models) and not running
        self.ui.applySavedModelsButton.enabled = bool(node and node.inputVolume) and not running
        self.ui.checkpointPathLineEdit.enabled = bool(node and node.model != ModelChoice.LITE_MEDSAM)
        self.updatePromptButtons()

    def updateDeviceInfo(self):
        if "torch" in sys.modules:
            self.ui.deviceInfoLabel.text = dependencies.device_info().describe()
        elif dependencies.torch_installed():
            self.ui.deviceInfoLabel.text = _("PyTorch is installed; the devices are shown after the first run.")
        else:
            self.ui.deviceInfoLabel.text = _("PyTorch is not installed yet: it is installed (after asking) on the "
                                             "first Propagate, from the PyTorch extension.")

    # ------------------------------------------------------------------ running

    def onPropagate(self):
        with slicer.util.tryWithErrorDisplay(_("Propagation could not start."), waitCursor=True):
            if not self.logic.ensureDependencies(self.resourcePath("requirements.txt")):
                return
            self.updateDeviceInfo()
            node = self._parameterNode
            request = self.logic.workflow.prepare(node.inputVolume, node.segmentation, self._selectedSegmentIds(),
                                                  self._options())
            names = ", ".join(task.name for task in request.tasks)
            self._startJob(self.logic.workflow.start(request), _("Propagating {names}").format(names=names))

    def onApplySavedModels(self):
        paths = qt.QFileDialog.getOpenFileNames(
            slicer.util.mainWindow(), _("Adapted models to apply"), self.logic.lastAdaptedModelFolder(),
            _("SAMFewshot adapted models (*{suffix})").format(suffix=ADAPTED_MODEL_SUFFIX))
        if not paths:
            return
        with slicer.util.tryWithErrorDisplay(_("The adapted models could not be applied."), waitCursor=True):
            if not self.logic.ensureDependencies(self.resourcePath("requirements.txt")):
                return
            self.logic.setLastAdaptedModelFolder(os.path.dirname(paths[0]))
            node = self._parameterNode
            request = self.logic.workflow.prepare_saved_models(node.inputVolume, node.segmentation, paths,
                                                               self._options())
            self._startJob(self.logic.workflow.start(request), _("Applying adapted models"))

    def _startJob(self, job, text):
        self._job = job
        self.ui.statusLabel.text = text
        self.ui.runProgressBar.value = 0
        self.ui.runProgressBar.format = text
        self._showRunning(True)
        self._pollTimer.start()
        self.updateButtons()

    def _showRunning(self, running):
        self.ui.runProgressBar.visible = running
        self.ui.cancelRunButton.visible = running
        self.ui.cancelRunButton.enabled = running

    def onCancelRun(self):
        if self._job is not None:
            self._job.cancel()
            self.ui.cancelRunButton.enabled = False
            self.ui.runProgressBar.format = _("Cancelling...")

    def onPollJob(self):
        job = self._job
        if job is None:
            self._pollTimer.stop()
            return
        for event in job.poll():
            if isinstance(event, Progress):
                self.ui.runProgressBar.maximum = max(1, event.total)
                self.ui.runProgressBar.value = event.done
                self.ui.runProgressBar.format = event.text
            elif isinstance(event, (Finished, Failed, Cancelled)):
                self._jobEnded(event)

    def _jobEnded(self, event):
        self._pollTimer.stop()
        self._job = None
        self._showRunning(False)
        if isinstance(event, Finished):
            with slicer.util.tryWithErrorDisplay(_("The result could not be shown."), waitCursor=True):
                with slicer.util.RenderBlocker():
                    self.logic.workflow.show_preview(event.result)
                self._review = guidance.Review.from_outcome(event.result)
                self.updateReview()
                self.ui.showPreviewCheckBox.checked = True
                self.ui.statusLabel.text = event.result.summary() + " " + _("Review the preview, then Apply or Cancel.")
        elif isinstance(event, Cancelled):
            self.ui.statusLabel.text = _("Cancelled; nothing was changed.")
        else:
            log.error(event.details)
            self.ui.statusLabel.text = str(event.error)
            slicer.util.errorDisplay(str(event.error), detailedText=event.details)
        self.updateDeviceInfo()
        self.updateButtons()

    # ------------------------------------------------------------------ review

    def onApply(self):
        with slicer.util.tryWithErrorDisplay(_("Apply failed."), waitCursor=True):
            with slicer.util.RenderBlocker():
                self.logic.workflow.apply()
            self.ui.statusLabel.text = _("Applied. Undo apply restores the segmentation as it was.")
        self.updateSegmentsList()

    def onCancelPreview(self):
        self.logic.workflow.cancel_preview()
        self._review = None
        self.updateReview()
        self.ui.statusLabel.text = _("Preview dropped; the segmentation is unchanged.")
        self.updateButtons()

    def onUndo(self):
        with slicer.util.tryWithErrorDisplay(_("Undo failed."), waitCursor=True):
            self.logic.workflow.undo()
            self.ui.statusLabel.text = _("Apply undone.")
        self.updateSegmentsList()

    def onShowPreview(self, visible):
        previewNode = self.logic.workflow.preview_node
        if previewNode is not None and previewNode.GetDisplayNode() is not None:
            previewNode.GetDisplayNode().SetVisibility(visible)

    def onSaveAdaptedModels(self):
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Folder for the adapted models"),
                                                     self.logic.lastAdaptedModelFolder())
        if not folder:
            return
        with slicer.util.tryWithErrorDisplay(_("Saving the adapted models failed."), waitCursor=True):
            written = self.logic.workflow.save_adapted_models(folder)
            self.logic.setLastAdaptedModelFolder(folder)
            self.ui.statusLabel.text = _("Saved: {files}").format(files=", ".join(p.name for p in written))

    def updateReview(self):
        """The least confident slices, the uncertain ends and the suggested slice of the last propagation."""
        review = self._review
        self._reviewItems = review.items() if review else []
        self._suggestedItem = review.suggestion() if review else None
        listWidget = self.ui.reviewSlicesListWidget
        listWidget.clear()
        for item in self._reviewItems:
            listWidget.addItem(item.text)
        ends = review.uncertain_ends_text() if review else ""
        self.ui.uncertainEndsLabel.text = ends
        self.ui.uncertainEndsLabel.visible = bool(ends)
        self.ui.suggestedSliceButton.text = guidance.suggestion_text(self._suggestedItem)
        self.ui.suggestedSliceButton.enabled = self._suggestedItem is not None
        self._shownItem = None
        self.ui.nothingHereButton.enabled = False
        for widget in (self.ui.reviewSlicesLabel, listWidget, self.ui.suggestedSliceButton, self.ui.nothingHereButton,
                       self.ui.forgetEmptyButton):
            widget.visible = review is not None

    def onReviewSliceClicked(self, listItem):
        row = self.ui.reviewSlicesListWidget.row(listItem)
        if 0 <= row < len(self._reviewItems):
            self._jumpToSlice(self._reviewItems[row])

    def onGoToSuggestedSlice(self):
        if self._suggestedItem is not None:
            self._jumpToSlice(self._suggestedItem)

    def _jumpToSlice(self, item):
        try:
            r, a, s = (float(v) for v in self._review.position(slicer.mrmlScene, item))
        except (ValueError, IndexError) as error:
            self.ui.statusLabel.text = str(error)
            return
        slicer.modules.markups.logic().JumpSlicesToLocation(r, a, s, True)
        self._shownItem = item
        self.ui.nothingHereButton.enabled = True
        self.ui.nothingHereButton.toolTip = _("{segment} is not on slice {index}: keep the next result empty there "
                                              "and stop there").format(segment=item.segment_name, index=item.index)
        self.ui.statusLabel.text = _("Showing {slice}.").format(slice=item.text)

    def onNothingHere(self):
        item, node = self._shownItem, self._parameterNode
        if item is None or node is None:
            return
        with slicer.util.tryWithErrorDisplay(_("The slice could not be marked."), waitCursor=True):
            # the slice index is on the volume the review was computed on, which may no longer be the one chosen
            volume = self._review.volume_node(slicer.mrmlScene) if self._review else None
            self.logic.workflow.mark_empty(volume, node.segmentation, item.segment_id, item.axis, item.index)
            self.ui.nothingHereButton.enabled = False
            self.ui.statusLabel.text = _("No {segment} on slice {index}: click Propagate to update the result."
                                         ).format(segment=item.segment_name, index=item.index)
            self.updateSegmentsList()

    def onForgetEmpty(self):
        node = self._parameterNode
        if node is None:
            return
        count = self.logic.workflow.clear_empty(node.segmentation, self._selectedSegmentIds())
        self.ui.statusLabel.text = _("Forgot {count} \"Nothing here\" slices.").format(count=count)
        self.updateSegmentsList()

    # ------------------------------------------------------------------ click to segment

    def setupClickToSegment(self):
        self._promptPollTimer = qt.QTimer()
        self._promptPollTimer.setInterval(50)
        self._promptPollTimer.connect("timeout()", self.onPollPromptJob)
        self._promptTriggerTimer = qt.QTimer()  # placing and dragging fire many events: segment once they pause
        self._promptTriggerTimer.setSingleShot(True)
        self._promptTriggerTimer.setInterval(200)
        self._promptTriggerTimer.connect("timeout()", self.onAutoSegmentSlice)
        self.ui.placeForegroundButton.connect("clicked(bool)", lambda checked: self.onPlacePrompt("foreground"))
        self.ui.placeBackgroundButton.connect("clicked(bool)", lambda checked: self.onPlacePrompt("background"))
        self.ui.placeBoxButton.connect("clicked(bool)", lambda checked: self.onPlacePrompt("box"))
        self.ui.clearPromptsButton.connect("clicked(bool)", self.onClearPrompts)
        self.ui.segmentSliceButton.connect("clicked(bool)", self.onSegmentSlice)
        self.ui.acceptPromptButton.connect("clicked(bool)", self.onAcceptPrompt)
        self.ui.rejectPromptButton.connect("clicked(bool)", self.onRejectPrompt)
        self.ui.undoAcceptButton.connect("clicked(bool)", self.onUndoAccept)
        self.ui.promptSegmentSelector.connect("currentSegmentChanged(QString)", lambda segmentId: self.updateButtons())
        canPropagate = _libraryHas("prompt_propagation")
        self.ui.propagatePromptCheckBox.enabled = canPropagate
        if not canPropagate:
            self.ui.propagatePromptCheckBox.toolTip = _("Needs a newer SAMFewshotLib (prompt_propagation).")
        interactionNode = slicer.app.applicationLogic().GetInteractionNode()
        if interactionNode is not None:  # a box is complete when its placement ends
            self.addObserver(interactionNode, slicer.vtkMRMLInteractionNode.EndPlacementEvent, self.onPromptsChanged)

    def _promptNodes(self):
        """The module's foreground, background and box markups (created on first use), observed for changes."""
        nodes = prompt_nodes(slicer.mrmlScene)
        current = [nodes.foreground, nodes.background, nodes.box]
        if current != self._observedPromptNodes:
            for node in self._observedPromptNodes:
                for event in self._promptEvents():
                    self.removeObserver(node, event, self.onPromptsChanged)
            for node in current:
                for event in self._promptEvents():
                    self.addObserver(node, event, self.onPromptsChanged)
            self._observedPromptNodes = current
        return nodes

    @staticmethod
    def _promptEvents():
        markups = slicer.vtkMRMLMarkupsNode
        return (markups.PointPositionDefinedEvent, markups.PointEndInteractionEvent, markups.PointRemovedEvent)

    def onPromptsChanged(self, caller=None, event=None):
        if self._quietPrompts or not self.ui.autoSegmentCheckBox.checked:
            return
        if caller is not None and caller.IsA("vtkMRMLInteractionNode"):  # placement ended: ours?
            selection = slicer.app.applicationLogic().GetSelectionNode()
            active = selection.GetActivePlaceNodeID() if selection is not None else None
            if active not in [node.GetID() for node in self._observedPromptNodes]:
                return
        self._promptTriggerTimer.start()

    def onPlacePrompt(self, role):
        with slicer.util.tryWithErrorDisplay(_("Placing could not start."), waitCursor=False):
            nodes = self._promptNodes()
            node = getattr(nodes, role)
            if role == "box":  # one box: a new one replaces the previous
                self._quietPrompts = True
                try:
                    node.RemoveAllControlPoints()
                finally:
                    self._quietPrompts = False
            markupsLogic = slicer.modules.markups.logic()
            markupsLogic.SetActiveList(node)
            markupsLogic.StartPlaceMode(role != "box")  # points: until right-click or Esc; box: one

    def onClearPrompts(self):
        if self._promptJob is not None:
            self._promptJob.cancel()
        self._promptPending = False
        self._quietPrompts = True
        try:
            self._promptNodes().clear()
        finally:
            self._quietPrompts = False
        self.logic.prompts.cancel_preview()
        self.ui.promptStatusLabel.text = _("Place foreground points or a box on one slice.")
        self.updateButtons()

    def _promptOptions(self):
        node = self._parameterNode
        options = self._options()
        propagate = bool(self.ui.propagatePromptCheckBox.enabled and self.ui.propagatePromptCheckBox.checked)
        return PromptOptions(method=node.promptMethod.value, model=options.model, device=options.device,
                             axis=node.axis.value, propagate=propagate)

    def _viewNormals(self, volumeNode, nodes):
        """Normals of the slice views that hold every prompt: the view the user clicked in names the axis."""
        layoutManager = slicer.app.layoutManager()
        if layoutManager is None:
            return []
        sliceNodes = [layoutManager.sliceWidget(name).mrmlSliceNode() for name in layoutManager.sliceViewNames()]
        return view_normals_through(sliceNodes, nodes.positions(), 0.5 * min(volumeNode.GetSpacing()))

    def _prepareSlice(self):
        node = self._parameterNode
        if not node or not node.inputVolume:
            raise ValueError(_("Choose the volume to segment."))
        nodes = self._promptNodes()
        segmentId = self.ui.promptSegmentSelector.currentSegmentID() or None
        return self.logic.prompts.prepare(node.inputVolume, nodes.foreground, nodes.background, nodes.box,
                                          node.segmentation, segmentId if node.segmentation else None,
                                          self._promptOptions(), self._viewNormals(node.inputVolume, nodes))

    def onSegmentSlice(self):
        with slicer.util.tryWithErrorDisplay(_("The slice could not be segmented."), waitCursor=True):
            if not self.logic.ensureDependencies(self.resourcePath("requirements.txt")):
                return
            self._startPromptJob(self._prepareSlice(), auto=False)

    def onAutoSegmentSlice(self):
        """Segment after a click: problems go to the status line, never to a dialog."""
        if self._promptJob is not None:
            self._promptPending = True
            return
        if not dependencies.torch_installed():
            self.ui.promptStatusLabel.text = _("Click Segment slice: PyTorch is installed first (after asking).")
            return
        try:
            request = self._prepareSlice()
        except Exception as error:
            self.ui.promptStatusLabel.text = str(error)
            return
        self._startPromptJob(request, auto=True)

    def _startPromptJob(self, request, auto):
        self._promptAuto = auto
        self._promptJob = self.logic.prompts.start(request)
        self.ui.promptStatusLabel.text = _("Segmenting {where}...").format(where=request.location.describe())
        self._promptPollTimer.start()
        self.updateButtons()

    def onPollPromptJob(self):
        job = self._promptJob
        if job is None:
            self._promptPollTimer.stop()
            return
        for event in job.poll():
            if isinstance(event, Progress):
                self.ui.promptStatusLabel.text = event.text
            elif isinstance(event, (Finished, Failed, Cancelled)):
                self._promptJobEnded(event)

    def _promptJobEnded(self, event):
        self._promptPollTimer.stop()
        self._promptJob = None
        if isinstance(event, Finished):
            try:
                with slicer.util.RenderBlocker():
                    self.logic.prompts.show_preview(event.result)
                self.ui.promptStatusLabel.text = event.result.summary() + " " + _(
                    "Accept paints it into the segment as a painted slice.")
            except Exception as error:
                self.ui.promptStatusLabel.text = str(error)
                if not self._promptAuto:
                    slicer.util.errorDisplay(str(error))
        elif isinstance(event, Cancelled):
            self.ui.promptStatusLabel.text = _("Cancelled; nothing was changed.")
        else:
            log.error(event.details)
            self.ui.promptStatusLabel.text = str(event.error)
            if not self._promptAuto:
                slicer.util.errorDisplay(str(event.error), detailedText=event.details)
        if self._promptPending:  # prompts changed while it ran
            self._promptPending = False
            self._promptTriggerTimer.start()
        self.updateDeviceInfo()
        self.updateButtons()

    def onAcceptPrompt(self):
        with slicer.util.tryWithErrorDisplay(_("Accept failed."), waitCursor=True):
            outcome = self.logic.prompts.last_outcome
            with slicer.util.RenderBlocker():
                self.logic.prompts.accept()
            where = outcome.request.location.describe().split(":")[0] if outcome else ""
            self.ui.promptStatusLabel.text = _(
                "Accepted into {segment} ({where}); Propagate uses it as a painted slice. Undo accept restores "
                "the segmentation.").format(segment=outcome.request.segment_name if outcome else "", where=where)
            self._quietPrompts = True
            try:
                self._promptNodes().clear()  # ready for the next slice
            finally:
                self._quietPrompts = False
        self.updateSegmentsList()

    def onRejectPrompt(self):
        self.logic.prompts.cancel_preview()
        self.ui.promptStatusLabel.text = _("Slice preview dropped; the segmentation is unchanged.")
        self.updateButtons()

    def onUndoAccept(self):
        with slicer.util.tryWithErrorDisplay(_("Undo failed."), waitCursor=True):
            self.logic.prompts.undo()
            self.ui.promptStatusLabel.text = _("Accept undone.")
        self.updateSegmentsList()

    def updatePromptButtons(self):
        node = self._parameterNode
        prompts = self.logic.prompts if self.logic else None
        hasVolume = bool(node and node.inputVolume)
        running = self._promptJob is not None
        for button in (self.ui.placeForegroundButton, self.ui.placeBackgroundButton, self.ui.placeBoxButton):
            button.enabled = hasVolume
        self.ui.segmentSliceButton.enabled = hasVolume and not running
        hasPreview = bool(prompts and prompts.preview_node is not None)
        self.ui.acceptPromptButton.enabled = hasPreview and not running
        self.ui.rejectPromptButton.enabled = hasPreview
        self.ui.undoAcceptButton.enabled = bool(prompts and prompts.can_undo) and not running
        learned = bool(node and node.promptMethod == PromptMethodChoice.LEARNED)
        self.ui.promptSegmentLabel.text = _("Learn from:") if learned else _("Segment:")


#
# SAMFewshotLogic
#


class SAMFewshotLogic(ScriptedLoadableModuleLogic):
    """The module's state (``workflow``) and the Slicer-only parts: dependency install and settings.

    Scripts use it without the panel:

        logic = SAMFewshotLogic()
        request = logic.workflow.prepare(volumeNode, segmentationNode)
        logic.workflow.show_preview(logic.workflow.run_now(request))
        logic.workflow.apply()
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.workflow = Workflow(slicer.mrmlScene)
        self.prompts = PromptTool(slicer.mrmlScene)  # click to segment: sessions, slice preview, Accept's undo

    def getParameterNode(self):
        return SAMFewshotParameterNode(super().getParameterNode())

    @staticmethod
    def lastAdaptedModelFolder():
        return str(qt.QSettings().value("SAMFewshot/AdaptedModelFolder", os.path.expanduser("~")))

    @staticmethod
    def setLastAdaptedModelFolder(folder):
        qt.QSettings().setValue("SAMFewshot/AdaptedModelFolder", folder)

    def ensureDependencies(self, requirementsPath, ask=True):
        """Install PyTorch (PyTorch extension) and the packages of requirements.txt, after asking.

        Returns False, after telling the user what to do, when something is missing and was not installed.
        """
        if not self._ensureTorch(ask):
            return False
        missing = dependencies.missing_requirements(dependencies.read_requirements(requirementsPath))
        if not missing:
            return True
        constraints = self._constraintsFile()
        try:
            from slicer import packaging  # Slicer 5.12+: asks, shows progress and the log
        except ImportError:
            packaging = None
        try:
            if packaging is not None:
                packaging.pip_ensure(packaging.load_requirements(requirementsPath), constraints=constraints,
                                     requester="SAMFewshot")
            else:
                if ask and not slicer.util.confirmOkCancelDisplay(
                    _("SAMFewshot needs these Python packages, installed into Slicer's Python:\n\n{packages}\n\n"
                      "This downloads them from PyPI and may take a few minutes. Install now?").format(
                        packages="\n".join(missing)), _("SAMFewshot: install Python packages")):
                    raise RuntimeError("declined")
                with slicer.util.WaitCursor():
                    slicer.util.showStatusMessage(_("Installing Python packages for SAMFewshot..."))
                    slicer.util.pip_install(["-c", constraints, *missing])
        except RuntimeError:
            slicer.util.errorDisplay(_(
                "SAMFewshot cannot run without these packages:\n{packages}\n\nInstall them later by clicking "
                "Propagate again, or from the Python console: slicer.util.pip_install(...). Offline: "
                "pip_install('--no-index --find-links <folder of wheels> <package>').").format(
                    packages="\n".join(missing)))
            return False
        still = dependencies.missing_requirements(dependencies.read_requirements(requirementsPath))
        if still:
            slicer.util.errorDisplay(_("These packages could not be installed: {packages}. See the Python console "
                                       "for pip's messages.").format(packages=", ".join(still)))
            return False
        return True

    @staticmethod
    def _constraintsFile():
        handle, path = tempfile.mkstemp(prefix="SAMFewshot-constraints-", suffix=".txt")
        with os.fdopen(handle, "w") as stream:
            stream.write(dependencies.torch_constraints())
        return path

    @staticmethod
    def _ensureTorch(ask):
        if dependencies.torch_installed():
            return True
        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            slicer.util.errorDisplay(_(
                "SAMFewshot needs PyTorch, which Slicer installs through the PyTorch extension. Install 'PyTorch' "
                "from the Extensions Manager, restart Slicer, then click Propagate again."))
            return False
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if torchLogic.torchInstalled():
            return True
        if ask and not slicer.util.confirmOkCancelDisplay(_(
                "SAMFewshot needs PyTorch. Install it now? The PyTorch extension picks the build that matches "
                "your GPU (or a CPU build); the download is large and may take several minutes."),
                _("SAMFewshot: install PyTorch")):
            slicer.util.errorDisplay(_("PyTorch was not installed. Install it from the PyTorch Utils module, or "
                                       "click Propagate again."))
            return False
        progress = slicer.util.createProgressDialog(labelText=_("Installing PyTorch; this may take several minutes..."),
                                                    maximum=0)
        slicer.app.processEvents()
        try:
            torch = torchLogic.installTorch(askConfirmation=False,
                                            torchVersionRequirement=dependencies.TORCH_REQUIREMENT)
        except Exception as error:
            torch = None
            log.exception("PyTorch installation failed")
            detail = str(error)
        else:
            detail = ""
        finally:
            progress.close()
        if torch is None:
            slicer.util.errorDisplay(_("PyTorch could not be installed. Try the PyTorch Utils module (it shows "
                                       "pip's log), then click Propagate again."), detailedText=detail)
            return False
        return True


#
# SAMFewshotTest
#


class SAMFewshotTest(ScriptedLoadableModuleTest):
    """Runs the whole workflow inside Slicer: paint 5 slices of a structure, propagate, preview, Apply, undo.

    Data: the CTChest sample, cropped to 40 axial slices and downsampled to about 3 mm; the structure is the
    lungs (air inside the body), whose full extent gives a reference. Skipped when PyTorch is not installed
    (nothing is installed in testing mode).
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SAMFewshotWorkflow()
        self.setUp()
        self.test_SAMFewshotClickToSegment()

    def test_SAMFewshotWorkflow(self):
        import numpy as np

        if not dependencies.torch_installed() or dependencies.missing_requirements(
                dependencies.read_requirements(_resourcePath("requirements.txt"))):
            self.skipTest("PyTorch or the packages of requirements.txt are not installed")
        import SampleData

        from SAMFewshotMRML import segments as segmentsGlue

        self.delayDisplay("Loading CTChest")
        chest = SampleData.downloadSample("CTChest")
        volume, reference = self._smallLungVolume(chest)
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Painted")
        segmentation.CreateDefaultDisplayNodes()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        lungs = segmentation.GetSegmentation().AddEmptySegment("", "Lungs", [0.5, 0.7, 1.0])
        occupied = np.flatnonzero(reference.any(axis=(1, 2)))
        paintedSlices = [int(i) for i in np.linspace(occupied[0] + 2, occupied[-1] - 2, 5).round()]
        painted = np.zeros_like(reference)
        painted[paintedSlices] = reference[paintedSlices]
        segmentsGlue.write_segment_mask(segmentation, lungs, painted, volume)

        logic = SAMFewshotLogic()
        (description,) = [p.describe() for p in logic.workflow.painted_segments(volume, segmentation)]
        self.assertIn("5 axial slices", description)

        self.delayDisplay("Propagating (worker thread)")
        job = logic.workflow.start(logic.workflow.prepare(volume, segmentation))
        outcome = job.wait(timeout=1800, on_event=lambda event: slicer.app.processEvents())
        self.assertIsInstance(outcome, Finished, getattr(outcome, "details", outcome))
        preview = logic.workflow.show_preview(outcome.result)
        self.assertIsNotNone(preview)

        self.delayDisplay("Going to the suggested slice")
        review = guidance.Review.from_outcome(outcome.result)
        suggestion = review.suggestion()
        self.assertIsNotNone(suggestion)
        self.assertNotIn(suggestion.index, paintedSlices)
        self.assertTrue(review.items())
        r, a, s = (float(v) for v in review.position(slicer.mrmlScene, suggestion))
        slicer.modules.markups.logic().JumpSlicesToLocation(r, a, s, True)
        if slicer.app.layoutManager() is not None:
            red = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode()
            origin = [red.GetSliceToRAS().GetElement(row, 3) for row in range(3)]
            self.assertEqual(guidance.slice_index_at(volume, 0, origin), suggestion.index)

        before = segmentsGlue.read_segment_mask(segmentation, lungs, volume)
        logic.workflow.apply()
        applied = segmentsGlue.read_segment_mask(segmentation, lungs, volume)
        self.assertTrue(np.array_equal(applied[paintedSlices], painted[paintedSlices]))
        unpainted = [k for k in range(reference.shape[0]) if k not in paintedSlices]
        a, b = applied[unpainted] != 0, reference[unpainted] != 0
        dice = 2 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())
        self.delayDisplay(f"Lungs Dice on unpainted slices: {dice:.3f}")
        self.assertGreater(dice, 0.7)

        logic.workflow.undo()
        self.assertTrue(np.array_equal(segmentsGlue.read_segment_mask(segmentation, lungs, volume), before))
        self.delayDisplay("Test passed")

    def test_SAMFewshotClickToSegment(self):
        """A box drawn around one lung on one slice: a preview on that slice only, Accept, Undo accept."""
        import numpy as np

        if not dependencies.torch_installed() or dependencies.missing_requirements(
                dependencies.read_requirements(_resourcePath("requirements.txt"))):
            self.skipTest("PyTorch or the packages of requirements.txt are not installed")
        import SampleData

        from SAMFewshotMRML import geometry
        from SAMFewshotMRML import segments as segmentsGlue

        self.delayDisplay("Loading CTChest")
        volume, reference = self._smallLungVolume(SampleData.downloadSample("CTChest"))
        k = reference.shape[0] // 2
        columns = np.flatnonzero(reference[k].any(axis=0))
        middle = (columns[0] + columns[-1]) // 2
        lung = np.zeros_like(reference[k])
        lung[:, :middle] = reference[k][:, :middle]  # the lung on the image's left
        rows, cols = np.nonzero(lung)
        ijkToRAS = geometry.ijk_to_world(volume)
        corner0 = (ijkToRAS @ [cols.min() - 2.5, rows.min() - 2.5, k, 1])[:3]
        corner1 = (ijkToRAS @ [cols.max() + 2.5, rows.max() + 2.5, k, 1])[:3]
        roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
        roi.SetCenter(*((corner0 + corner1) / 2))
        roi.SetSize(*np.abs(corner1 - corner0))
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Clicked")
        segmentation.CreateDefaultDisplayNodes()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        lungId = segmentation.GetSegmentation().AddEmptySegment("", "Lung", [0.5, 0.7, 1.0])

        logic = SAMFewshotLogic()
        self.delayDisplay("Segmenting the slice (worker thread)")
        request = logic.prompts.prepare(volume, roi=roi, segmentation_node=segmentation, segment_id=lungId,
                                        options=PromptOptions())
        job = logic.prompts.start(request)
        outcome = job.wait(timeout=600, on_event=lambda event: slicer.app.processEvents())
        self.assertIsInstance(outcome, Finished, getattr(outcome, "details", outcome))
        self.assertEqual(outcome.result.slices, (k,))
        logic.prompts.show_preview(outcome.result)
        before = segmentsGlue.read_segment_mask(segmentation, lungId, volume)
        self.assertFalse(before.any())

        logic.prompts.accept()
        accepted = segmentsGlue.read_segment_mask(segmentation, lungId, volume)
        self.assertTrue(accepted[k].any())
        self.assertFalse(np.delete(accepted, k, axis=0).any())
        a, b = accepted[k] != 0, lung != 0
        dice = 2 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())
        self.delayDisplay(f"Lung Dice on slice {k}: {dice:.3f}")
        self.assertGreater(dice, 0.5)

        logic.prompts.undo()
        self.assertFalse(segmentsGlue.read_segment_mask(segmentation, lungId, volume).any())
        self.delayDisplay("Test passed")

    @staticmethod
    def _smallLungVolume(chest):
        """40 axial slices of CTChest at about 3 mm, and its lungs: air (< -400 HU) not connected to the outside."""
        import numpy as np

        from SAMFewshotMRML import geometry

        array = slicer.util.arrayFromVolume(chest)
        matrix = geometry.ijk_to_ras(chest)
        spacing = np.linalg.norm(matrix[:3, :3], axis=0)
        step = [max(1, round(3.0 / s)) for s in spacing]  # I, J, K
        middle = array.shape[0] // 2
        kStep = step[2]
        first = max(0, middle - 20 * kStep)
        small = np.ascontiguousarray(array[first:first + 40 * kStep:kStep, ::step[1], ::step[0]])
        scale = np.diag([step[0], step[1], kStep, 1.0])
        shift = np.eye(4)
        shift[2, 3] = first
        volume = slicer.util.addVolumeFromArray(small, ijkToRAS=matrix @ shift @ scale, name="CTChest small")
        air = small < -400
        outside = np.zeros_like(air)
        for k in range(air.shape[0]):  # the air around the body touches the slice border; the lungs do not
            outside[k] = _connectedToBorder(air[k])
        return volume, (air & ~outside).astype(np.uint8)


def _connectedToBorder(mask2d):
    """Pixels of a 2D mask connected (4-neighbourhood) to the image border, by flood fill in numpy."""
    import numpy as np

    reached = np.zeros_like(mask2d, dtype=bool)
    reached[0, :], reached[-1, :] = mask2d[0, :], mask2d[-1, :]
    reached[:, 0], reached[:, -1] = mask2d[:, 0], mask2d[:, -1]
    while True:
        grown = reached.copy()
        grown[1:, :] |= reached[:-1, :]
        grown[:-1, :] |= reached[1:, :]
        grown[:, 1:] |= reached[:, :-1]
        grown[:, :-1] |= reached[:, 1:]
        grown &= mask2d
        if np.array_equal(grown, reached):
            return reached
        reached = grown
