"""Registers the "RobustMedSAM Propagate" Segment Editor effect (hidden module)."""
import os

import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModule


class SegmentEditorRobustMedSAMPropagate(ScriptedLoadableModule):
    """Registrar of the propagation effect; the effect lives in SegmentEditorRobustMedSAMPropagateLib."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "SegmentEditorRobustMedSAMPropagate"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Segmentations"]
        self.parent.contributors = ["RobustMedSAM developers"]
        self.parent.hidden = True
        self.parent.helpText = "Registers the RobustMedSAM Propagate Segment Editor effect (propagation through the volume)."
        self.parent.acknowledgementText = "See the RobustMedSAM module."
        slicer.app.connect("startupCompleted()", self.registerEditorEffect)

    def registerEditorEffect(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as qSlicerSegmentationsEditorEffects

        instance = qSlicerSegmentationsEditorEffects.qSlicerSegmentEditorScriptedEffect(None)
        effectFilename = os.path.join(os.path.dirname(__file__), self.__class__.__name__ + "Lib/SegmentEditorEffect.py")
        instance.setPythonSource(effectFilename.replace("\\", "/"))
        instance.self().register()
