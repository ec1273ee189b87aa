"""NumPy's OpenBLAS runs its threads on Numba's: one pool for the products and the fused loops (issue 27).

On a machine with few cores two thread pools take the cores from each other.
OpenBLAS's workers spin for about 0.1 s after each product, so a Numba loop
split over two threads right after one waited for a scheduler tick: a parallel
update measured 4 ms instead of 0.1 (bench/NOTES.md). The fused loops therefore
ran on one thread between two-thread products, and at two threads the step lost
to XLA, whose products and elementwise work share one pool.

OpenBLAS (0.3.28 and later) lets a program run its parallel jobs itself
(``openblas_set_threads_callback_function``). ``share()`` installs a callback,
compiled by Numba, that runs the ``n`` jobs of a product on a team of ``n``
OpenMP threads (``GOMP_parallel``, what ``#pragma omp parallel`` compiles to),
taken from the pool Numba's ``omp`` layer runs its loops on: the products, the
output-layer loop, the update and the batch gather then take turns on the same
threads, and OpenBLAS's own workers stay asleep. The products are OpenBLAS's
own, split the same way: their results are bit for bit the same.

The fused step installs it for the length of each step, and ``train`` for its
epochs (their evaluations too: a product on OpenBLAS's own threads would wake its
workers, which then spin against the next steps for 0.1 s); ``sharing()`` removes
it after. Everything else in the process keeps OpenBLAS's own threads.
That matters for more than manners: OpenBLAS's LAPACK (``np.linalg.solve``,
``inv``, ``det``) hands its jobs to OpenBLAS's own workers directly, and with the
callback installed a 400 x 400 ``solve`` on two threads took 46-57 ms instead of
1.7 (its products came here, its other jobs went there: two pools again).

The conditions, else nothing changes (``share()`` returns False): Linux (GNU
OpenMP's ``libgomp``, glibc's mutex), Numba's ``omp`` threading layer (its
threads wait for the next loop in microseconds, where the ``workqueue`` layer's
sleep: about 17 µs a launch), NumPy's BLAS an OpenBLAS exporting that function
(NumPy's own wheels do), and OpenMP free to give every job a thread (neither
``OMP_THREAD_LIMIT`` below ``MAX_JOBS`` nor ``OMP_DYNAMIC`` set). While it is
installed, every threaded product of NumPy's runs there, one at a time (on this
path OpenBLAS gives each job the work buffer of its job number, so two calls at
once would share buffers: a mutex keeps them apart). Those are also the buffers
of OpenBLAS's own workers: a threaded LAPACK call made by another Python thread
during a step could share them, and is not supported.

GNU OpenMP is not fork-safe: a process forked (not spawned) after a parallel
loop ran must not start another. A forked child therefore gives OpenBLAS its own
threads back, and ``numba_loops`` runs its loops there on the calling thread. The
package's sweeps start their workers with ``spawn``, and Dask does by default.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

# The names the setter has in the OpenBLAS builds NumPy ships or links (scipy-openblas64 prefixes and suffixes).
SETTER_NAMES = (
    "scipy_openblas_set_threads_callback_function64_",
    "scipy_openblas_set_threads_callback_function",
    "openblas_set_threads_callback_function64_",
    "openblas_set_threads_callback_function",
)

_state: dict[str, Any] = {
    "setter": None, "callback": None, "installed": False, "mutex": None, "keep": None, "blocks": 0, "by_blocks": False
}  # fmt: skip
_lock = threading.RLock()  # the callback's compile, installing it, and the count of blocks sharing it


def numpy_openblas() -> ctypes.CDLL | None:
    """NumPy's OpenBLAS, opened with ctypes (None if NumPy's BLAS is another library or cannot be told apart).

    threadpoolctl lists every BLAS loaded; SciPy's wheels bring an OpenBLAS of their
    own, so the one in NumPy's wheel folder (``numpy.libs``, ``numpy/.dylibs``) wins.
    """
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    paths = [lib["filepath"] for lib in threadpool_info() if lib.get("internal_api") == "openblas"]
    numpy_dir = os.path.dirname(np.__file__)
    own = [p for p in paths if p.startswith((numpy_dir + ".libs", os.path.join(numpy_dir, ".dylibs")))]
    if own:
        paths = own
    if len(paths) != 1:  # none, or several and none of them in NumPy's wheel: which one NumPy calls is unknown
        return None
    return ctypes.CDLL(paths[0])


def _setter() -> Any:
    """OpenBLAS's ``set_threads_callback_function``, or None."""
    if _state["setter"] is None:
        lib = numpy_openblas()
        found = [getattr(lib, name) for name in SETTER_NAMES if lib is not None and hasattr(lib, name)]
        _state["setter"] = found[0] if found else False
        if found:
            found[0].argtypes, found[0].restype = [ctypes.c_void_p], None
    return _state["setter"] or None


