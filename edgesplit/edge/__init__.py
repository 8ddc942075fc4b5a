"""The torch-free edge runtime: onnxruntime + codecs + wire + transport.

Nothing here imports torch or onnx (the import-linter contract in setup.cfg); ``pip install
edgesplit`` without extras is enough to run it.
"""
