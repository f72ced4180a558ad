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

Limits, checked before anything is decoded into Python objects (a body is first read as
three raw JSON values, ``Pod``, ``Nodes`` and ``NodeNames``, which builds no object):

- ``Pod``: at most :data:`MAX_POD_BYTES` of JSON and the shape :data:`POD_LIMITS`
  (nesting depth, entries per array or object, values; :mod:`powercap.runtime.jsonlimits`);
- ``NodeNames`` and ``Nodes.items``: at most :data:`MAX_CANDIDATES` entries. Node objects
  stay raw JSON: the names are counted from the commas (a name cannot hold one), and the
  items, when their commas alone do not show that the raw objects' bookkeeping stays
  smaller than twice their JSON, by a first pass that counts them and stops at the limit;
- the whole body nests at most about a thousand levels (msgspec's recursion limit);
- the Pod's GPU requests and limits (``nvidia.com/gpu``) are whole numbers from 0 to
  :data:`MAX_GPUS`, as a Kubernetes quantity (``"2"``, ``"2000m"``, ``"1k"``, ``"1e1"``) or a
  JSON number; they are handed on as ints. Anything else (``"²"``, ``"0.5"``, ``"-1"``,
  5 000 digits, ``"1e400"``) is a :class:`WireError` naming the field.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

import msgspec

from powercap.objects import GPU_RESOURCE, shape_problems
from powercap.runtime.jsonlimits import JsonLimitExceeded, JsonLimits, check_json_limits

# A Pod is at most 1.5 MB in etcd; kube-scheduler sends it as stored.
MAX_POD_BYTES = 4 * 1024 * 1024
POD_LIMITS = JsonLimits(max_depth=64, max_items=10_000, max_values=200_000)
# Candidate nodes per call: kube-scheduler sends at most every node of the cluster
# (Kubernetes is tested to 5 000 nodes; the largest managed clusters have 65 000).
MAX_CANDIDATES = 100_000
MAX_GPUS = 1_000_000
# bytes of bookkeeping per msgspec.Raw in a list (the object and its pointer)
_RAW_ITEM_BYTES = 56


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


_NULL = msgspec.Raw(b"null")


class _RawArgs(msgspec.Struct):
    Pod: msgspec.Raw = _NULL
    Nodes: msgspec.Raw = _NULL
    NodeNames: msgspec.Raw = _NULL


_counting = threading.local()


class _CountedItem(msgspec.Struct):
    """A Node counted by the first pass over ``Nodes.items``; stops the pass past the limit."""

    def __post_init__(self) -> None:
        _counting.items += 1
        if _counting.items > MAX_CANDIDATES:
            raise ValueError(f"more than {MAX_CANDIDATES} entries (the limit)")


class _CountedNodeList(msgspec.Struct):
    items: list[_CountedItem] | None = None


_RAW_ARGS_DECODER = msgspec.json.Decoder(_RawArgs)
_POD_DECODER = msgspec.json.Decoder(dict[str, Any])
_NODE_NAMES_DECODER = msgspec.json.Decoder(list[str])
_NODE_LIST_DECODER = msgspec.json.Decoder(NodeList)
_COUNTED_NODE_LIST_DECODER = msgspec.json.Decoder(_CountedNodeList)
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
    are set); every Node must have ``metadata.name``. The limits of the module docstring
    are checked before each part is decoded.
    """
    raw = _decode(_RAW_ARGS_DECODER, body, "")
    if _is_null(raw.Pod):
        raise WireError("Pod is required")
    pod = decode_pod(raw.Pod)
    if not _is_null(raw.NodeNames):
        if bytes(raw.NodeNames).count(b",") + 1 > MAX_CANDIDATES:
            raise WireError(f"NodeNames: more than {MAX_CANDIDATES} names (the limit)")
        node_names: list[str] = _decode(_NODE_NAMES_DECODER, raw.NodeNames, "NodeNames")
        return ExtenderArgs(Pod=pod, NodeNames=node_names), Candidates(list(node_names), None)
    if _is_null(raw.Nodes):
        raise WireError("one of NodeNames or Nodes is required")
    nodes = decode_node_list(raw.Nodes, commas_at_most=body.count(b","))
    names: list[str] = []
    raw_by_name: dict[str, msgspec.Raw] = {}
    for index, item in enumerate(nodes.items or ()):
        name = _leading_name(item)
        if name is None:
            try:
                name = _NODE_NAME_DECODER.decode(item).metadata.name
            except msgspec.ValidationError as error:
                raise WireError(f"Nodes.items[{index}]: {error}".replace("at `$.", "at `")) from None
            except RecursionError:
                raise WireError(f"Nodes.items[{index}]: nested too deeply to read") from None
        names.append(name)
        raw_by_name[name] = item
    return ExtenderArgs(Pod=pod, Nodes=nodes), Candidates(names, raw_by_name)


def _is_null(raw: msgspec.Raw) -> bool:
    return len(raw) == 4 and bytes(raw) == b"null"


def _decode(decoder: msgspec.json.Decoder[Any], data: Any, where: str) -> Any:
    """``decoder.decode(data)``, its errors as :class:`WireError`; ``where`` is the field
    ``data`` was read from (``"NodeNames"``), for the paths in the messages."""
    try:
        return decoder.decode(data)
    except msgspec.ValidationError as error:
        text = str(error)
        if where:
            text = text.replace("`$", f"`$.{where}") if "`$" in text else f"{text} - at `$.{where}`"
        raise WireError(f"not an ExtenderArgs object: {text}") from None
    except msgspec.DecodeError as error:
        raise WireError(f"request body is not JSON: {error}") from None
    except RecursionError:
        raise WireError("request body is nested too deeply to read (about a thousand levels)") from None


def decode_pod(raw: msgspec.Raw | bytes) -> dict[str, Any]:
    """The Pod of a request, within :data:`MAX_POD_BYTES` and :data:`POD_LIMITS`, its shape
    checked and its GPU quantities made ints."""
    if len(raw) > MAX_POD_BYTES:
        raise WireError(f"Pod: larger than {MAX_POD_BYTES} bytes of JSON (the limit)")
    try:
        check_json_limits(memoryview(raw), POD_LIMITS, "Pod")
    except JsonLimitExceeded as exceeded:
        raise WireError(str(exceeded)) from None
    pod = _decode(_POD_DECODER, raw, "Pod")
    problems = shape_problems(pod)
    if problems:
        raise WireError("; ".join(f"Pod.{problem}" for problem in problems))
    normalise_gpu_quantities(pod)
    return pod


def decode_node_list(raw: msgspec.Raw | bytes, commas_at_most: int) -> NodeList:
    """``Nodes`` with its items as raw JSON, at most :data:`MAX_CANDIDATES` of them.

    ``commas_at_most`` bounds the commas in ``raw`` (those of the whole body: counting
    them in ``raw`` would copy it); there are at most that many items plus one.
    """
    data = memoryview(raw)
    if _RAW_ITEM_BYTES * (commas_at_most + 1) > 2 * len(data):
        # items may be small enough for their raw objects to outweigh the JSON: count first
        _counting.items = 0
        try:
            _decode(_COUNTED_NODE_LIST_DECODER, data, "Nodes")
        except WireError:
            if _counting.items > MAX_CANDIDATES:
                raise WireError(f"Nodes.items: more than {MAX_CANDIDATES} nodes (the limit)") from None
            raise
    nodes: NodeList = _decode(_NODE_LIST_DECODER, raw, "Nodes")
    if nodes.items is not None and len(nodes.items) > MAX_CANDIDATES:
        raise WireError(f"Nodes.items: more than {MAX_CANDIDATES} nodes (the limit)")
    return nodes


_QUANTITY = re.compile(
    r"(?P<number>[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?[0-9]+)?",
    re.ASCII,
)
_SUFFIXES = {
    "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": Decimal(1),
    "k": Decimal("1e3"), "M": Decimal("1e6"), "G": Decimal("1e9"), "T": Decimal("1e12"),
    "P": Decimal("1e15"), "E": Decimal("1e18"),
    "Ki": Decimal(2**10), "Mi": Decimal(2**20), "Gi": Decimal(2**30), "Ti": Decimal(2**40),
    "Pi": Decimal(2**50), "Ei": Decimal(2**60),
}
_MAX_QUANTITY_CHARS = 64


def gpu_count(value: Any) -> int:
    """A GPU request or limit as an int; ``ValueError`` saying why it is not a whole number
    of GPUs from 0 to :data:`MAX_GPUS` (module docstring)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError("must be a quantity such as \"2\"")
    if isinstance(value, str):
        text = value.strip()
        match = _QUANTITY.fullmatch(text) if len(text) <= _MAX_QUANTITY_CHARS else None
        if match is None:
            raise ValueError("is not a Kubernetes quantity such as \"2\"")
        suffix = match["suffix"] or ""
        try:
            number = Decimal(match["number"])
            if suffix not in _SUFFIXES:  # an exponent, e3 or E-2
                exponent = int(suffix[1:])
                if abs(exponent) > _MAX_QUANTITY_CHARS:
                    raise ValueError(f"is not a whole number of GPUs from 0 to {MAX_GPUS}")
                amount = number.scaleb(exponent)
            else:
                amount = number * _SUFFIXES[suffix]
        except InvalidOperation:
            raise ValueError("is not a Kubernetes quantity such as \"2\"") from None
    else:
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("is not a finite number")
        amount = Decimal(value)
    if amount < 0:
        raise ValueError("must not be negative")
    if amount > MAX_GPUS:
        raise ValueError(f"is more than {MAX_GPUS} GPUs")
    if amount != amount.to_integral_value():
        raise ValueError("is not a whole number of GPUs")
    return int(amount)


def normalise_gpu_quantities(pod: dict[str, Any]) -> None:
    """Replace each container's ``nvidia.com/gpu`` request and limit by its int value;
    :class:`WireError` naming the first that is not a whole number of GPUs."""
    spec = pod.get("spec") or {}
    for field in ("containers", "initContainers"):
        for index, container in enumerate(spec.get(field) or ()):
            resources = container.get("resources") if isinstance(container, dict) else None
            if not isinstance(resources, dict):
                continue
            for section in ("limits", "requests"):
                quantities = resources.get(section)
                if not isinstance(quantities, dict) or GPU_RESOURCE not in quantities:
                    continue
                value = quantities[GPU_RESOURCE]
                try:
                    quantities[GPU_RESOURCE] = gpu_count(value)
                except ValueError as problem:
                    shown = msgspec.json.encode(value).decode()
                    shown = shown if len(shown) <= 40 else shown[:37] + "..."
                    raise WireError(f"Pod.spec.{field}[{index}].resources.{section}[{GPU_RESOURCE}]: {shown} {problem}") from None


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
