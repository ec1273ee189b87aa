"""The GPU's own speed-ups, beside the generic ``xp`` code: fused CUDA kernels, cuBLAS on a handle of our own, and
the training step that uses both as a CUDA graph.

* ``output_layer.cu``, ``updates.cu``: the CUDA C (read at import); ``cuda_kernels.py``: their CuPy wrappers;
* ``cublas.py``: the step's matrix products through nvmath-python's cuBLAS bindings;
* ``fused_gpu_step.py``: ``GpuStep``, the fused, graph-captured form of ``MLP.backprop`` + the optimizer's
  ``step()`` (SGD, Adam and AdamW: ``GPU_UPDATES``).

Nothing here is imported by ``import backprop_xp``; ``step.make_step`` imports ``fused_gpu_step.py`` for CuPy models.
The kernels' NumPy twins, used by the tests only, are in ``tests/kernel_references.py``.
"""
