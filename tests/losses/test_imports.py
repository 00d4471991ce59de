"""The algorithms layer is pure tensor math: importing megatron_rpg.losses, its verify command and
megatron_rpg.rewards.dapo loads no `megatron.*` module (checked in a fresh interpreter, so nothing
another test imported can hide or fake it)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROBE = """
import importlib, importlib.util, json, sys
importlib.import_module(sys.argv[1])
loaded = sorted(m for m in sys.modules if m == "megatron" or m.startswith("megatron."))
print(json.dumps({"megatron_installed": importlib.util.find_spec("megatron") is not None, "loaded": loaded}))
"""


@pytest.mark.parametrize("module", ["megatron_rpg.losses", "megatron_rpg.losses.verify", "megatron_rpg.rewards.dapo"])
def test_importing_the_pure_math_modules_loads_no_megatron_module(module):
    result = subprocess.run([sys.executable, "-c", PROBE, module], cwd=REPO, capture_output=True, text=True,
                            timeout=120, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    # megatron-core is installed in this environment, so its absence from sys.modules means something
    assert report["megatron_installed"], "megatron-core is not importable here; the check would be vacuous"
    assert report["loaded"] == []
