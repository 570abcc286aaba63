"""Which Python packages are missing, and what PyTorch can see; no installing here (that needs Slicer's GUI).

The module installs PyTorch only through the PyTorch extension (``PyTorchUtils``, which picks the build that
matches the GPU driver) and the other packages from ``Resources/requirements.txt`` with pip, constrained to
the installed torch so that pip never replaces it. Nothing here imports torch unless asked to describe the
devices.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

TORCH_REQUIREMENT = ">=2.1"
_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*(.*?)\s*$")


def read_requirements(path: str | Path) -> list[str]:
    """Requirement lines of a requirements file, without comments, blank lines or pip options."""
    lines = []
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            lines.append(line)
    return lines


def _version_tuple(version: str) -> tuple:
    parts = []
    for piece in re.split(r"[.+-]", version):
        match = re.match(r"\d+", piece)
        if not match:
            break
        parts.append(int(match.group()))
    return tuple(parts)


def _satisfies(installed: str, specifier: str) -> bool:
    if not specifier:
        return True
    try:
        from packaging.specifiers import SpecifierSet

        return SpecifierSet(specifier).contains(installed, prereleases=True)
    except ImportError:  # without packaging: the ">=" bounds used in requirements.txt
        for raw in specifier.split(","):
            clause = raw.strip()
            if clause.startswith(">=") and _version_tuple(installed) < _version_tuple(clause[2:].strip()):
                return False
        return True


def missing_requirements(requirements: list[str]) -> list[str]:
    """The requirements that are not installed, or installed at a version that does not satisfy them."""
    missing = []
    for requirement in requirements:
        match = _REQUIREMENT.match(requirement)
        if not match:
            continue
        name, specifier = match.group(1), match.group(2).split(";", 1)[0].strip()
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(requirement)
            continue
        if not _satisfies(installed, specifier):
            missing.append(requirement)
    return missing


def torch_installed() -> bool:
    """Whether torch can be imported, without importing it."""
    return "torch" in sys.modules or importlib.util.find_spec("torch") is not None


def installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def torch_constraints() -> str:
    """pip constraints that pin the installed torch and torchvision, so that pip never swaps them."""
    lines = []
    for name in ("torch", "torchvision"):
        version = installed_version(name)
        if version:
            lines.append(f"{name}=={version}")
    return "\n".join(lines) + ("\n" if lines else "")


@dataclass
class DeviceInfo:
    torch_version: str | None = None
    cuda_devices: list[str] = field(default_factory=list)
    cuda_version: str | None = None
    mps: bool = False

    @property
    def cuda(self) -> bool:
        return bool(self.cuda_devices)

    def describe(self) -> str:
        if self.torch_version is None:
            return "PyTorch is not installed: it is installed (after asking) on the first Propagate."
        if self.cuda_devices:
            gpus = "; ".join(self.cuda_devices)
            return f"PyTorch {self.torch_version}, CUDA {self.cuda_version}: {gpus}. Automatic uses the GPU."
        return (f"PyTorch {self.torch_version}: no CUDA GPU found, runs on the CPU "
                "(slower: about 1 s per slice to encode).")


def device_info() -> DeviceInfo:
    """What PyTorch can run on (imports torch: call it once torch is known to be installed)."""
    if not torch_installed():
        return DeviceInfo()
    import torch

    info = DeviceInfo(torch_version=torch.__version__, cuda_version=torch.version.cuda)
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            properties = torch.cuda.get_device_properties(index)
            info.cuda_devices.append(f"{properties.name} ({properties.total_memory / 2**30:.0f} GB)")
    backends = getattr(torch, "backends", None)
    info.mps = bool(backends and getattr(backends, "mps", None) and torch.backends.mps.is_available())
    return info
