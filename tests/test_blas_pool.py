"""NumPy's OpenBLAS on Numba's OpenMP threads (``backprop_xp.cpu.blas_pool``): the same products, bit for bit.

Each check runs in a fresh process: the threading layer and the callback are
settings of the whole process, and a hang (two of OpenBLAS's jobs queued on
one thread wait for each other forever) must fail the test, not stop the suite.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from backprop_xp.cpu import blas_pool, numba_loops

if not numba_loops.available():
    if os.environ.get("BACKPROP_XP_REQUIRE_FAST", "") not in ("", "0"):
        pytest.fail("Numba not installed but BACKPROP_XP_REQUIRE_FAST is set", pytrace=False)
    pytest.skip("Numba not installed: the fast CPU path is not tested", allow_module_level=True)
pytest.importorskip("threadpoolctl")
if not blas_pool.available():
    pytest.skip("no OpenMP layer or no OpenBLAS callback here: nothing is shared", allow_module_level=True)

# What every script starts with: the fused loops and NumPy's OpenBLAS on two threads each, and the products
# of the step (hidden-major, batch 128, hidden 800: W1 xᵀ and δ1ᵀ x), a transposed one, float64.
PRELUDE = """
import numpy as np
from threadpoolctl import threadpool_limits
from backprop_xp.cpu import blas_pool, numba_loops
numba_loops.set_threads(2)
threadpool_limits(2, user_api="blas")
rng = np.random.default_rng(0)
pairs = [
    (rng.random((800, 784), dtype=np.float32), rng.random((128, 784), dtype=np.float32).T),
    (rng.random((800, 128), dtype=np.float32), rng.random((128, 784), dtype=np.float32)),
    (rng.random((784, 128), dtype=np.float32).T, rng.random((784, 300), dtype=np.float32)),
    (rng.random((300, 500)), rng.random((500, 700))),
]
"""


def run(script: str, env: dict[str, str] | None = None) -> str:
    """The script's output; a hang (the script or a child it forked) fails after 120 s, and nothing is left running."""
    process = subprocess.Popen(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env={**os.environ, **(env or {})}, start_new_session=True,
    )  # fmt: skip
    try:
        out, err = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # its whole session: a forked child may hang too
        process.communicate()
        pytest.fail("the script hung for 120 s")
    assert process.returncode == 0, err[-3000:]
    return out


def test_products_on_the_shared_pool_are_bit_identical_to_openblas_own_threads():
    """1, 2 and 5 BLAS threads on a pool of 2: the jobs' count above the pool's must not hang either."""
    out = run(
        """
        assert numba_loops.can_share_pool()  # the first parallel loop starts the pool, and the BLAS joins it
        for n in (1, 2, 5):
            with threadpool_limits(n, user_api="blas"):
                blas_pool.release()
                own = [a @ b for a, b in pairs]
                assert blas_pool.share() and numba_loops.can_share_pool()
                shared = [a @ b for a, b in pairs]
                assert all(np.array_equal(x, y) for x, y in zip(own, shared)), n
                assert all(np.allclose(x, a.astype(np.float64) @ b, rtol=1e-5) for x, (a, b) in zip(own, pairs))
        print(numba_loops.info()["threading_layer"], numba_loops.info()["blas_on_these_threads"])
        """,
        env={"NUMBA_NUM_THREADS": "2"},
    )
    assert out.split() == ["omp", "True"]


def test_products_from_several_threads_at_once_stay_right():
    """OpenBLAS gives the callback's jobs work buffers by job number: two calls at once must take turns."""
    out = run(
        """
        import threading
        want = [a @ b for a, b in pairs]
        assert numba_loops.can_share_pool() and blas_pool.share()
        wrong = []
        def work():
            for _ in range(40):
                wrong.extend(i for i, (a, b) in enumerate(pairs) if not np.array_equal(a @ b, want[i]))
        threads = [threading.Thread(target=work) for _ in range(4)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        print(len(wrong))
        """
    )
    assert out.strip() == "0"


def test_release_gives_openblas_its_threads_back():
    out = run(
        """
        want = [a @ b for a, b in pairs]
        assert numba_loops.can_share_pool() and blas_pool.share()
        blas_pool.release()
        assert not blas_pool.shared()
        assert all(np.array_equal(a @ b, w) for (a, b), w in zip(pairs, want))
        assert blas_pool.share() and blas_pool.shared()
        print("ok")
        """
    )
    assert out.strip() == "ok"


