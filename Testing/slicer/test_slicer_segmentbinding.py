"""The segment selector <-> parameter node sync the module widgets share, with a stand-in selector."""

from types import SimpleNamespace

from DeepImagingCommonLib.segmentbinding import SegmentSelectorBinding


class FakeSelector:
    """Mimics qMRMLSegmentSelectorWidget: a node, its segment IDs, signals that can be blocked."""

    def __init__(self, segmentsByNode):
        self.segmentsByNode = segmentsByNode
        self.node, self.segmentId, self.blocked, self.emitted = None, "", False, 0

    def currentNode(self):
        return self.node

    def currentSegmentID(self):
        return self.segmentId

    def setCurrentNode(self, node):
        self.node = node
        ids = self.segmentsByNode.get(node, [])
        self.segmentId = ids[0] if ids else ""
        self.emitted += not self.blocked

    def setCurrentSegmentID(self, segmentId):
        if segmentId in self.segmentsByNode.get(self.node, []):
            self.segmentId = segmentId
            self.emitted += not self.blocked

    def blockSignals(self, blocked):
        was, self.blocked = self.blocked, blocked
        return was


def test_gui_choice_reaches_parameter_node():
    selector = FakeSelector({"segA": ["s1", "s2"]})
    binding = SegmentSelectorBinding(selector)
    node = SimpleNamespace(segmentationNode=None, segmentId="")
    assert not binding.guiToNode(None)
    selector.setCurrentNode("segA")
    selector.setCurrentSegmentID("s2")
    assert binding.guiToNode(node)
    assert (node.segmentationNode, node.segmentId) == ("segA", "s2")


def test_parameter_node_shown_without_echo_and_stale_id_replaced():
    selector = FakeSelector({"segA": ["s1", "s2"], "segB": ["t1"]})
    binding = SegmentSelectorBinding(selector)
    node = SimpleNamespace(segmentationNode="segA", segmentId="s2")
    binding.nodeToGui(node)
    assert (selector.node, selector.segmentId) == ("segA", "s2")
    assert selector.emitted == 0 and not selector.blocked  # signals were blocked, then restored
    node.segmentationNode = "segB"  # the old segment ID does not exist there
    binding.nodeToGui(node)
    assert (selector.node, node.segmentId) == ("segB", "t1")
    assert not binding.syncing


def test_custom_field_names_and_reentrancy_guard():
    selector = FakeSelector({"segA": ["s1"]})
    binding = SegmentSelectorBinding(selector, nodeField="maskNode", idField="maskSegment")
    node = SimpleNamespace(maskNode="segA", maskSegment="s1")
    binding.syncing = True
    binding.nodeToGui(node)
    assert selector.node is None and not binding.guiToNode(node)
    binding.syncing = False
    binding.nodeToGui(node)
    assert selector.node == "segA"
