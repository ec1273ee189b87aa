"""The GPU's own speed-ups, beside the generic ``xp`` code: fused CUDA kernels, cuBLAS on a handle of our own, and
the training step that uses both as a CUDA graph.

* ``activations.py``/``loss.py``: the CUDA sources and their CuPy wrappers, each with a NumPy twin;
* ``cublas.py``: the step's matrix products through nvmath-python's cuBLAS bindings;
* ``step.py``: ``make_gpu_step``, the fused, graph-captured form of ``MLP.backprop`` + ``SGD.step``.

Nothing here is imported by ``import backprop_xp``; ``training.step.make_step`` imports ``step.py`` for CuPy models.
"""
