"""Drawing of the prompt effect in slice views: the box rubber band and the prompt points (VTK 2D actors,
added through the Segment Editor effect's ``scriptedEffect.addActor2D``; VTK only, no Qt).

Positions: the rubber band in view pixels; points are slice pixels ``(x, y)`` of the prompt set's voxel slice
(docs/coordinates.md), drawn only in views that show that slice.
"""
import numpy as np
import vtk

from . import volumes


class PromptDrawing:
    """The 2D actors of one effect instance, per slice view (added through ``scriptedEffect.addActor2D``)."""

    def __init__(self, scriptedEffect):
        self.scriptedEffect = scriptedEffect
        self.actors = {}  # view widget -> (rubber band actor, its polydata, {positive: (actor, points, polydata)})

    def _actorsFor(self, viewWidget):
        if viewWidget not in self.actors:
            poly = vtk.vtkPolyData()
            poly.SetPoints(vtk.vtkPoints())
            mapper = vtk.vtkPolyDataMapper2D()
            mapper.SetInputData(poly)
            band = vtk.vtkActor2D()
            band.SetMapper(mapper)
            band.GetProperty().SetColor(1.0, 0.85, 0.1)
            band.GetProperty().SetLineWidth(2)
            band.VisibilityOff()
            self.scriptedEffect.addActor2D(viewWidget, band)
            glyphs = {}
            for positive, color in ((True, (0.2, 0.9, 0.2)), (False, (0.95, 0.2, 0.2))):
                pts = vtk.vtkPoints()
                pd = vtk.vtkPolyData()
                pd.SetPoints(pts)
                source = vtk.vtkGlyphSource2D()
                source.SetGlyphTypeToCircle() if positive else source.SetGlyphTypeToCross()
                source.SetScale(10)
                source.FilledOff()
                glyph = vtk.vtkGlyph2D()
                glyph.SetInputData(pd)
                glyph.SetSourceConnection(source.GetOutputPort())
                gm = vtk.vtkPolyDataMapper2D()
                gm.SetInputConnection(glyph.GetOutputPort())
                actor = vtk.vtkActor2D()
                actor.SetMapper(gm)
                actor.GetProperty().SetColor(*color)
                actor.GetProperty().SetLineWidth(2)
                self.scriptedEffect.addActor2D(viewWidget, actor)
                glyphs[positive] = (actor, pts, pd)
            self.actors[viewWidget] = (band, poly, glyphs)
        return self.actors[viewWidget]

    def band(self, viewWidget, rect):
        """Show the rubber band ``(x0, y0, x1, y1)`` in view pixels, or hide it (None)."""
        band, poly, _ = self._actorsFor(viewWidget)
        if rect is None:
            band.VisibilityOff()
        else:
            x0, y0, x1, y1 = rect
            points = vtk.vtkPoints()
            for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)):
                points.InsertNextPoint(x, y, 0)
            lines = vtk.vtkCellArray()
            lines.InsertNextCell(5)
            for n in range(5):
                lines.InsertCellPoint(n)
            poly.SetPoints(points)
            poly.SetLines(lines)
            poly.Modified()
            band.VisibilityOn()
        self.scriptedEffect.scheduleRender(viewWidget)

    def points(self, viewWidgets, prompts, volumeNode):
        """Draw ``prompts``' points (a ``PromptSet`` or None) in each view that shows their slice."""
        from RobustMedSAMLib.volume_io import slice_to_ijk

        for viewWidget in viewWidgets:
            _, _, glyphs = self._actorsFor(viewWidget)
            for actor, pts, pd in glyphs.values():
                pts.Reset()
            if prompts is not None and volumeNode is not None:
                ijkToWorld = volumes.local_to_world(volumeNode) @ volumes.ijk_to_ras(volumeNode)
                sliceNode = viewWidget.sliceLogic().GetSliceNode()
                rasToXy = np.linalg.inv(volumes.to_numpy(sliceNode.GetXYToRAS()))
                for x, y, positive in prompts.points:
                    ijk = slice_to_ijk(prompts.axis, prompts.index, [[x, y]])[0]
                    xyz = rasToXy @ (ijkToWorld @ [ijk[0], ijk[1], ijk[2], 1.0])
                    if abs(xyz[2]) < 0.5:  # only on the slice being shown
                        glyphs[positive][1].InsertNextPoint(xyz[0], xyz[1], 0)
            for actor, pts, pd in glyphs.values():
                pd.Modified()
            self.scriptedEffect.scheduleRender(viewWidget)

    def remove_all(self):
        for viewWidget, (band, poly, glyphs) in list(self.actors.items()):
            self.scriptedEffect.removeActor2D(viewWidget, band)
            for actor, _, _ in glyphs.values():
                self.scriptedEffect.removeActor2D(viewWidget, actor)
        self.actors = {}
