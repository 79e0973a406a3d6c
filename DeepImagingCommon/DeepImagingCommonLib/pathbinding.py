"""Keeps a path widget (``ctkPathLineEdit``) and a ``str`` parameter-node field in sync.

``@parameterNodeWrapper`` binds a path widget only to a ``pathlib.Path`` field, and writes
``str(pathlib.Path(""))`` - that is "." - into the widget when the field is empty.  So the
modules keep paths in ``str`` fields (empty means unset) and sync the widget with this class.
It also stores the widget's history: ``ctkPathLineEdit`` saves the paths offered in its
drop-down (under its ``settingKey``) only when ``addCurrentPathToHistory()`` is called.

Qt-free (it only calls the widget's methods), so it is tested headless with a stand-in widget.
"""


def pathText(value):
    """A path field's value as the text a path widget shows: "" for None, "" and "."."""
    text = "" if value is None else str(value).strip()
    return "" if text == "." else text


class PathFieldBinding:
    """Two-way sync between ``widget.currentPath`` and ``parameterNode.<field>`` (a ``str``).

    Call :meth:`guiToNode` from the widget's ``currentPathChanged(QString)`` signal and
    :meth:`nodeToGui` from the parameter node's Modified observer; ``syncing`` is True while
    either runs, which stops the two directions from echoing each other.  Call
    :meth:`remember` once the path has been used, to add it to the widget's history.
    """

    def __init__(self, widget, field):
        self.widget = widget
        self.field = field
        self.syncing = False

    def guiToNode(self, parameterNode):
        """Copy the widget's path into the parameter node; False if nothing was done."""
        if parameterNode is None or self.syncing:
            return False
        path = pathText(self.widget.currentPath)
        self.syncing = True
        try:
            if getattr(parameterNode, self.field) != path:
                setattr(parameterNode, self.field, path)
        finally:
            self.syncing = False
        return True

    def nodeToGui(self, parameterNode):
        """Show the parameter node's path in the widget without echoing back.

        An unset field shows as an empty widget; a "." left in the node by an older version
        of the module (or by a ``pathlib.Path`` value) is cleared there too.
        """
        if parameterNode is None or self.syncing:
            return
        stored = getattr(parameterNode, self.field)
        path = pathText(stored)
        self.syncing = True
        wasBlocked = self.widget.blockSignals(True)
        try:
            if self.widget.currentPath != path:
                self.widget.currentPath = path
            if stored != path:
                setattr(parameterNode, self.field, path)
        finally:
            self.widget.blockSignals(wasBlocked)
            self.syncing = False

    def remember(self):
        """Add the widget's path to its history (saved under its ``settingKey``); False if empty."""
        if not pathText(self.widget.currentPath):
            return False
        self.widget.addCurrentPathToHistory()
        return True
