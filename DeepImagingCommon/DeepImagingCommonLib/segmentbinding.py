"""Keeps a segment selector widget and two parameter-node fields in sync.

``@parameterNodeWrapper`` has no connector for ``qMRMLSegmentSelectorWidget`` (a segmentation
node *and* a segment ID), so every module with a segment selector needs this two-way sync.
Qt-free (it only calls the widget's methods), so it is tested headless with a stand-in widget.
"""


class SegmentSelectorBinding:
    """Two-way sync between ``selector`` and ``parameterNode.<nodeField>`` / ``.<idField>``.

    Call :meth:`guiToNode` from the selector's ``currentNodeChanged``/``currentSegmentChanged``
    signals and :meth:`nodeToGui` from the parameter node's Modified observer; ``syncing`` is
    True while either runs, which stops the two directions from echoing each other.
    """

    def __init__(self, selector, nodeField="segmentationNode", idField="segmentId"):
        self.selector = selector
        self.nodeField = nodeField
        self.idField = idField
        self.syncing = False

    def guiToNode(self, parameterNode):
        """Copy the selector's choice into the parameter node; False if nothing was done."""
        if parameterNode is None or self.syncing:
            return False
        node = self.selector.currentNode()
        segmentId = self.selector.currentSegmentID() or ""
        self.syncing = True
        try:
            if getattr(parameterNode, self.nodeField) != node:
                setattr(parameterNode, self.nodeField, node)
            if getattr(parameterNode, self.idField) != segmentId:
                setattr(parameterNode, self.idField, segmentId)
        finally:
            self.syncing = False
        return True

    def nodeToGui(self, parameterNode):
        """Show the parameter node's segment in the selector without echoing back.

        A segment ID the (new) segmentation lacks is replaced by what the selector shows.
        """
        if parameterNode is None or self.syncing:
            return
        self.syncing = True
        wasBlocked = self.selector.blockSignals(True)
        try:
            node = getattr(parameterNode, self.nodeField)
            if self.selector.currentNode() != node:
                self.selector.setCurrentNode(node)
            wantedId = getattr(parameterNode, self.idField)
            if wantedId and self.selector.currentSegmentID() != wantedId:
                self.selector.setCurrentSegmentID(wantedId)
            shownId = self.selector.currentSegmentID() or ""
            if getattr(parameterNode, self.idField) != shownId:
                setattr(parameterNode, self.idField, shownId)
        finally:
            self.selector.blockSignals(wasBlocked)
            self.syncing = False
