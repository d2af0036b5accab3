"""ONNX side of embdeploy: the graph rewrite that attaches an extension, and model file I/O."""
