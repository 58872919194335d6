"""Registers the "RobustMedSAM" Segment Editor effect (hidden module)."""
import os

import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModule


class SegmentEditorRobustMedSAM(ScriptedLoadableModule):
    """Registrar of the prompt-based 2D effect; the effect lives in SegmentEditorRobustMedSAMLib."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "SegmentEditorRobustMedSAM"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Segmentations"]
        self.parent.contributors = ["RobustMedSAM developers"]
        self.parent.hidden = True
        self.parent.helpText = "Registers the RobustMedSAM Segment Editor effect (prompt-based 2D segmentation)."
        self.parent.acknowledgementText = "See the RobustMedSAM module."
        slicer.app.connect("startupCompleted()", self.registerEditorEffect)

    def registerEditorEffect(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as qSlicerSegmentationsEditorEffects

        instance = qSlicerSegmentationsEditorEffects.qSlicerSegmentEditorScriptedEffect(None)
        effectFilename = os.path.join(os.path.dirname(__file__), self.__class__.__name__ + "Lib/SegmentEditorEffect.py")
        instance.setPythonSource(effectFilename.replace("\\", "/"))
        instance.self().register()
