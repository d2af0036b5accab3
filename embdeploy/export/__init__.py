"""The export stage: base model to ONNX once (cached), then a graph rewrite per extension, then validation.

    from embdeploy.export import export_extension, export_base, verify_dir, load_recipe
    from embdeploy.export.validate import validate, validate_dir

Names are imported lazily so `import embdeploy.export` stays cheap for the CLI.
(`validate` itself is not re-exported here: it would shadow the `validate` module.)
"""

_LAZY = {
    "export_base": "embdeploy.export.base",
    "cache_root": "embdeploy.export.base",
    "export_extension": "embdeploy.export.extension",
    "ExportResult": "embdeploy.export.extension",
    "EXPORT_MODES": "embdeploy.export.extension",
    "verify_dir": "embdeploy.export.manifest",
    "read_manifest": "embdeploy.export.manifest",
    "validate_dir": "embdeploy.export.validate",
    "ValidationReport": "embdeploy.export.validate",
    "TOLERANCES": "embdeploy.export.validate",
    "load_recipe": "embdeploy.export.recipe",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'embdeploy.export' has no attribute {name!r}")
