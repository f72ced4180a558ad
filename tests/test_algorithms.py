"""The placement-algorithm registry: built-ins, plugins through entry points, broken plugins."""

from __future__ import annotations

from importlib.metadata import EntryPoint

import pytest

from powercap.algorithms import ENTRY_POINT_GROUP, AlgorithmRegistry, PlacementAlgorithm
from powercap.policies import validate_policy


class CarbonAware(PlacementAlgorithm):
    """Test plugin: prefer racks fed by low-carbon power."""

    name = "carbon-aware"
    parameters_schema = {
        "type": "object",
        "properties": {"gramsPerKwh": {"type": "number", "minimum": 0}},
        "additionalProperties": False,
    }


def entry_point(name: str, value: str) -> EntryPoint:
    return EntryPoint(name=name, value=value, group=ENTRY_POINT_GROUP)


def test_built_ins_are_registered_with_documented_semantics() -> None:
    registry = AlgorithmRegistry.default(discover=lambda: [])
    assert registry.names() == ["energy-aware-scheduling", "headroom", "thermal-aware"]
    for algorithm in registry:
        assert algorithm.__doc__ and len(algorithm.__doc__.split()) > 10
        assert algorithm.parameters_schema["type"] == "object"


def test_third_party_algorithm_registers_and_its_schema_is_enforced() -> None:
    registry = AlgorithmRegistry.default(discover=lambda: [entry_point("carbon-aware", f"{__name__}:CarbonAware")])
    assert "carbon-aware" in registry
    document = {
        "apiVersion": "powercapping.example.com/v1alpha1", "kind": "PowerCappingPolicy",
        "metadata": {"name": "p"},
        "spec": {"powerCapLimit": 1000, "customAlgorithm": {"name": "carbon-aware", "parameters": {"gramsPerKwh": -1, "x": 1}}},
    }
    messages = [str(p) for p in validate_policy(document, registry).errors]
    assert messages == [
        "spec.customAlgorithm.parameters.gramsPerKwh: must be at least 0",
        "spec.customAlgorithm.parameters.x: unknown parameter; allowed: gramsPerKwh",
    ]


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("no_such_module:Thing", id="import-error"),
        pytest.param(f"{__name__}:entry_point", id="not-an-algorithm"),
    ],
)
def test_a_broken_plugin_is_skipped_and_logged(value: str, caplog: pytest.LogCaptureFixture) -> None:
    registry = AlgorithmRegistry.default(discover=lambda: [entry_point("broken", value)])
    assert "broken" not in registry
    assert registry.names() == ["energy-aware-scheduling", "headroom", "thermal-aware"]
    assert "skipping placement algorithm plugin" in caplog.text


def test_energy_aware_defaults_migration_interval() -> None:
    algorithm = AlgorithmRegistry.default(discover=lambda: []).get("energy-aware-scheduling")
    assert algorithm is not None
    assert algorithm.effective_parameters({"energyThreshold": 500}) == {"energyThreshold": 500, "migrationInterval": 300}
    assert algorithm.effective_parameters({"energyThreshold": 500, "migrationInterval": 60})["migrationInterval"] == 60