def _c_functions() -> dict[str, Any] | None:
    """The C functions the callback calls (Linux: glibc's pthread mutex, and GNU OpenMP's team launcher).

    ``libgomp.so.1`` is the library Numba's ``omp`` layer runs on (its ``omppool``
    module links it), so a team launched here takes its threads from the same pool.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        from numba.np.ufunc import omppool  # noqa: F401 - loads libgomp, which the CDLL below then finds
    except ImportError:
        return None
    try:
        libc, gomp = ctypes.CDLL(None), ctypes.CDLL("libgomp.so.1")
        found = {name: getattr(libc, name) for name in ("pthread_mutex_lock", "pthread_mutex_unlock")}
        found.update(
            {name: getattr(gomp, name) for name in ("GOMP_parallel", "omp_get_thread_num", "omp_get_num_threads")}
        )
    except (OSError, AttributeError):
        return None
    for name in ("pthread_mutex_lock", "pthread_mutex_unlock"):
        found[name].argtypes, found[name].restype = [ctypes.c_size_t], ctypes.c_int
    # void GOMP_parallel(void (*fn)(void *), void *data, unsigned num_threads, unsigned flags): `omp parallel`
    found["GOMP_parallel"].argtypes = [ctypes.c_size_t, ctypes.c_size_t, ctypes.c_uint, ctypes.c_uint]
    found["GOMP_parallel"].restype = None
    for name in ("omp_get_thread_num", "omp_get_num_threads"):
        found[name].argtypes, found[name].restype = [], ctypes.c_int
    return found


# Every job needs a thread of its own (see _compile): OpenBLAS makes up to this many (MAX_THREADS of NumPy's
# wheel), or one per core. A team as large must be possible: no OMP_THREAD_LIMIT below it, no OMP_DYNAMIC.
MAX_JOBS = max(64, os.cpu_count() or 1)


def available() -> bool:
    """Whether ``share()`` can work here: Linux, Numba's OpenMP layer, an OpenBLAS with the setter, full teams."""
    c = _c_functions()
    if c is None or _setter() is None:
        return False
    gomp = ctypes.CDLL("libgomp.so.1")
    gomp.omp_get_thread_limit.restype = gomp.omp_get_dynamic.restype = ctypes.c_int
    return gomp.omp_get_thread_limit() >= MAX_JOBS and not gomp.omp_get_dynamic()


