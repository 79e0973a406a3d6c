"""Static checks of every Slicer module folder: .ui vs Widget, parameter names, compilation,
CMake file lists, and Qt-free Logic.  These catch the commonest ways a panel or an installed
extension breaks, without the Slicer application.
"""

import ast
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

# Files a scripted module installs; everything else in a module folder is build or test input.
INSTALLED_SUFFIXES = {".py", ".ui", ".png", ".svg", ".json", ".csv", ".txt"}

# Importing these needs the Slicer application (Qt); Logic files must not.
GUI_MODULES = ("qt", "ctk", "PythonQt", "slicer.ScriptedLoadableModule", "SegmentEditorEffects", "SampleData")
GUI_SLICER_ATTRIBUTES = {"app", "qMRMLUtils", "qSlicerSegmentEditorAbstractEffect"}
GUI_UTIL_FUNCTIONS = {"mainWindow", "loadUI", "childWidgetVariables", "errorDisplay", "warningDisplay",
                      "infoDisplay", "delayDisplay", "tryWithErrorDisplay", "confirmOkCancelDisplay",
                      "confirmYesNoDisplay", "confirmRetryCloseDisplay", "messageBox", "setSliceViewerLayers"}


def _classes(tree):
    return [node for node in tree.body if isinstance(node, ast.ClassDef)]