def test_nothing_is_shared_without_the_openmp_layer():
    """With Numba's own pool (``workqueue``) the callback is not installed and the loops keep their old threshold."""
    out = run(
        """
        print(numba_loops.can_share_pool(), blas_pool.shared(), numba_loops.info()["threading_layer"])
        """,
        env={"NUMBA_THREADING_LAYER": "workqueue"},
    )
    assert out.split() == ["False", "False", "workqueue"]


def test_a_fused_step_and_a_training_run_share_the_blas_only_while_they_run():
    """Outside them NumPy keeps OpenBLAS's own threads: its LAPACK hands jobs to those directly (bench/NOTES.md)."""
    out = run(
        """
        import backprop_xp as bx
        from backprop_xp.cpu.fused_cpu_step import FusedCpuStep
        m = bx.MLP(784, 64, 10, seed=0)
        step = FusedCpuStep(m, bx.SGD(m, lr=0.1, momentum=0.9))
        seen = []
        update = step.update
        step.update = lambda: (seen.append(blas_pool.shared()), update())
        x, y = np.random.default_rng(1).random((128, 784), dtype=np.float32), np.arange(128) % 10
        step(x, y)
        print(seen, blas_pool.shared())
        with blas_pool.sharing(True) as outer:  # a training run's epochs: the steps inside leave it installed
            step(x, y)
            with blas_pool.sharing(True) as inner:
                pass
            print(outer, inner, seen[-1], blas_pool.shared())
        print(blas_pool.shared())
        blas_pool.share()  # installed outside any block: a block leaves it so
        with blas_pool.sharing(True):
            pass
        print(blas_pool.shared())
        """
    )
    assert out.split("\n")[:4] == ["[True] False", "True True True True", "False", "True"]


def test_the_first_use_from_several_threads_at_once_compiles_one_callback():
    out = run(
        """
        import threading, time
        compiled = []
        compile_ = blas_pool._compile
        blas_pool._compile = lambda: (compiled.append(1), time.sleep(0.3), compile_())[2]  # a wide window
        threads = [threading.Thread(target=numba_loops.can_share_pool) for _ in range(4)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        with blas_pool.sharing(True) as on:
            print(len(compiled), on)
        """
    )
    assert out.split() == ["1", "True"]


@pytest.mark.parametrize("setting", [{"OMP_THREAD_LIMIT": "1"}, {"OMP_DYNAMIC": "true"}])
def test_nothing_is_shared_where_openmp_may_give_a_product_fewer_threads_than_jobs(setting):
    """Two of OpenBLAS's jobs on one thread wait for each other forever: then OpenBLAS keeps its own threads."""
    out = run(
        """
        a, b = pairs[3]
        print(numba_loops.can_share_pool(), np.allclose(a @ b, np.einsum("ij,jk->ik", a, b)))
        """,
        env=setting,
    )
    assert out.split() == ["False", "True"]


def test_numpy_own_openblas_is_found_and_not_another():
    lib = blas_pool.numpy_openblas()
    assert lib is not None and any(hasattr(lib, name) for name in blas_pool.SETTER_NAMES)
    import numpy as np

    assert os.path.dirname(lib._name).startswith(os.path.dirname(np.__file__))  # numpy.libs, not SciPy's copy


def test_a_forked_child_gets_openblas_own_threads_back_and_trains():
    """GNU OpenMP's pool does not survive fork(): the child's products and steps must not wait for it."""
    out = run(
        """
        import os
        import backprop_xp as bx
        want = [a @ b for a, b in pairs]
        m = bx.MLP(784, 128, 10, seed=0)
        step = bx.make_step(m, bx.SGD(m, lr=0.1, momentum=0.9))
        x, y = np.random.default_rng(1).random((128, 784), dtype=np.float32), np.arange(128) % 10
        step(x, y)
        assert numba_loops.can_share_pool() and blas_pool.share()  # installed for good, as a fork would find it
        pid = os.fork()
        if pid == 0:
            ok = not blas_pool.shared() and numba_loops.threads() == 1
            ok = ok and all(np.array_equal(a @ b, w) for (a, b), w in zip(pairs, want))
            step(x, y)
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), blas_pool.shared())
        """
    )
    assert out.split() == ["0", "True"]
