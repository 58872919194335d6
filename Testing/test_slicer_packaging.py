"""Packaging of the 3D Slicer extension: CMake lists install every file the module, the effects and the
engine need; ExtensionsIndex entry, icon, licence; GUI-free code stays GUI-free; Python 3.9 syntax."""
from __future__ import annotations

import ast
import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "RobustMedSAM"
ENGINE_DIR = REPO / "RobustMedSAMLib"
SKIP_PARTS = {"__pycache__", ".pytest_cache"}


def cmake_commands(path: Path):
    """``(command, [arguments])`` of a CMake file (comments dropped, quoted strings kept whole)."""
    text = re.sub(r"#[^\n]*", "", path.read_text())
    for m in re.finditer(r"([A-Za-z_][A-Za-z0-9_]*)\s*\((.*?)\)", text, re.S):
        args = re.findall(r'"[^"]*"|[^\s"]+', m.group(2))
        yield m.group(1), [a.strip('"') for a in args]


def evaluate(path: Path):
    """Variables of ``set()`` and the files given to slicerMacroBuildScriptedModule/ctkMacroCompilePythonScript,
    as repository-relative paths."""
    variables, installed, modules = {"CMAKE_CURRENT_SOURCE_DIR": str(path.parent)}, set(), []

    def expand(value: str) -> str:
        return re.sub(r"\$\{([^}]+)\}", lambda m: variables.get(m.group(1), m.group(0)), value)

    for cmd, args in cmake_commands(path):
        if cmd == "set" and args:
            variables[args[0]] = ";".join(expand(a) for a in args[1:])
        elif cmd in ("slicerMacroBuildScriptedModule", "ctkMacroCompilePythonScript"):
            keys = {"NAME", "TARGET_NAME", "SCRIPTS", "RESOURCES", "SOURCE_DIR", "DESTINATION_DIR", "INSTALL_DIR",
                    "WITH_GENERIC_TESTS", "NO_INSTALL_SUBDIR", "WITH_SUBDIR", "VERBOSE"}
            section, parsed = None, {}
            for a in args:
                if a in keys:
                    section = a
                    parsed.setdefault(a, [])
                else:
                    parsed.setdefault(section, []).extend(v for v in expand(a).split(";") if v)
            base = Path(parsed.get("SOURCE_DIR", [str(path.parent)])[0]).resolve()
            modules.append((parsed.get("NAME") or parsed.get("TARGET_NAME"))[0])
            for f in parsed.get("SCRIPTS", []) + parsed.get("RESOURCES", []):
                installed.add((base / f).resolve().relative_to(REPO).as_posix())
    return variables, installed, modules


def files_under(folder: Path):
    return sorted(p for p in folder.rglob("*") if p.is_file() and not SKIP_PARTS & set(p.parts))


def test_cmake_lists_install_every_file():
    top = dict((cmd, args) for cmd, args in cmake_commands(REPO / "CMakeLists.txt") if cmd in ("project",))
    assert top["project"] == ["RobustMedSAM"]
    subdirs = [args[0] for cmd, args in cmake_commands(REPO / "CMakeLists.txt") if cmd == "add_subdirectory"]
    assert subdirs == ["RobustMedSAM"]
    _, installed, modules = evaluate(MODULE_DIR / "CMakeLists.txt")
    assert modules == ["RobustMedSAM", "SegmentEditorRobustMedSAM", "SegmentEditorRobustMedSAMPropagate",
                       "RobustMedSAMLib"]
    needed = {p.relative_to(REPO).as_posix() for p in files_under(MODULE_DIR)
              if p.name not in ("CMakeLists.txt", "README.md")}
    needed |= {p.relative_to(REPO).as_posix() for p in files_under(ENGINE_DIR) if p.suffix == ".py"}
    assert sorted(needed - installed) == [], "files not installed by CMake"
    assert sorted(installed - needed) == [], "CMake lists files that do not exist"
    # each scripted module file at the top of the module folder defines the class Slicer looks for
    for py in MODULE_DIR.glob("*.py"):
        names = {n.name for n in ast.parse(py.read_text()).body if isinstance(n, ast.ClassDef)}
        assert py.stem in names, f"{py.name} must define class {py.stem} (Slicer loads every top-level .py as a module)"


def test_extension_metadata_matches_catalog_entry():
    variables, _, _ = evaluate(REPO / "CMakeLists.txt")
    entry = json.loads((REPO / "RobustMedSAM.json").read_text())
    assert {"$schema", "category", "scm_url"} <= set(entry)
    assert "slicer-extension-catalog-entry-schema-v1.0.1.json" in entry["$schema"]
    assert set(entry) <= {"$schema", "build_dependencies", "build_subdirectory", "category", "enabled",
                          "scm_revision", "scm_type", "scm_url", "tier"}
    assert entry["category"] == variables["EXTENSION_CATEGORY"] == "Segmentation"
    assert sorted(entry["build_dependencies"]) == sorted(variables["EXTENSION_DEPENDS"].split())
    assert entry["scm_url"] == variables["EXTENSION_HOMEPAGE"]
    assert entry["scm_url"].rsplit("/", 1)[1].startswith("Slicer")  # ExtensionsIndex naming rule
    assert not "RobustMedSAM".startswith("Slicer")
    assert variables["EXTENSION_CONTRIBUTORS"] == "RobustMedSAM developers"
    assert variables["EXTENSION_ICONURL"].endswith("/RobustMedSAM.png")
    # every picture the catalogue shows is a file of this repository (raw GitHub URL of the main branch)
    raw = variables["EXTENSION_HOMEPAGE"].replace("https://github.com/", "https://raw.githubusercontent.com/") + "/main/"
    urls = [variables["EXTENSION_ICONURL"]] + variables["EXTENSION_SCREENSHOTURLS"].split()
    for url in urls:
        assert url.startswith(raw) and (REPO / url[len(raw):]).is_file(), url
    lic = (REPO / "LICENSE").read_text()
    assert "MIT License" in lic and "RobustMedSAM developers" in lic


