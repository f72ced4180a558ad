"""kube-scheduler's extender protocol (``k8s.io/kube-scheduler/extender/v1``), typed once.

The Go structs carry no json tags, so ``encoding/json`` writes their field names as they
are: ``Pod``, ``Nodes``, ``NodeNames``, ``FailedNodes``, ``FailedAndUnresolvableNodes``,
``Error``, ``Host``, ``Score``. Nil pointers are written as ``null``. The structs below
mirror them field for field; msgspec encodes and decodes them.

Request (``POST <urlPrefix>/filter`` and ``/prioritize``)::

    {"Pod": {...v1.Pod...}, "Nodes": {"metadata": {}, "items": [...v1.Node...]} | null,
     "NodeNames": ["n1", ...] | null}

``NodeNames`` is sent when the extender is configured ``nodeCacheCapable: true``, full
``Nodes`` otherwise. Node objects are kept as raw JSON (:class:`msgspec.Raw`): only their
names are read, and those that pass the filter are copied back byte for byte, which is
what kube-scheduler uses as the filtered nodes in that mode.

Filter response: :class:`ExtenderFilterResult`; kube-scheduler reads ``NodeNames`` when
configured nodeCacheCapable and ``Nodes`` otherwise, so the answer comes in the form the
request used. Prioritize response: a bare JSON array of :class:`HostPriority`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgspec

from powercap.objects import shape_problems


class WireError(ValueError):
    """A request body that is not a valid ExtenderArgs; the message says what is wrong."""


class NodeList(msgspec.Struct):
    """v1.NodeList with its items kept as raw JSON."""

    metadata: dict[str, Any] = {}
    items: list[msgspec.Raw] | None = None


class ExtenderArgs(msgspec.Struct):
    Pod: dict[str, Any] | None = None
    Nodes: NodeList | None = None
    NodeNames: list[str] | None = None


class ExtenderFilterResult(msgspec.Struct):
    Nodes: NodeList | None = None
    NodeNames: list[str] | None = None
    FailedNodes: dict[str, str] = {}
    FailedAndUnresolvableNodes: dict[str, str] = {}
    Error: str = ""


class HostPriority(msgspec.Struct):
    Host: str
    Score: int


HostPriorityList = list[HostPriority]


class _NodeMetadata(msgspec.Struct):
    name: str


class _NodeName(msgspec.Struct):
    metadata: _NodeMetadata


_ARGS_DECODER = msgspec.json.Decoder(ExtenderArgs)
_NODE_NAME_DECODER = msgspec.json.Decoder(_NodeName)
_ENCODER = msgspec.json.Encoder()


class Candidates:
    """The candidate nodes of a request: their names, in order, and (in Nodes mode) raw objects."""

    __slots__ = ("names", "_raw_by_name")

    def __init__(self, names: list[str], raw_by_name: dict[str, msgspec.Raw] | None) -> None:
        self.names = names
        self._raw_by_name = raw_by_name

    @property
    def full_nodes(self) -> bool:
        """True when the request carried full Node objects (``nodeCacheCapable: false``)."""
        return self._raw_by_name is not None

    def node_list(self, names: Iterable[str]) -> NodeList:
        """The Node objects named, exactly as received, as a NodeList."""
        assert self._raw_by_name is not None
        raw = self._raw_by_name
        return NodeList(metadata={}, items=[raw[name] for name in names])


def decode_args(body: bytes) -> tuple[ExtenderArgs, Candidates]:
    """Decode an ExtenderArgs body; raises :class:`WireError` naming the first problem.

    A Pod is required, and one of ``NodeNames`` or ``Nodes`` (``NodeNames`` wins when both
    are set); every Node must have ``metadata.name``.
    """
    try:
        args = _ARGS_DECODER.decode(body)
    except msgspec.ValidationError as error:
        raise WireError(f"not an ExtenderArgs object: {error}") from None
    except msgspec.DecodeError as error:
        raise WireError(f"request body is not JSON: {error}") from None
    if args.Pod is None:
        raise WireError("Pod is required")
    problems = shape_problems(args.Pod)
    if problems:
        raise WireError("; ".join(f"Pod.{problem}" for problem in problems))
    if args.NodeNames is not None:
        return args, Candidates(list(args.NodeNames), None)
    if args.Nodes is None:
        raise WireError("one of NodeNames or Nodes is required")
    names: list[str] = []
    raw_by_name: dict[str, msgspec.Raw] = {}
    for index, raw in enumerate(args.Nodes.items or ()):
        name = _leading_name(raw)
        if name is None:
            try:
                name = _NODE_NAME_DECODER.decode(raw).metadata.name
            except msgspec.ValidationError as error:
                raise WireError(f"Nodes.items[{index}]: {error}".replace("at `$.", "at `")) from None
        names.append(name)
        raw_by_name[name] = raw
    return args, Candidates(names, raw_by_name)


_GO_NODE_PREFIX = b'{"metadata":{"name":"'


def _leading_name(raw: msgspec.Raw) -> str | None:
    """The Node's name when its JSON starts the way Go's encoding/json writes a v1.Node from
    kube-scheduler's cache (no kind/apiVersion, then metadata, whose first field is name):
    ``{"metadata":{"name":"gpu-1",...``. None when it does not (then it is decoded)."""
    data = memoryview(raw)
    if data[: len(_GO_NODE_PREFIX)] != _GO_NODE_PREFIX:
        return None
    end = bytes(data[len(_GO_NODE_PREFIX): len(_GO_NODE_PREFIX) + 512]).find(b'"')
    if end <= 0:
        return None
    name = bytes(data[len(_GO_NODE_PREFIX): len(_GO_NODE_PREFIX) + end])
    if b"\\" in name:
        return None  # an escape: let the decoder read it
    return name.decode("utf-8")


def encode_filter_result(
    candidates: Candidates,
    passed: Sequence[str],
    failed: Mapping[str, str],
    unresolvable: Mapping[str, str],
) -> bytes:
    """The filter answer, in the form the request used (``NodeNames`` or ``Nodes``)."""
    result = ExtenderFilterResult(
        FailedNodes=dict(failed),
        FailedAndUnresolvableNodes=dict(unresolvable),
    )
    if candidates.full_nodes:
        result.Nodes = candidates.node_list(passed)
    else:
        result.NodeNames = list(passed)
    return _ENCODER.encode(result)


def encode_filter_error(message: str) -> bytes:
    """A filter answer that fails the scheduling attempt with ``message`` (the ``Error`` field)."""
    return _ENCODER.encode(ExtenderFilterResult(Error=message))


def encode_error_body(message: str) -> bytes:
    """``{"Error": message}``: the body of an answer that is not 200."""
    return _ENCODER.encode({"Error": message})


def encode_priorities(scores: Iterable[tuple[str, int]]) -> bytes:
    """A HostPriorityList: ``[{"Host": "n1", "Score": 7}, ...]``."""
    return _ENCODER.encode([HostPriority(Host=host, Score=score) for host, score in scores])


def decode_filter_result(body: bytes) -> ExtenderFilterResult:
    """For tests and tools: read a filter answer back."""
    return msgspec.json.decode(body, type=ExtenderFilterResult)
