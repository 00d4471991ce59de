"""Every private megatron-core name megatron_rpg relies on (megatron/compat.py's INTERNALS) exists
in the installed megatron-core; a missing one is reported with its module and name.

The checker itself is tested on fake missing names of each kind, so an empty report means the
names were found, not that the checker cannot see a missing one."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from megatron_rpg.megatron.compat import INTERNALS, Internal, missing_internals

REPO = Path(__file__).resolve().parents[2]
COMPAT = REPO / "megatron_rpg" / "megatron" / "compat.py"


@pytest.mark.parametrize("internal", INTERNALS, ids=lambda internal: f"{internal.module}:{internal.name}")
def test_each_megatron_internal_exists_in_the_installed_megatron_core(internal):
    assert missing_internals([internal]) == []


@pytest.mark.parametrize("fake, named", [
    (Internal("megatron.core.optimizer.grad_scaler", "DynamicGradScaler._no_such_tracker", "field", "x"),
     "_no_such_tracker"),
    (Internal("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer._no_such_method",
              "attribute", "x"), "_no_such_method"),
    (Internal("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.no_such_key", "key", "x"),
     "no_such_key"),
    (Internal("megatron.core.optimizer.distrib_optimizer", "NoSuchOptimizer.gbuf_ranges", "field", "x"),
     "NoSuchOptimizer"),
    (Internal("megatron.core.no_such_module", "anything", "attribute", "x"), "megatron.core.no_such_module"),
])
def test_a_missing_internal_is_reported_with_its_module_and_name(fake, named):
    (message,) = missing_internals([fake])
    assert fake.module in message and fake.name in message and named in message, message


def test_a_missing_name_among_present_ones_is_the_only_one_reported():
    fake = Internal("megatron.core.tensor_parallel.random", "_no_such_rng_function", "attribute", "x")
    messages = missing_internals(list(INTERNALS[:3]) + [fake] + list(INTERNALS[3:6]))
    assert len(messages) == 1 and "_no_such_rng_function" in messages[0], messages


def test_every_compat_function_named_by_an_internal_exists():
    """`why` names the compat function that uses the internal: it must be one of compat's own."""
    tree = ast.parse(COMPAT.read_text(encoding="utf-8"))
    functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert {internal.why for internal in INTERNALS} <= functions


def test_the_package_reaches_megatron_privates_only_through_compat():
    """No `._name` access or `_name` import of a megatron object outside compat.py: each would
    bypass the upgrade check above. (Our own privates: self._x, module-level _x, are fine.)"""
    from megatron_rpg.megatron import compat

    private_names = {internal.name.split(".")[-1] for internal in INTERNALS
                     if internal.name.split(".")[-1].startswith("_")}
    assert "_hysteresis_tracker" in private_names  # the set is not vacuous
    offenders = []
    for path in sorted((REPO / "megatron_rpg").rglob("*.py")):
        if path.resolve() == Path(compat.__file__).resolve():
            continue
        source = path.read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Attribute) and node.attr in private_names:
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno} .{node.attr}")
    assert offenders == []
