"""RobustMedSAM's self-test in a real 3D Slicer (``RobustMedSAMTest``, imported into ``RobustMedSAM.py`` where
Slicer looks for it): Developer mode -> "Reload and Test", or ``ctest -R py_RobustMedSAM`` in a build tree.

It needs the Qt application (segment editor widget, effects, the engine process started with PythonSlicer),
so it is not part of the pytest suite; what it checks by machine is listed in RobustMedSAM/README.md, next to
what to check by hand.
"""
import logging
import os

import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the module folder


class RobustMedSAMTest(ScriptedLoadableModuleTest):
    """Self-test in a real Slicer (Developer mode: 'Reload and Test'; or ctest ``py_RobustMedSAM``).

    On the sample chest CT with the seeded tiny model (no download), through the engine *worker process*
    started with PythonSlicer, as in normal use: the module logic (segment volume, undo, robustness check),
    both Segment Editor effects through the editor widget (prompt effect: box + points -> preview -> Cancel
    -> Apply -> Undo/Redo; propagate effect: Propagate -> Cancel -> Propagate -> Apply -> Undo), and a killed
    engine process (the segment unchanged, the next request starts a new engine).
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        from RobustMedSAMLogic.dependencies import self_test_skip_reason

        reason = self_test_skip_reason(os.path.join(HERE, "Resources", "requirements.txt"))
        if reason:  # e.g. the extension build machines: no torch (ctest reports it as skipped)
            logging.warning(reason)
            self.delayDisplay(reason)
            return
        self.setUp()
        self.test_module_logic()
        self.setUp()
        self.test_effects()
        self.setUp()
        self.test_killed_engine()

    def _tinyEngine(self):
        from RobustMedSAMLogic import engine
        from RobustMedSAMLogic.logic import RobustMedSAMBridgeLogic
        from RobustMedSAMLogic.pump import ensure_pump

        bridge = RobustMedSAMBridgeLogic(slicer.mrmlScene)
        settings = bridge.settings()
        settings.model = "tiny"  # the seeded test model: the effects configure the shared session from this
        bridge.setSettings(settings)
        session = engine.EngineSession(settings.model_choice())  # a worker process, seeded weights
        engine.set_shared_session(session)
        ensure_pump(session)
        return session

    def _waitFor(self, condition, timeout=120.0):
        import time

        end = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > end:
                raise AssertionError("timed out waiting for the engine")
            slicer.app.processEvents()
            time.sleep(0.02)

    def _loadChest(self):
        from RobustMedSAMLib.samples import sample_path

        return slicer.util.loadVolume(str(sample_path("chest-ct")))

    def test_module_logic(self):
        self.delayDisplay("RobustMedSAM logic (engine process)")
        from RobustMedSAMLib.prompt_files import ObjectPrompts
        from RobustMedSAMLib.prompts import Prompt

        engine = self._tinyEngine()
        self.assertTrue(engine.wait(engine.load(), 120).ok)
        self.assertNotIn("torch", __import__("sys").modules, "the Slicer process must not import torch")
        volumeNode = self._loadChest()
        from RobustMedSAM import RobustMedSAMLogic

        logic = RobustMedSAMLogic()
        objects = [ObjectPrompts("right lung", None, {20: Prompt(box=[56, 38, 105, 97])}),
                   ObjectPrompts("left lung", None, {19: Prompt(box=[20, 33, 67, 97])})]
        seg, ids, result = logic.bridge.segmentVolume(volumeNode, objects, sliceRange=(18, 22), engine=engine,
                                                      timeout=300)
        self.assertEqual(list(ids), [o.name for o in objects])
        self.assertTrue(logic.undo(seg))
        rows, table = logic.robustnessCheck(volumeNode, objects[:1], corruptions=["gaussian_noise"], engine=engine,
                                            slice_range=(18, 22), timeout=300)
        self.assertEqual([r.corruption for r in rows], ["clear", "gaussian_noise"])
        self.assertEqual(table.GetTable().GetNumberOfRows(), 2)
        self.delayDisplay("logic ok")

    def _editor(self, volumeNode):
        segNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        segNode.CreateDefaultDisplayNodes()
        segNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        segmentID = segNode.GetSegmentation().AddEmptySegment("lung")
        widget = slicer.qMRMLSegmentEditorWidget()
        widget.setMRMLScene(slicer.mrmlScene)
        editorNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
        widget.setMRMLSegmentEditorNode(editorNode)
        widget.setSegmentationNode(segNode)
        widget.setSourceVolumeNode(volumeNode) if hasattr(widget, "setSourceVolumeNode") else widget.setMasterVolumeNode(volumeNode)
        widget.setCurrentSegmentID(segmentID)
        return widget, segNode, segmentID

    def test_effects(self):
        import numpy as np

        from RobustMedSAMLogic import segments, volumes
        from RobustMedSAMLogic.interaction import SlicePosition

        engine = self._tinyEngine()
        volumeNode = self._loadChest()
        widget, segNode, segmentID = self._editor(volumeNode)

        self.delayDisplay("RobustMedSAM effect")
        widget.setActiveEffectByName("RobustMedSAM")
        effect = widget.activeEffect()
        self.assertIsNotNone(effect, "the RobustMedSAM effect is not registered")
        e = effect.self()
        e._resetSession()
        self._waitFor(lambda: engine.is_loaded and engine.pending == 0)
        shape = volumes.shape_of(volumeNode)
        corner = lambda x, y: SlicePosition(0, 20, (x, y), (x, y, 20.0))  # noqa: E731
        e.session.set_box(corner(56, 38), corner(104, 96), (shape[1], shape[2]))
        self.assertEqual(e.session.state, "pending")  # the click returned at once
        self._waitFor(lambda: e.session.state != "pending")
        self.assertEqual(e.session.state, "preview", e.session.message)
        before = segments.snapshot(segNode, volumeNode)
        e.onCancel()
        self.assertTrue(segments.same_snapshot(before, segments.snapshot(segNode, volumeNode)))
        e.session.set_box(corner(56, 38), corner(104, 96), (shape[1], shape[2]))
        e.session.add_point(corner(80, 60), (shape[1], shape[2]))
        self._waitFor(lambda: e.session.state != "pending")
        expected = e.session.mask.copy()
        e.onApply()
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(segNode, segmentID, volumeNode) != 0
        self.assertTrue(np.array_equal(mask[20], expected))
        widget.undo()
        self.assertFalse((slicer.util.arrayFromSegmentBinaryLabelmap(segNode, segmentID, volumeNode) != 0).any())
        widget.redo()

        self.delayDisplay("RobustMedSAM Propagate effect")
        widget.setActiveEffectByName("RobustMedSAM Propagate")
        effect = widget.activeEffect()
        self.assertIsNotNone(effect, "the RobustMedSAM Propagate effect is not registered")
        p = effect.self()
        p.thresholdSlider.value = 0.0
        p.rangeCheck.checked = True
        p.firstSpin.value, p.lastSpin.value = 17, 23
        before = segments.snapshot(segNode, volumeNode)
        p.onPropagate()
        p.onCancel()  # cancel immediately: nothing may change
        self._waitFor(lambda: engine.pending == 0)
        self.assertTrue(segments.same_snapshot(before, segments.snapshot(segNode, volumeNode)))
        p.onPropagate()
        self._waitFor(lambda: not p.running)
        self.assertIsNotNone(p.session.result)
        p.onApply()
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(segNode, segmentID, volumeNode) != 0
        self.assertTrue(mask[17:24].any() and not mask[:17].any() and not mask[24:].any())
        widget.undo()
        self.assertTrue(segments.same_snapshot(before, segments.snapshot(segNode, volumeNode)))
        widget.setActiveEffectByName("")
        self.delayDisplay("effects ok")

    def test_killed_engine(self):
        """Kill the engine process during a propagation: one clear message, the segment voxel-identical, and
        the next Propagate works in a fresh engine."""
        import os
        import signal

        import numpy as np

        from RobustMedSAMLogic import segments

        engine = self._tinyEngine()
        volumeNode = self._loadChest()
        widget, segNode, segmentID = self._editor(volumeNode)
        array = np.zeros(slicer.util.arrayFromVolume(volumeNode).shape, np.uint8)
        array[20, 40:90, 60:100] = 1
        slicer.util.updateSegmentBinaryLabelmapFromArray(array, segNode, segmentID, volumeNode)
        widget.setActiveEffectByName("RobustMedSAM Propagate")
        p = widget.activeEffect().self()
        p.thresholdSlider.value = 0.0
        self.assertTrue(engine.wait(engine.load(), 120).ok)
        before = segments.snapshot(segNode, volumeNode)
        p.onPropagate()
        self._waitFor(lambda: p.session.request is not None and p.session.request.done >= 2)
        os.kill(engine.client.pid, getattr(signal, "SIGKILL", signal.SIGTERM))
        self._waitFor(lambda: not p.running)
        self.assertIn("engine process stopped", p.statusLabel.text)
        self.assertTrue(segments.same_snapshot(before, segments.snapshot(segNode, volumeNode)))
        p.onPropagate()
        self._waitFor(lambda: not p.running)
        self.assertIsNotNone(p.session.result, p.statusLabel.text)
        widget.setActiveEffectByName("")
        self.delayDisplay("killed engine ok")
