"""Python requirements of the extension, and installing them inside Slicer on first use.

``Resources/requirements.txt`` lists what Slicer does not ship (torch comes from the PyTorch extension's
``PyTorchUtils``, which picks the CUDA or CPU build and also installs torchvision, which the engine does not
need; numpy, scipy, Pillow and SimpleITK are part of Slicer and are never reinstalled).
:func:`missing_requirements` is pure Python (tested);
:func:`ensure_dependencies` uses Slicer (one confirmation for everything, then PyTorchUtils for torch and
``slicer.packaging.pip_ensure`` (Slicer >= 5.12) or ``slicer.util.pip_install`` for the rest); it installs
nothing in testing mode and never replaces an old torch itself (the PyTorch Utils module does).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

#: shipped with Slicer: never installed or upgraded by this extension
SLICER_PROVIDED = ("numpy", "scipy", "pillow", "simpleitk")
#: installed through the PyTorch extension (CUDA/CPU build chosen by light-the-torch), never by pip here
TORCH_PACKAGES = ("torch", "torchvision")
TORCH_REQUIREMENT = ">=2.0"
#: start of the error raised in testing mode instead of installing (ctest reports such a run as skipped)
TESTING_MESSAGE = "RobustMedSAM installs no Python packages in testing mode"
#: start of the line the module's self-test prints when it cannot run (ctest reports it as skipped)
SELF_TEST_SKIPPED = "RobustMedSAMTest skipped"

_REQ = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*?)\s*(;.*)?$")


class InstallError(RuntimeError):
    """Dependencies could not be installed; ``restart_required`` if Slicer must be restarted first."""

    def __init__(self, message: str, restart_required: bool = False) -> None:
        super().__init__(message)
        self.restart_required = restart_required


def read_requirements(path) -> List[str]:
    """Requirement lines of a requirements file (comments and blank lines dropped)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(line)
    return out


def requirement_name(requirement: str) -> str:
    m = _REQ.match(requirement)
    if not m:
        raise ValueError(f"not a requirement: {requirement!r}")
    return m.group(1).lower().replace("_", "-")


def _version_tuple(text: str) -> Tuple:
    parts = []
    for piece in re.split(r"[.+-]", text):
        m = re.match(r"(\d+)", piece)
        if not m:
            break
        parts.append(int(m.group(1)))
    return tuple(parts)


def satisfies(version: str, specifier: str) -> bool:
    """Whether ``version`` meets a simple specifier list (``>=1.2,<3``); uses ``packaging`` when available."""
    specifier = specifier.strip()
    if not specifier:
        return True
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import Version

        return Version(version) in SpecifierSet(specifier)
    except Exception:  # noqa: BLE001 - minimal fallback
        pass
    v = _version_tuple(version)
    for part in specifier.split(","):
        m = re.match(r"\s*(>=|<=|==|!=|>|<|~=)\s*([^\s]+)", part)
        if not m:
            continue
        op, ref = m.group(1), _version_tuple(m.group(2))
        ok = {">=": v >= ref, "<=": v <= ref, "==": v == ref, "!=": v != ref, ">": v > ref, "<": v < ref,
              "~=": v >= ref}[op]
        if not ok:
            return False
    return True


def missing_requirements(requirements: Sequence[str], version_of: Optional[Callable[[str], str]] = None) -> List[str]:
    """The requirements not satisfied by the installed distributions (``version_of(name)`` defaults to
    ``importlib.metadata.version``; raising ``PackageNotFoundError``/``LookupError`` means missing)."""
    import importlib.metadata as md

    version_of = version_of or md.version
    missing = []
    for req in requirements:
        m = _REQ.match(req)
        name, spec = m.group(1), m.group(3) or ""
        try:
            version = version_of(name)
        except (md.PackageNotFoundError, LookupError):
            missing.append(req)
            continue
        if not satisfies(version, spec):
            missing.append(req)
    return missing


def plan_installation(requirements: Sequence[str], version_of=None) -> Tuple[bool, List[str]]:
    """``(torch needed, other missing requirements)``; Slicer-provided packages are never listed."""
    missing = missing_requirements(requirements, version_of)
    torch_needed = bool(missing_requirements([f"torch{TORCH_REQUIREMENT}"], version_of))
    others = [r for r in missing if requirement_name(r) not in SLICER_PROVIDED + TORCH_PACKAGES]
    return torch_needed, others


def installed_version(name: str, version_of: Optional[Callable[[str], str]] = None) -> Optional[str]:
    """The installed version of distribution ``name`` (metadata only, nothing imported), or None."""
    import importlib.metadata as md

    try:
        return (version_of or md.version)(name)
    except (md.PackageNotFoundError, LookupError):
        return None


