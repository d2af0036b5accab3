"""embdeploy: new vocabulary for pretrained transformers models, shipped to ONNX Runtime.

The library API lives in the stage modules; the names most users need are
re-exported here lazily so `import embdeploy` stays cheap for the CLI.
"""

__version__ = "0.1.0"

_LAZY = {
    "Extension": "embdeploy.extend.model",
    "ExtensionConfig": "embdeploy.extend.config",
    "ExtendedEmbedding": "embdeploy.extend.layer",
    "ExtendedLMHead": "embdeploy.extend.layer",
    "extend_model": "embdeploy.extend.model",
    "load_extension": "embdeploy.extend.model",
    "load_base": "embdeploy.extend.model",
    "merge_extension": "embdeploy.extend.merge",
    "EmbdeployError": "embdeploy.errors",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'embdeploy' has no attribute {name!r}")