def _compile() -> Any:
    """The callback: OpenBLAS's ``n`` jobs on a team of ``n`` OpenMP threads, one call at a time.

    Each job must have a thread of its own: OpenBLAS's threaded products wait for
    each other's packed panels, so two jobs queued on one thread would wait forever.
    """
    from llvmlite import ir
    from numba import carray, cfunc, types
    from numba.extending import intrinsic

    c = _c_functions()
    lock, unlock, gomp_parallel = c["pthread_mutex_lock"], c["pthread_mutex_unlock"], c["GOMP_parallel"]
    thread_num, team_size = c["omp_get_thread_num"], c["omp_get_num_threads"]

    @intrinsic
    def call_job(typingctx, job, index, data, arg):  # pragma: no cover - runs compiled
        """``job(index, data, arg)``: the C function ``void (*)(int, void *, int)`` at address ``job``."""
        sig = types.void(types.uint64, types.int32, types.uint64, types.int32)

        def codegen(context, builder, signature, args):
            address, i, pointer, a = args
            void_p = ir.IntType(8).as_pointer()
            fn_type = ir.FunctionType(ir.VoidType(), [ir.IntType(32), void_p, ir.IntType(32)])
            builder.call(builder.inttoptr(address, fn_type.as_pointer()), [i, builder.inttoptr(pointer, void_p), a])
            return context.get_dummy_value()

        return sig, codegen

    # One thread of the team: job number omp_get_thread_num() (and, in a team smaller than asked for, every
    # team-size-th job after it: right for independent jobs, while a product's jobs would wait for each other,
    # which is why available() wants full teams). `task` holds the jobs' function, the size of a
    # job's record, the address of the first record, the argument OpenBLAS passes along, the number of jobs.
    @cfunc(types.void(types.voidptr))
    def one_job(task):  # pragma: no cover - runs compiled
        t = carray(task, 5, np.uint64)
        for i in range(thread_num(), np.int64(t[4]), team_size()):
            call_job(t[0], np.int32(i), t[2] + np.uint64(i) * t[1], np.int32(t[3]))

    one_job_address = one_job.address
    _state["keep"] = one_job  # the compiled function must outlive every call of the callback
    _state["mutex"] = mutex = np.zeros(64, np.uint8)  # glibc's PTHREAD_MUTEX_INITIALIZER is all zeros
    mutex_address = mutex.ctypes.data

    # void callback(int sync, void (*job)(int, void *, int), int n_jobs, size_t size, void *jobs, int arg);
    # OpenBLAS calls it with sync 1 (exec_blas): the jobs are done when it returns, as GOMP_parallel's team is.
    @cfunc(types.void(types.int32, types.uint64, types.int32, types.uint64, types.uint64, types.int32))
    def callback(sync, job, n_jobs, size, jobs, arg):  # pragma: no cover - runs compiled
        task = np.empty(5, np.uint64)
        task[0], task[1], task[2], task[3], task[4] = job, size, jobs, arg, n_jobs
        lock(mutex_address)  # OpenBLAS numbers the work buffers by job: one call at a time
        gomp_parallel(one_job_address, task.ctypes.data, n_jobs, 0)
        unlock(mutex_address)

    return callback


def prepare() -> bool:
    """Make the callback ready (compiled once per process); returns whether ``share()`` can install it.

    Only once Numba's threading layer is ``omp`` (``numba_loops`` chooses it where
    ``available()``) and after a parallel loop has started the pool.
    """
    with _lock:
        if _state["callback"] is None:
            import numba

            try:
                layer = numba.threading_layer()
            except ValueError:  # no parallel loop ran yet: the layer is not chosen
                return False
            if layer != "omp" or not available():
                return False
            _state["callback"] = _compile()
            atexit.register(release)  # before the compiled callback is freed with the interpreter
            os.register_at_fork(after_in_child=release)  # a forked child has no OpenMP pool: OpenBLAS's own threads
        return True


def share() -> bool:
    """Run NumPy's OpenBLAS jobs on Numba's pool from now on (until ``release()``); returns whether they do."""
    with _lock:
        if not _state["installed"] and prepare():
            _setter()(_state["callback"].address)
            _state["installed"] = True
        return _state["installed"]


def shared() -> bool:
    """Whether NumPy's OpenBLAS runs its jobs on Numba's pool now."""
    return _state["installed"]


def release() -> None:
    """Give OpenBLAS its own threads back (the default)."""
    with _lock:
        if _state["installed"]:
            _setter()(None)
            _state["installed"] = False
            _state["by_blocks"] = False


@contextlib.contextmanager
def sharing(wanted: bool) -> Iterator[bool]:
    """Inside the block, NumPy's OpenBLAS runs its jobs on Numba's pool if ``wanted`` and it can; after it, as before.

    Yields whether it does. Blocks nest and may overlap on several Python threads:
    the first installs the callback, the last to end removes it (one that ``share()``
    installed outside any block stays).
    """
    with _lock:
        if wanted and not _state["installed"] and share():
            _state["by_blocks"] = True
        joined = bool(wanted and _state["installed"])
        _state["blocks"] += joined
    try:
        yield joined
    finally:
        with _lock:
            _state["blocks"] -= joined
            if _state["blocks"] == 0 and _state["by_blocks"]:
                release()
