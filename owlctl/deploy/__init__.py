"""Deployment: running pruned models fast and shipping them.

    onnx.py        ONNX export (with or without KV cache) and its onnxruntime check
    kernels/       owlctl's sparse CPU kernels (a real C file, built and verified at first use)
    runtimes/      PyTorch (dense and sparse kernels) and onnxruntime as bench runtimes
    measure.py     timing runs, summaries and the logits check of a bench row
    trust.py       refusing code from places other users can write to
    eol/           DeepSparse, end of life since June 2025: its own venv, a worker, a bench row
"""
