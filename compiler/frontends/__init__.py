"""Model importers: QONNX/ONNX and PyTorch/Brevitas -> IR, and IR -> QONNX export."""
