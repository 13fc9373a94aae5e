"""What `import hf_vitseg` costs: no optional or data-only dependency, and the Auto classes registered."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Optional extras (peft, onnx, plots) and the data stack: a user who only wants the model must not pay for them.
# hf_vitseg.data too: the loaders are for training, and they import `datasets`.
HEAVY = ["datasets", "peft", "onnx", "onnxruntime", "matplotlib", "hf_vitseg.data"]

# One fresh interpreter (importing torch takes seconds): the heavy modules loaded after `import hf_vitseg`, then
# what the Auto classes resolve "vitseg" to, then the heavy modules loaded after building and running a model.
PROBE = f"""
import json, sys
heavy = lambda: sorted(m for m in {HEAVY!r} if m in sys.modules)
report = {{}}
import hf_vitseg
report["after_import"] = heavy()
from transformers import AutoConfig, AutoModelForSemanticSegmentation
config = AutoConfig.for_model("vitseg")
report["auto_config"] = type(config) is hf_vitseg.ViTSegConfig
model_class = AutoModelForSemanticSegmentation._model_mapping[type(config)]
report["auto_model"] = model_class is hf_vitseg.ViTSegForSemanticSegmentation
report["auto_classes_for_remote_code"] = [
    hf_vitseg.ViTSegConfig._auto_class, hf_vitseg.ViTSegForSemanticSegmentation._auto_class,
    hf_vitseg.ViTSegImageProcessor._auto_class,
]
import numpy as np, torch
from transformers import ViTConfig
backbone = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                     patch_size=8)
model = hf_vitseg.ViTSegForSemanticSegmentation(hf_vitseg.ViTSegConfig(backbone_config=backbone, num_labels=2))
inputs = hf_vitseg.ViTSegImageProcessor(patch_size=8)(np.zeros((32, 32, 3), np.uint8), return_tensors="pt")
model(**inputs)
report["after_model"] = heavy()
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def fresh_process() -> dict:
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_import_hf_vitseg_imports_no_heavy_optional_dependency(fresh_process):
    assert fresh_process["after_import"] == []


def test_building_and_running_a_model_imports_no_heavy_optional_dependency(fresh_process):
    assert fresh_process["after_model"] == []


def test_import_hf_vitseg_registers_the_auto_classes(fresh_process):
    assert fresh_process["auto_config"] and fresh_process["auto_model"]
    assert fresh_process["auto_classes_for_remote_code"] == [
        "AutoConfig", "AutoModelForSemanticSegmentation", "AutoImageProcessor"
    ]


def test_public_names_stay_importable():
    import hf_vitseg

    for name in hf_vitseg.__all__:
        assert getattr(hf_vitseg, name) is not None, name
    assert set(hf_vitseg.__all__) <= set(dir(hf_vitseg))
    # the lazy package lists the names without importing the model; each comes from hf_vitseg.modeling
    for name in set(hf_vitseg.__all__) - {"__version__"}:
        assert getattr(hf_vitseg, name) is getattr(hf_vitseg.modeling, name), name


def test_no_module_shares_its_name_with_a_function_beside_it():
    """`hf_vitseg.training.train` was a module and a function at once; `from P import name` must mean one thing."""
    import importlib
    import pkgutil
    import types

    import hf_vitseg

    packages = ["hf_vitseg"] + [m.name for m in pkgutil.walk_packages(hf_vitseg.__path__, "hf_vitseg.") if m.ispkg]
    collisions = []
    for name in packages:
        package = importlib.import_module(name)
        for sub in pkgutil.iter_modules(package.__path__):
            module = importlib.import_module(f"{name}.{sub.name}")
            # the package exports something else under the module's name, or the module defines its own name
            if not isinstance(getattr(package, sub.name), types.ModuleType):
                collisions.append(f"{name}.{sub.name} (package attribute)")
            own = getattr(module, sub.name, None)
            if own is not None and getattr(own, "__module__", None) == module.__name__:
                collisions.append(f"{name}.{sub.name}.{sub.name}")
    assert collisions == []
