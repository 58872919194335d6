"""Markups nodes (point lists, ROIs) -> the engine's per-object prompts.

Each node is described in the structure of a Slicer ``.mrk.json`` file, with positions in the source
volume's *local* RAS frame (world positions moved through the volume's parent transform), and handed to
the engine's :func:`~RobustMedSAMLib.prompt_files.prompts_from_markups`. The rules are therefore exactly
those of prompt files: one node = one object (segment) named after the node; a control point whose label
starts with ``-`` or ``neg`` (or whose description is ``negative``) is a negative point; a ROI is a box on
the slice through its centre; points go to the nearest slice along the axis.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

import numpy as np

from . import volumes


def _world_to_volume(volume_node) -> np.ndarray:
    return np.linalg.inv(volumes.local_to_world(volume_node))


def node_description(markups_node, volume_node) -> Dict[str, Any]:
    """A ``.mrk.json``-style dict of one point list or ROI node, in the volume's local RAS frame."""
    to_volume = _world_to_volume(volume_node)

    def to_local(world) -> List[float]:
        return [float(v) for v in (to_volume @ np.append(np.asarray(world, dtype=np.float64), 1.0))[:3]]

    display = markups_node.GetDisplayNode()
    color = list(display.GetSelectedColor()) if display is not None else None
    cls = markups_node.GetClassName()
    desc: Dict[str, Any] = {"name": markups_node.GetName(), "coordinateSystem": "RAS", "coordinateUnits": "mm"}
    if color is not None:
        desc["display"] = {"selectedColor": color}
    if cls == "vtkMRMLMarkupsROINode":
        center = [0.0, 0.0, 0.0]
        markups_node.GetCenterWorld(center)
        axes = volumes.to_numpy(markups_node.GetObjectToWorldMatrix())[:3, :3]
        axes = to_volume[:3, :3] @ axes
        axes = axes / np.linalg.norm(axes, axis=0)
        size = [0.0, 0.0, 0.0]
        markups_node.GetSizeWorld(size) if hasattr(markups_node, "GetSizeWorld") else markups_node.GetSize(size)
        desc.update({"type": "ROI", "center": to_local(center), "size": [float(s) for s in size],
                     "orientation": [float(v) for v in axes.ravel()],
                     "insideOut": bool(markups_node.GetInsideOut()) if hasattr(markups_node, "GetInsideOut")
                     else False})
        return desc
    if not markups_node.IsA("vtkMRMLMarkupsFiducialNode"):
        desc["type"] = cls.replace("vtkMRMLMarkups", "").replace("Node", "")  # rejected by the engine
        return desc
    points = []
    for n in range(markups_node.GetNumberOfControlPoints()):
        world = [0.0, 0.0, 0.0]
        markups_node.GetNthControlPointPositionWorld(n, world)
        defined = markups_node.GetNthControlPointPositionStatus(n) == markups_node.PositionDefined
        points.append({"label": markups_node.GetNthControlPointLabel(n),
                       "description": markups_node.GetNthControlPointDescription(n),
                       "position": to_local(world), "positionStatus": "defined" if defined else "undefined"})
    desc.update({"type": "Fiducial", "controlPoints": points})
    return desc


def prompts_from_markups_nodes(markups_nodes: Sequence, volume_node, axis=0):
    """Engine ``ObjectPrompts`` (one per node, in order) for ``volume_node`` and ``axis``.

    Raises the engine's ``PromptFileError`` naming the node and the problem (point outside the volume, box
    corners on two slices, unsupported markups type...).
    """
    from RobustMedSAMLib.prompt_files import PromptFileError, prompts_from_markups

    volume = volumes.volume_from_node(volume_node)
    data = {"markups": [node_description(n, volume_node) for n in markups_nodes]}
    objects = prompts_from_markups(data, volume, axis, source="markups nodes", default_name="markups")
    names = [o.name for o in objects]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise PromptFileError(f"markups nodes: several nodes are named {duplicates[0]!r}; rename them (one "
                              "segment per node)")
    return objects