@pytest.mark.parametrize("path,size", [("RobustMedSAM.png", (128, 128)),
                                       ("RobustMedSAM/Resources/Icons/RobustMedSAM.png", (128, 128)),
                                       ("RobustMedSAM/SegmentEditorRobustMedSAMLib/SegmentEditorEffect.png", None),
                                       ("RobustMedSAM/SegmentEditorRobustMedSAMPropagateLib/SegmentEditorEffect.png", None)])
def test_icons_are_png(path, size):
    from PIL import Image

    with Image.open(REPO / path) as im:
        assert im.format == "PNG"
        if size:
            assert im.size == size


def test_no_weights_in_repository():
    for p in files_under(REPO):
        if {".git", ".venv", ".whl", "robustmedsam.egg-info"} & set(p.parts):  # .whl: git-ignored GPU wheels
            continue
        assert p.suffix not in (".pth", ".pt", ".safetensors", ".ckpt"), p
        assert p.stat().st_size < 20_000_000, f"{p} is too large for the ExtensionsIndex (<= 100 MB repository)"


def test_python_39_syntax_and_gui_free_bridge():
    for py in files_under(MODULE_DIR):
        if py.suffix == ".py":
            ast.parse(py.read_text(), filename=str(py), feature_version=(3, 9))
    allowed = {"slicer", "vtk", "numpy", "RobustMedSAMLib", "__future__", "typing", "dataclasses", "pathlib",
               "threading", "time", "traceback", "math", "json", "re", "types", "importlib"}
    for py in (MODULE_DIR / "RobustMedSAMLogic").glob("*.py"):
        for node in ast.parse(py.read_text()).body:  # module-level imports only (torch is imported lazily)
            if isinstance(node, ast.Import):
                roots = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = {(node.module or "").split(".")[0]} if node.level == 0 else set()
            else:
                continue
            assert roots <= allowed, f"{py.name} imports {roots - allowed} at module level"


def test_ui_file_defines_every_widget_the_module_uses():
    ui = MODULE_DIR / "Resources" / "UI" / "RobustMedSAM.ui"
    root = ET.parse(ui).getroot()
    names = {w.get("name") for w in root.iter("widget")}
    used = set(re.findall(r"self\.ui\.([A-Za-z0-9_]+)", (MODULE_DIR / "RobustMedSAM.py").read_text()))
    assert used and used <= names, sorted(used - names)


def test_requirements_file():
    import sys

    sys.path.insert(0, str(MODULE_DIR))
    from RobustMedSAMLogic.dependencies import (missing_requirements, plan_installation, read_requirements,
                                                requirement_name, satisfies)

    reqs = read_requirements(MODULE_DIR / "Resources" / "requirements.txt")
    # no torchvision: the engine never imports it (modeling.sam_package); PyTorchUtils installs it anyway
    assert {requirement_name(r) for r in reqs} == {"torch", "segment-anything", "safetensors", "slicerio"}
    versions = {"torch": "2.3.1+cu121", "segment-anything": "1.0", "safetensors": "0.3.0"}

    def version_of(name):
        if name.lower() not in versions:
            raise LookupError(name)
        return versions[name.lower()]

    assert missing_requirements(reqs, version_of) == ["safetensors>=0.4", "slicerio>=1.4"]
    torch_needed, others = plan_installation(reqs + ["numpy>=99"], version_of)
    assert not torch_needed and others == ["safetensors>=0.4", "slicerio>=1.4"]  # numpy is Slicer's: never installed
    assert plan_installation(["torch>=2.0"], lambda name: {"torch": "1.13.1"}[name])[0]  # too old: PyTorchUtils
    assert satisfies("2.3.1+cu121", ">=2.0") and not satisfies("1.13.1", ">=2.0")
    assert missing_requirements(reqs) == []  # this test environment has everything


def test_typed_parameter_node_declares_the_bridge_settings():
    """RobustMedSAM.py's parameterNodeWrapper class (Slicer >= 5.2) and RobustMedSAMLogic.logic.Settings read
    the same parameter node: same names, types and defaults, in the same order."""
    import dataclasses

    sys.path.insert(0, str(MODULE_DIR))
    try:
        from RobustMedSAMLogic.logic import Settings
    finally:
        sys.path.remove(str(MODULE_DIR))
    tree = ast.parse((MODULE_DIR / "RobustMedSAM.py").read_text())
    wrapper = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "RobustMedSAMParameterNode")
    declared = [(n.target.id, ast.unparse(n.annotation), ast.literal_eval(n.value))
                for n in wrapper.body if isinstance(n, ast.AnnAssign)]
    expected = [(f.name, f.type if isinstance(f.type, str) else f.type.__name__, f.default)
                for f in dataclasses.fields(Settings)]
    assert declared == expected
