"""Export recipes: declarative JSON files holding `embdeploy export` arguments.

    {"recipe_version": 1, "name": "minilm-swap-cpu", "description": "...",
     "mode": "swap", "dtype": "fp32", "backend": "torch", "provider": "cpu", "validate": true}

`load_recipe` returns only the export arguments (mode, dtype, backend,
provider, quantize, validate, base_onnx, calibration_texts, out), ready for `export_extension(ext, **args)`;
a relative `base_onnx` or `calibration_texts` is resolved against the recipe's folder (they ship with
the recipe), a relative `out` against the working directory (like --out). Unknown keys
and bad values are refused, all listed at once.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import EmbdeployError, raise_all
from ..jsonfile import read_json
from .base import BACKENDS
from .extension import EXPORT_MODES
from .validate import PROVIDERS

RECIPE_VERSION = 1
_CHOICES = {"mode": EXPORT_MODES, "dtype": ("fp32", "fp16"), "backend": BACKENDS, "provider": tuple(PROVIDERS),
            "quantize": ("int8",)}
_META = ("recipe_version", "name", "description")
_ARGS = (*_CHOICES, "validate", "base_onnx", "calibration_texts", "out")


def load_recipe(path) -> dict:
    """Read and check a recipe; return its export arguments."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise EmbdeployError(f"recipe {p} does not exist; pass a JSON file like export/minilm-merged-cpu.json")
    data = read_json(p, "fix the recipe (a JSON object of export arguments)")
    if not isinstance(data, dict):
        raise EmbdeployError(f"recipe {p} must hold a JSON object of export arguments")
    problems = []
    unknown = sorted(set(data) - set(_META) - set(_ARGS))
    if unknown:
        problems.append(f"unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(_META + _ARGS)}")
    if data.get("recipe_version", RECIPE_VERSION) != RECIPE_VERSION:
        problems.append(f"recipe_version is {data.get('recipe_version')!r}; this embdeploy reads version {RECIPE_VERSION}")
    if "mode" not in data:
        problems.append(f"mode is required ({', '.join(EXPORT_MODES)})")
    for key, choices in _CHOICES.items():
        if key in data and data[key] not in choices:
            problems.append(f"{key} is {data[key]!r}; choose one of {', '.join(choices)}")
    if "validate" in data and not isinstance(data["validate"], bool):
        problems.append(f"validate is {data['validate']!r}; use true or false")
    for key in ("name", "description", "base_onnx", "calibration_texts", "out"):
        if key in data and not isinstance(data[key], str):
            problems.append(f"{key} must be a string")
    raise_all(problems, f"recipe {p} has problems:")
    args = {k: data[k] for k in _ARGS if k in data}
    for key in ("base_onnx", "calibration_texts"):  # relative to the recipe
        if key in args:
            path = Path(args[key]).expanduser()
            args[key] = str(path if path.is_absolute() else (p.parent / path).resolve())
    return args
