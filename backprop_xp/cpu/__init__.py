"""The CPU's own speed-ups, beside the generic ``xp`` code (the ``[fast]`` extra): Numba loops and the step that uses them.

* ``numba_loops.py``: the compiled loops, each doing what several NumPy passes do, and their thread settings;
* ``fused_cpu_step.py``: ``FusedCpuStep``, ``MLP.backprop`` + the optimizer's update in those loops;
* ``hidden_major.py``: its ReLU lines with the hidden layer stored ``(H, B)``, for batches up to 1024;
* ``blas_pool.py``: NumPy's OpenBLAS running its jobs on the loops' threads, so that on several threads
  the products and the loops share one pool.

The twin of ``cuda/``. ``step.make_step`` is the one place that chooses it.
"""
