"""Runtimes that `owlctl bench` measures: PyTorch (torch.py) and onnxruntime (onnxruntime.py)."""
