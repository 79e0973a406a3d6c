"""The path widget <-> parameter node sync the module widgets share, with a stand-in path widget."""

from types import SimpleNamespace

from DeepImagingCommonLib.pathbinding import PathFieldBinding, pathText


class FakePathLineEdit:
    """Mimics ctkPathLineEdit: a ``currentPath`` property, blockable signals, a history."""

    def __init__(self, path="", onChanged=None):
        self._path, self.blocked, self.emitted, self.history = path, False, 0, []
        self.onChanged = onChanged  # a slot connected to currentPathChanged(QString)

    @property
    def currentPath(self):
        return self._path

    @currentPath.setter
    def currentPath(self, path):
        if path != self._path:
            self._path = path
            if not self.blocked:  # currentPathChanged(QString)
                self.emitted += 1
                if self.onChanged is not None:
                    self.onChanged(path)

    def blockSignals(self, blocked):
        was, self.blocked = self.blocked, blocked
        return was

    def addCurrentPathToHistory(self):
        self.history.append(self._path)


def test_empty_field_shows_empty_not_dot():
    widget = FakePathLineEdit("stale/path")
    binding = PathFieldBinding(widget, "modelPath")
    node = SimpleNamespace(modelPath="")
    binding.nodeToGui(node)
    assert widget.currentPath == "" and node.modelPath == ""
    node.modelPath = "."  # what a pathlib.Path field of an older version left in the scene
    widget.currentPath = "other"
    binding.nodeToGui(node)
    assert widget.currentPath == "" and node.modelPath == ""
    assert pathText(None) == pathText(" ") == pathText(".") == ""


def test_gui_path_reaches_parameter_node():
    widget = FakePathLineEdit()
    binding = PathFieldBinding(widget, "outputFolder")
    node = SimpleNamespace(outputFolder="")
    assert not binding.guiToNode(None)
    widget.currentPath = "/data/out"
    assert binding.guiToNode(node)
    assert node.outputFolder == "/data/out" and isinstance(node.outputFolder, str)
    widget.currentPath = ""
    assert binding.guiToNode(node)
    assert node.outputFolder == ""


def test_parameter_node_shown_without_echo():
    widget = FakePathLineEdit()
    binding = PathFieldBinding(widget, "modelPath")
    node = SimpleNamespace(modelPath="/models/best.pt")
    binding.nodeToGui(node)
    assert widget.currentPath == "/models/best.pt"
    assert widget.emitted == 0 and not widget.blocked  # signals were blocked, then restored
    assert not binding.syncing
    binding.nodeToGui(node)  # unchanged: the widget is not written again
    assert widget.emitted == 0


class ObservedNode:
    """A parameter node whose Modified observer runs on every write, as in Slicer."""

    def __init__(self, **fields):
        self.__dict__.update(fields, observer=None, writes=[])

    def observe(self, observer):
        self.__dict__["observer"] = observer

    def __setattr__(self, name, value):
        self.__dict__[name] = value
        self.writes.append((name, value))
        if self.observer is not None:
            self.observer()


def test_two_way_sync_without_echo():
    node = ObservedNode(modelPath="")
    widget = FakePathLineEdit(onChanged=lambda path: binding.guiToNode(node))
    binding = PathFieldBinding(widget, "modelPath")
    node.observe(lambda: binding.nodeToGui(node))
    widget.currentPath = "/models/a.pt"  # the user picks a file
    assert node.writes == [("modelPath", "/models/a.pt")]  # once: the observer did not write back
    node.modelPath = "/models/b.pt"  # e.g. training selects its best checkpoint
    assert widget.currentPath == "/models/b.pt"
    assert widget.emitted == 1  # only the user's change was signalled, not the node's
    assert node.writes == [("modelPath", "/models/a.pt"), ("modelPath", "/models/b.pt")]


def test_reentrancy_guard():
    widget = FakePathLineEdit("/typed")
    binding = PathFieldBinding(widget, "trainingFolder")
    node = SimpleNamespace(trainingFolder="/stored")
    binding.syncing = True
    binding.nodeToGui(node)
    assert widget.currentPath == "/typed" and not binding.guiToNode(node)
    assert node.trainingFolder == "/stored"


def test_remember_adds_only_set_paths_to_history():
    widget = FakePathLineEdit()
    binding = PathFieldBinding(widget, "checkpointFile")
    assert not binding.remember()
    widget.currentPath = "."
    assert not binding.remember()
    assert widget.history == []
    widget.currentPath = "/models/znet.pt"
    assert binding.remember()
    assert widget.history == ["/models/znet.pt"]