def self_test_skip_reason(requirements_path, version_of: Optional[Callable[[str], str]] = None) -> Optional[str]:
    """Why the module's self-test cannot run here (``"RobustMedSAMTest skipped: ..."``: torch or another
    requirement is missing, as on the extension build machines), or None. The self-test logs this line and
    returns, and ctest reports the run as skipped (``RobustMedSAM/CMakeLists.txt``)."""
    torch_needed, others = plan_installation(read_requirements(requirements_path), version_of)
    missing = ([f"torch{TORCH_REQUIREMENT}"] if torch_needed else []) + others
    if not missing:
        return None
    return f"{SELF_TEST_SKIPPED}: Python packages missing: {', '.join(missing)} (see RobustMedSAM/README.md)"


def old_torch_message(version: str) -> str:
    return (f"PyTorch {version} is installed, but RobustMedSAM needs torch{TORCH_REQUIREMENT}. Update it with the "
            "'PyTorch Utils' module (Modules > Utilities > PyTorch Utils): click 'Uninstall PyTorch', restart "
            f"Slicer, enter '{TORCH_REQUIREMENT}' as 'Torch version requirement' and click 'Install PyTorch'")


def slicer_packaging():
    """``slicer.packaging`` (Slicer >= 5.12: ``pip_ensure``), or None on older Slicer versions. It is a
    submodule that ``import slicer`` does not load, so it must be imported by name."""
    try:
        import slicer.packaging as packaging
    except ImportError:
        return None
    return packaging if hasattr(packaging, "pip_ensure") else None


def testing_enabled() -> bool:
    """Slicer runs with ``--testing`` (self-tests, ctest)."""
    import slicer

    app = getattr(slicer, "app", None)
    return bool(app is not None and app.testingEnabled())


def ensure_dependencies(requirements_path, confirm: Optional[Callable[[str], bool]] = None,
                        requester: str = "RobustMedSAM", version_of: Optional[Callable[[str], str]] = None) -> bool:
    """Inside Slicer: install what is missing after one confirmation; True if everything is present.

    Raises :class:`InstallError` with what to do when: the user declines; Slicer runs in testing mode
    (``--testing``: nothing is installed, the message lists what is missing; :data:`TESTING_MESSAGE`);
    an installed torch is older than :data:`TORCH_REQUIREMENT` (it is updated from the PyTorch Utils
    module, which this extension does not do behind the user's back); the PyTorch extension is missing.
    ``confirm(text)`` asks the user (default: ``slicer.util.confirmOkCancelDisplay``). torch is installed
    through ``PyTorchUtils``, the rest with ``slicer.packaging.pip_ensure`` (Slicer >= 5.12) or
    ``slicer.util.pip_install``. ``version_of(name)``: installed versions (default: package metadata).
    """
    import slicer

    requirements = read_requirements(requirements_path)
    torch_needed, others = plan_installation(requirements, version_of)
    if not torch_needed and not others:
        return True
    torch_version = installed_version("torch", version_of)
    what = (["PyTorch (through the PyTorch extension; CUDA build if a GPU is found)"]
            if torch_needed and torch_version is None else []) + others
    if testing_enabled():
        missing = ([f"torch{TORCH_REQUIREMENT}"] if torch_needed else []) + others
        raise InstallError(f"{TESTING_MESSAGE}: missing {', '.join(missing)}; install them in a normal Slicer "
                           "session (open the RobustMedSAM module once) before running the tests")
    if torch_needed and torch_version is not None:
        raise InstallError(old_torch_message(torch_version), restart_required=True)
    text = ("RobustMedSAM needs these Python packages, which will be downloaded and installed now "
            "(this can take several minutes):\n\n  " + "\n  ".join(what))
    if not (confirm or slicer.util.confirmOkCancelDisplay)(text):
        raise InstallError("RobustMedSAM cannot run without its Python packages (installation declined)")
    if torch_needed:
        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            raise InstallError("RobustMedSAM needs the PyTorch extension: install 'PyTorch' from the Extensions "
                               "Manager, restart Slicer, and try again", restart_required=True) from None
        # no torchvisionVersionRequirement: older PyTorchUtils versions do not take it
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                              torchVersionRequirement=TORCH_REQUIREMENT)
        if torch is None:
            raise InstallError("PyTorch could not be installed; see the Python console for details")
    if others:
        packaging = slicer_packaging()
        if packaging is not None:
            packaging.pip_ensure(others, prompt_install=False, requester=requester)
        else:
            # --no-deps would miss pynrrd (slicerio); the listed packages do not pull torch or numpy upgrades
            slicer.util.pip_install(" ".join(others))
    still = missing_requirements(requirements, version_of)
    still = [r for r in still if requirement_name(r) not in SLICER_PROVIDED]
    if still:
        raise InstallError(f"still missing after installation: {', '.join(still)}; restart Slicer and try again",
                           restart_required=True)
    return True