def _decorator_names(cls):
    names = set()
    for decorator in cls.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        names.add(target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", ""))
    return names


def _parameter_fields(tree):
    fields = set()
    for cls in _classes(tree):
        if "parameterNodeWrapper" in _decorator_names(cls):
            fields |= {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    return fields


def _ui_attributes(cls):
    """Names used as ``self.ui.<name>`` inside a class."""
    return {node.attr for node in ast.walk(cls)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
            and node.value.attr == "ui" and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"}


def _loaded_ui_files(cls):
    """``X.ui`` from ``slicer.util.loadUI(self.resourcePath("UI/X.ui"))`` calls."""
    files = []
    for node in ast.walk(cls):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "resourcePath":
            for arg in node.args:
                if isinstance(arg, ast.Constant) and str(arg.value).endswith(".ui"):
                    files.append(arg.value)
    return files


def _ui_names(ui_path):
    root = ET.parse(ui_path).getroot()
    names = {el.get("name") for el in root.iter() if el.tag in ("widget", "layout", "action") and el.get("name")}
    parameters = {}
    for widget in root.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                parameters[widget.get("name")] = (prop.findtext("string") or "").strip()
    return names, parameters


def test_widget_uses_only_names_the_ui_defines(module_script):
    tree = ast.parse(module_script.read_text(), str(module_script))
    fields = _parameter_fields(tree)
    for cls in _classes(tree):
        used = _ui_attributes(cls)
        if not used:
            continue
        ui_files = _loaded_ui_files(cls)
        assert ui_files, f"{cls.name} uses self.ui but loads no .ui through self.resourcePath('UI/...')"
        defined, bound = set(), {}
        for ui_file in ui_files:
            ui_path = module_script.parent / "Resources" / ui_file
            assert ui_path.is_file(), f"{cls.name} loads {ui_file}, missing at {ui_path}"
            names, parameters = _ui_names(ui_path)
            defined |= names
            bound.update(parameters)
        missing = sorted(used - defined)
        assert not missing, f"{module_script.name}: {cls.name} uses self.ui.{{{', '.join(missing)}}} not in {ui_files}"
        unknown = {widget: name for widget, name in bound.items() if name.split(".")[0] not in fields}
        assert not unknown, (f"{module_script.name}: SlicerParameterName(s) {unknown} name no field of the "
                             f"@parameterNodeWrapper class (fields: {sorted(fields)})")


# Widgets that hold a file or folder path.  Slicer's parameter-node connectors bind them only to
# pathlib.Path fields and write str(Path("")) == "." into them when the field is empty, so the
# modules keep paths in str fields synced by DeepImagingCommonLib.pathbinding.PathFieldBinding.
PATH_WIDGET_CLASSES = ("ctkPathLineEdit", "ctkDirectoryButton")


def _parameter_annotations(tree):
    """``{field: annotation source}`` of the @parameterNodeWrapper classes."""
    annotations = {}
    for cls in _classes(tree):
        if "parameterNodeWrapper" in _decorator_names(cls):
            annotations.update({n.target.id: ast.unparse(n.annotation) for n in cls.body
                                if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)})
    return annotations


def _path_widgets(ui_path):
    """``[(name, class, {property: text})]`` of the path widgets in a .ui file."""
    widgets = []
    for widget in ET.parse(ui_path).getroot().iter("widget"):
        if widget.get("class") in PATH_WIDGET_CLASSES:
            properties = {prop.get("name"): (prop.findtext("string") or "").strip()
                          for prop in widget.findall("property")}
            widgets.append((widget.get("name"), widget.get("class"), properties))
    return widgets


def _loaded_ui_paths(module_script, tree):
    """The .ui files the classes of a module script load (those that exist)."""
    paths = [module_script.parent / "Resources" / ui_file
             for cls in _classes(tree) for ui_file in _loaded_ui_files(cls)]
    return sorted({path for path in paths if path.is_file()})


def _is_self_attribute(node):
    return isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self"


def _ui_widget_name(node):
    """``name`` for a ``self.ui.<name>`` expression, else None."""
    if isinstance(node, ast.Attribute) and _is_self_attribute(node.value) and node.value.attr == "ui":
        return node.attr
    return None


def _path_bindings(tree):
    """``{widget: binding attribute or None}`` for each ``PathFieldBinding(self.ui.<widget>, ...)``;
    the attribute is ``X`` when the binding is assigned straight to ``self.X``."""
    assignedTo = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            for target in node.targets:
                if _is_self_attribute(target):
                    assignedTo[id(node.value)] = target.attr
    bindings = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        function = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        if function != "PathFieldBinding":
            continue
        widget = node.args[0] if node.args else next((k.value for k in node.keywords if k.arg == "widget"), None)
        name = _ui_widget_name(widget)
        if name is not None:
            bindings[name] = assignedTo.get(id(node))
    return bindings


def _remembered(tree):
    """Receivers of ``.remember()`` calls: ``X`` for ``self.X.remember()``, "" for any other."""
    return {node.func.value.attr if _is_self_attribute(node.func.value) else ""
            for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "remember"}


def _path_binding_problems(module_script):
    """Path widgets bound through SlicerParameterName (an empty pathlib.Path field shows ".")."""
    tree = ast.parse(module_script.read_text(), str(module_script))
    annotations, problems = _parameter_annotations(tree), []
    for ui_path in _loaded_ui_paths(module_script, tree):
        for name, widgetClass, properties in _path_widgets(ui_path):
            field = properties.get("SlicerParameterName", "").split(".")[0]
            if not field:
                continue
            annotation = annotations.get(field, "")
            if "Path" in annotation:
                problems.append(f"{ui_path.name}: {widgetClass} {name} is bound to '{field}: {annotation}', "
                                "which shows '.' when empty; make the field 'str = \"\"' and sync it with "
                                "PathFieldBinding instead of SlicerParameterName")
            else:
                problems.append(f"{ui_path.name}: {widgetClass} {name} has SlicerParameterName '{field}' "
                                f"({annotation or 'no such field'}); Slicer connects path widgets only to "
                                "pathlib.Path fields (shown as '.' when empty): use PathFieldBinding")
    return problems


TRAINING_SECTION = Path(__file__).resolve().parents[2] / "DeepImagingCommon" / "DeepImagingCommonWidgets" / "trainingsection.py"


def _path_history_problems(module_script):
    """ctkPathLineEdits without a settingKey, a PathFieldBinding, or a remember() of it."""
    tree = ast.parse(module_script.read_text(), str(module_script))
    bindings, remembered, problems = _path_bindings(tree), _remembered(tree), []
    if "TrainingSectionMixin" in module_script.read_text():  # its onTrainButton remembers the training paths
        remembered |= _remembered(ast.parse(TRAINING_SECTION.read_text(), str(TRAINING_SECTION)))
    for ui_path in _loaded_ui_paths(module_script, tree):
        for name, widgetClass, properties in _path_widgets(ui_path):
            if widgetClass != "ctkPathLineEdit":
                continue
            if not properties.get("settingKey"):
                problems.append(f"{ui_path.name}: {name} has no settingKey, so its path history is not stored")
            if name not in bindings:
                problems.append(f"{module_script.name}: no PathFieldBinding(self.ui.{name}, ...) syncs {name}")
            elif bindings[name] is not None and bindings[name] not in remembered:
                problems.append(f"{module_script.name}: self.{bindings[name]}.remember() is never called, so "
                                f"the paths used in {name} never reach its history")
            elif bindings[name] is None and not remembered:
                problems.append(f"{module_script.name}: no .remember() call, so the paths used in {name} never "
                                "reach its history")
    return problems


def test_path_widgets_are_not_bound_to_path_fields(module_script):
    problems = _path_binding_problems(module_script)
    assert not problems, "; ".join(problems)


def test_path_line_edits_store_history_through_a_binding(module_script):
    problems = _path_history_problems(module_script)
    assert not problems, "; ".join(problems)


def _shared_setting_keys(folders):
    """``{settingKey: ["file.ui:widget", ...]}`` for keys that several path widgets use."""
    owners = {}
    for folder in folders:
        for ui_path in sorted(folder.rglob("*.ui")):
            for name, _class, properties in _path_widgets(ui_path):
                key = properties.get("settingKey")
                if key:
                    owners.setdefault(key, []).append(f"{ui_path.name}:{name}")
    return {key: widgets for key, widgets in owners.items() if len(widgets) > 1}


def test_path_setting_keys_are_unique(all_module_folders):
    """Two path widgets with one settingKey would share (and overwrite) one history."""
    shared = _shared_setting_keys(all_module_folders)
    assert not shared, f"settingKey(s) used by more than one path widget: {shared}"


OLD_STYLE_UI = """<?xml version="1.0" encoding="UTF-8"?>
<ui version="4.0"><widget class="qMRMLWidget" name="Mod"><layout class="QVBoxLayout" name="layout">
 <item><widget class="ctkPathLineEdit" name="modelPathLineEdit">{model}</widget></item>
 <item><widget class="ctkDirectoryButton" name="outputDirectoryButton">{output}</widget></item>
</layout></widget></ui>
"""
OLD_STYLE_SCRIPT = """
@parameterNodeWrapper
class ModParameterNode:
    modelPath: {pathType}
    outputFolder: {pathType}

class ModWidget:
    def setup(self):
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/Mod.ui"))
        {setup}

    def onApplyButton(self):
        {apply}
"""


def _write_module(folder, model="", output="", pathType="pathlib.Path", setup="pass", apply="pass"):
    (folder / "Resources" / "UI").mkdir(parents=True, exist_ok=True)
    (folder / "Resources" / "UI" / "Mod.ui").write_text(OLD_STYLE_UI.format(model=model, output=output))
    script = folder / "Mod.py"
    script.write_text(OLD_STYLE_SCRIPT.format(pathType=pathType, setup=setup, apply=apply))
    return script


def test_path_checks_catch_what_they_are_meant_to(tmp_path):
    """The path checks above must fail on the old module pattern and pass on the fixed one."""
    bound = '<property name="SlicerParameterName" stdset="0"><string>{}</string></property>'
    old = _write_module(tmp_path / "old", model=bound.format("modelPath") +
                        '<property name="settingKey"><string>ModelPath</string></property>',
                        output=bound.format("outputFolder"))
    assert len(_path_binding_problems(old)) == 2  # both path widgets on pathlib.Path fields
    history = _path_history_problems(old)
    assert len(history) == 1 and "no PathFieldBinding" in history[0]
    strBound = _write_module(tmp_path / "str", model=bound.format("modelPath"), pathType='str = ""')
    assert "use PathFieldBinding" in _path_binding_problems(strBound)[0]  # no connector for str
    setup = "self._modelBinding = PathFieldBinding(self.ui.modelPathLineEdit, 'modelPath')"
    unremembered = _write_module(tmp_path / "unremembered", pathType='str = ""', setup=setup)
    problems = _path_history_problems(unremembered)
    assert len(problems) == 2 and "no settingKey" in problems[0] and "remember() is never called" in problems[1]
    fixed = _write_module(tmp_path / "fixed", model='<property name="settingKey"><string>Mod/Model</string></property>',
                          pathType='str = ""', setup=setup, apply="self._modelBinding.remember()")
    assert _path_binding_problems(fixed) == [] and _path_history_problems(fixed) == []
    copy = _write_module(tmp_path / "copy", model='<property name="settingKey"><string>Mod/Model</string></property>')
    assert _shared_setting_keys([fixed.parent]) == {}
    assert _shared_setting_keys([fixed.parent, copy.parent]) == {"Mod/Model": ["Mod.ui:modelPathLineEdit"] * 2}


def test_ui_files_are_qmrmlwidgets_with_unique_names(module_dir):
    for ui_path in sorted(module_dir.glob("Resources/UI/*.ui")):
        root = ET.parse(ui_path).getroot()
        top = root.find("widget")
        assert top is not None and top.get("class") == "qMRMLWidget", \
            f"{ui_path.name}: the top-level widget must be a qMRMLWidget"
        names = [el.get("name") for el in root.iter() if el.tag in ("widget", "layout") and el.get("name")]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        assert not duplicates, f"{ui_path.name}: duplicate object names {duplicates}"


def test_every_python_file_compiles(module_dir):
    for path in sorted(module_dir.rglob("*.py")):
        compile(path.read_text(), str(path), "exec")  # raises SyntaxError with file and line


def _installed_lists(cmake, cmake_file):
    """Files passed as SCRIPTS / RESOURCES to slicerMacroBuildScriptedModule, per module name."""
    lists = {}
    for name, args in cmake.commands(cmake_file):
        if name != "slicerMacroBuildScriptedModule":
            continue
        module, files, key = None, [], None
        for arg in args:
            if arg in ("NAME", "SCRIPTS", "RESOURCES", "WITH_GENERIC_TESTS", "WITH_SUBDIR", "VERBOSE"):
                key = arg
            elif key == "NAME":
                module = arg
            elif key in ("SCRIPTS", "RESOURCES"):
                files.append(arg if Path(arg).suffix else arg + ".py")
        lists[module] = files
    return lists


def _files_on_disk(module_dir):
    files = set()
    for path in module_dir.rglob("*"):
        relative = path.relative_to(module_dir)
        if (path.is_file() and path.suffix in INSTALLED_SUFFIXES and path.name != "CMakeLists.txt"
                and "__pycache__" not in relative.parts and relative.parts[0] != "Testing"
                and not any(part.startswith(".") for part in relative.parts)):
            files.add(relative.as_posix())
    return files


def test_cmake_lists_match_files_on_disk(module_dir, cmake):
    lists = _installed_lists(cmake, module_dir / "CMakeLists.txt")
    assert module_dir.name in lists, \
        f"{module_dir.name}/CMakeLists.txt builds no scripted module named {module_dir.name}"
    listed = [f for files in lists.values() for f in files]
    duplicates = sorted({f for f in listed if listed.count(f) > 1})
    assert not duplicates, f"{module_dir.name}/CMakeLists.txt lists {duplicates} more than once"
    on_disk = _files_on_disk(module_dir)
    missing = sorted(on_disk - set(listed))
    stale = sorted(set(listed) - on_disk)
    assert not missing, f"{module_dir.name}/CMakeLists.txt does not list {missing}: they would not be installed"
    assert not stale, f"{module_dir.name}/CMakeLists.txt lists {stale}, which do not exist"
    for module in lists:
        assert (module_dir / f"{module}.py").is_file(), f"module {module} has no {module}.py"


def _logic_files(module_dir):
    """Files under ``<Name>Lib/`` that must run headless (Segment Editor effect Libs are GUI)."""
    return sorted(path for lib in module_dir.glob("*Lib") if lib.is_dir() and not lib.name.startswith("SegmentEditor")
                  for path in lib.rglob("*.py"))


def _gui_uses(tree):
    problems = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            if any(name == banned or name.startswith(banned + ".") for banned in GUI_MODULES) or \
                    name.split(".")[-1].startswith(("qSlicer", "qMRML")):
                problems.append(f"line {node.lineno}: imports {name}")
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "slicer" \
                and node.attr in GUI_SLICER_ATTRIBUTES:
            problems.append(f"line {node.lineno}: uses slicer.{node.attr}")
        if isinstance(node, ast.Attribute) and node.attr in GUI_UTIL_FUNCTIONS \
                and isinstance(node.value, ast.Attribute) and node.value.attr == "util":
            problems.append(f"line {node.lineno}: calls slicer.util.{node.attr}")
        if isinstance(node, ast.Attribute) and node.attr.startswith(("qSlicer", "qMRML")):
            problems.append(f"line {node.lineno}: uses {node.attr}")
    return problems


def test_logic_files_are_qt_free(module_dir):
    for path in _logic_files(module_dir):
        problems = _gui_uses(ast.parse(path.read_text(), str(path)))
        assert not problems, f"{path.relative_to(module_dir.parent)} must run without Qt: " + "; ".join(problems)


def test_qt_free_check_catches_gui_code():
    """The check above must fail on what it is meant to catch."""
    for source in ("import qt", "from ctk import ctkSliderWidget", "from slicer.ScriptedLoadableModule import *",
                   "import slicer\nslicer.app.processEvents()", "import slicer\nslicer.util.errorDisplay('x')",
                   "from slicer import qMRMLNodeComboBox"):
        assert _gui_uses(ast.parse(source)), source
    assert not _gui_uses(ast.parse("import slicer\nimport vtk\nslicer.util.arrayFromVolume(None)"))


@pytest.mark.parametrize("name", ["DeepImagingCommon", "LevelSetRefine"])
def test_expected_modules_are_discovered(name, all_module_folders):
    assert name in [folder.name for folder in all_module_folders]
