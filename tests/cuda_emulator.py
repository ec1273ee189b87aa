"""Run the CUDA sources of cuda/cuda_kernels.py on the CPU: each CUDA thread a real thread; each elementwise body a loop.

The CUDA sources are compiled as C++ by g++ with a small shim, and a launch
runs its blocks one after another; in a block, each of the ``blockDim.x``
CUDA threads is a user-space thread (``ucontext``), all run round robin in
one host thread, each until it waits at a barrier or returns:

* ``__syncthreads()`` is a barrier over the block's threads, and a warp
  shuffle a write to the warp's 32 slots between two barriers over the
  warp's threads; a thread that returns drops out of both (as on sm_70+);
* ``__shared__`` variables are function ``static``s, which the threads of a
  block share, and the dynamic shared memory is a buffer filled with 0xFF
  bytes (a NaN in any float type) before each block, so a read of shared
  memory nothing wrote shows up in the results;
* ``atomicAdd`` and ``__threadfence`` are C++ atomics, ``__ldcg`` a plain load.

This checks the kernels' logic (indexing, barriers, shuffles, the block
partial sums, the last block's reduction, the counter reset) with the
kernels' own source text. It cannot check what depends on the hardware:
memory ordering weaker than the emulation's, timing, or register and shared
memory limits; ``tests/test_gpu.py`` runs the same kernels on a device.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

SHIM = r"""
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>
#include <ucontext.h>

struct dim3 { unsigned x = 1, y = 1, z = 1; };
dim3 threadIdx, blockIdx, blockDim, gridDim;  // threadIdx is set by the scheduler before it resumes a thread

#define __device__
#define __global__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) alignas(n)
using std::exp; using std::log; using std::tanh; using std::min;

// A barrier among the threads still running: the last one to arrive opens it.
struct EmuBarrier { unsigned generation = 0, arrived = 0, running = 0; };
struct EmuThread { ucontext_t context; std::unique_ptr<char[]> stack; bool done = false; };

static unsigned char* emu_dynamic_shared = nullptr;
static ucontext_t emu_scheduler;
static EmuThread* emu_threads = nullptr;
static unsigned emu_current = 0;
static EmuBarrier emu_block;
static EmuBarrier* emu_warp_barriers = nullptr;
static unsigned char (*emu_warp_slots)[32][8] = nullptr;
static std::function<void()>* emu_body = nullptr;

static void emu_yield() { swapcontext(&emu_threads[emu_current].context, &emu_scheduler); }
static void emu_arrive(EmuBarrier& b) {
    const unsigned generation = b.generation;
    if (++b.arrived == b.running) { b.arrived = 0; ++b.generation; return; }
    while (b.generation == generation) emu_yield();
}
static void emu_leave(EmuBarrier& b) {  // a returned thread no longer holds a barrier up
    if (--b.running > 0 && b.arrived == b.running) { b.arrived = 0; ++b.generation; }
}

inline void __syncthreads() { emu_arrive(emu_block); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { unsigned old = *p; *p = old + v; return old; }
template <typename T> inline T __ldcg(const T* p) { return *p; }

template <typename T> inline T emu_exchange(T v, int source_lane) {
    const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    std::memcpy(emu_warp_slots[warp][lane], &v, sizeof(T));
    emu_arrive(emu_warp_barriers[warp]);
    T out;
    std::memcpy(&out, emu_warp_slots[warp][source_lane], sizeof(T));
    emu_arrive(emu_warp_barriers[warp]);
    return out;
}
template <typename T> inline T __shfl_xor_sync(unsigned, T v, int offset) {
    return emu_exchange(v, (threadIdx.x % 32) ^ offset);
}
template <typename T> inline T __shfl_down_sync(unsigned, T v, int offset) {
    const int lane = threadIdx.x % 32;
    return emu_exchange(v, lane + offset < 32 ? lane + offset : lane);
}

static void emu_thread_main() {
    (*emu_body)();
    emu_threads[emu_current].done = true;
    emu_leave(emu_warp_barriers[threadIdx.x / 32]);
    emu_leave(emu_block);
}  // returns to emu_scheduler (uc_link)

// Blocks one after another; in a block, every thread runs until it waits at a barrier or returns,
// round robin, in one host thread (ucontext), until all have returned.
template <class Body> void emu_launch(unsigned grid, unsigned block, size_t shared, Body body) {
    std::function<void()> run = body;
    emu_body = &run;
    gridDim = dim3{grid, 1, 1};
    blockDim = dim3{block, 1, 1};
    const unsigned n_warps = (block + 31) / 32;
    std::vector<unsigned char> memory(shared + 64);
    std::vector<EmuThread> threads(block);
    std::vector<EmuBarrier> warps(n_warps);
    std::vector<unsigned char[32][8]> slots(n_warps);
    const size_t stack_size = 256 * 1024;
    for (auto& t : threads) t.stack.reset(new char[stack_size]);
    for (unsigned b = 0; b < grid; ++b) {
        std::fill(memory.begin(), memory.end(), 0xFF);  // shared memory nothing wrote reads as NaN
        emu_dynamic_shared = memory.data() + (64 - reinterpret_cast<size_t>(memory.data()) % 64) % 64;
        emu_block = EmuBarrier{0, 0, block};
        for (unsigned w = 0; w < n_warps; ++w) warps[w] = EmuBarrier{0, 0, std::min(32u, block - 32 * w)};
        emu_threads = threads.data();
        emu_warp_barriers = warps.data();
        emu_warp_slots = slots.data();
        blockIdx = dim3{b, 1, 1};
        for (unsigned t = 0; t < block; ++t) {
            EmuThread& th = threads[t];
            th.done = false;
            getcontext(&th.context);
            th.context.uc_stack.ss_sp = th.stack.get();
            th.context.uc_stack.ss_size = stack_size;
            th.context.uc_link = &emu_scheduler;
            makecontext(&th.context, emu_thread_main, 0);
        }
        for (unsigned finished = 0; finished < block;) {
            finished = 0;
            for (unsigned t = 0; t < block; ++t) {
                if (threads[t].done) { ++finished; continue; }
                emu_current = t;
                threadIdx = dim3{t, 1, 1};
                swapcontext(&emu_scheduler, &threads[t].context);
            }
        }
    }
}
"""

# The kernel's parameters, in order, as (C type with T for the float type, name).
OUTPUT_LAYER_PARAMS = [
    ("T*", "a1"), ("const T*", "b1"), ("const T*", "w2"), ("const T*", "b2"), ("const long long*", "labels"),
    ("int", "batch"), ("int", "n_hidden"), ("int", "rows_per_block"), ("T", "inv_batch"), ("T*", "delta2"),
    ("T*", "delta1"), ("T*", "grad_w2"), ("T*", "grad_b1"), ("T*", "grad_b2"), ("T*", "loss"),
    ("long long*", "n_correct"), ("T*", "partials"), ("long long*", "partial_correct"),
    ("unsigned int*", "blocks_done"),
]  # fmt: skip
CTYPES = {"int": ctypes.c_int, "float": ctypes.c_float, "double": ctypes.c_double}


def _wrapper(kernel: str, params: list[tuple[str, str]], float_type: str) -> str:
    """An ``extern "C"`` host function that launches ``kernel`` on the emulator."""
    typed = [(ctype.replace("T", float_type) if ctype.split()[-1].rstrip("*") == "T" else ctype, name)
             for ctype, name in params]  # fmt: skip
    decl = ", ".join(f"{ctype} {name}" for ctype, name in typed)
    args = ", ".join(name for _, name in typed)
    return (
        f'extern "C" void emu_{kernel}(unsigned grid, unsigned block, size_t shared, {decl}) {{\n'
        f"    emu_launch(grid, block, shared, [=] {{ {kernel}({args}); }});\n}}\n"
    )


def build(text: str) -> ctypes.CDLL:
    """``text`` compiled by g++ into a shared library (cached by content), loaded.

    ``-ffp-contract=off``: no multiply-add is fused, as ``--fmad=false`` asks
    of NVRTC, so IEEE operations happen one by one, as in NumPy. (No
    ``-ffast-math``: subnormals are kept, as NumPy keeps them; CuPy's
    ``-ftz=true`` flushes them on a GPU, which this cannot show.)
    """
    compiler = shutil.which("g++")
    if compiler is None:
        raise RuntimeError("g++ is not installed")
    flags = ["-std=c++17", "-O1", "-ffp-contract=off", "-fPIC", "-shared", "-w"]
    digest = hashlib.sha256(" ".join([*flags, text]).encode()).hexdigest()[:16]  # a change of flags rebuilds
    folder = Path(tempfile.gettempdir()) / "backprop-xp-cuda-emulator"
    folder.mkdir(exist_ok=True)
    library = folder / f"{digest}.so"
    if not library.exists():
        src = folder / f"{digest}.cpp"
        src.write_text(text)
        tmp = folder / f"{digest}.{os.getpid()}.tmp.so"
        run = subprocess.run([compiler, *flags, str(src), "-o", str(tmp)], capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"the emulated kernels do not compile:\n{run.stderr[-4000:]}")
        tmp.replace(library)
    return ctypes.CDLL(str(library))


# ---- ElementwiseKernel bodies: CuPy wraps a body into a loop over the element index ``i``; here it is a plain
# C++ loop, each non-raw parameter a reference to element i, each raw one the whole array.
# (tests/test_cuda_compile.py builds the CUDA kernel CuPy would compile from the same parse)
ELEMENTWISE_TYPES = {
    "T": "T", "int32": "int", "int64": "long long", "uint32": "unsigned int", "float32": "float", "float64": "double",
}  # fmt: skip


def elementwise_params(text: str) -> list[tuple[bool, str, str]]:
    """``"raw T x, int32 n"`` -> ``[(True, "T", "x"), (False, "int32", "n")]``."""
    out = []
    for part in text.split(","):
        words = part.split()
        assert words[-2] in ELEMENTWISE_TYPES, f"unknown parameter type {words[-2]!r} in {text!r}"
        out.append((words[0] == "raw", words[-2], words[-1]))
    return out


def elementwise_arguments(spec, const_raw_inputs: bool = False) -> tuple[list[str], list[str]]:
    """An ElementwiseKernel's parameters as a C function's (``T* x_ptr``; a raw one ``T* x``), and the body's
    names bound to element ``i`` of each non-raw array (``const T x = x_ptr[i];``, outputs by reference)."""
    args, loads = [], []
    for is_output, text in ((False, spec.in_params), (True, spec.out_params)):
        for raw, ctype, name in elementwise_params(text):
            c = ELEMENTWISE_TYPES[ctype]
            if raw:
                args.append(f"const {c}* {name}" if const_raw_inputs and not is_output else f"{c}* {name}")
            else:
                args.append(f"{c}* {name}_ptr")
                loads.append(f"{c}& {name} = {name}_ptr[i];" if is_output else f"const {c} {name} = {name}_ptr[i];")
    return args, loads


def elementwise_cpp(spec, float_type: str) -> str:
    """The ElementwiseKernel ``spec`` (``cuda.kernels.ElementwiseSpec``) as ``extern "C" void NAME_T(arrays..., n)``."""
    args, loads = elementwise_arguments(spec, const_raw_inputs=True)
    return (
        f"namespace {spec.name}_{float_type} {{\ntypedef {float_type} T;\n{spec.preamble}\n"
        f'extern "C" void {spec.name}_{float_type}({", ".join(args)}, long long n) {{\n'
        f"  for (long long i = 0; i < n; ++i) {{ {' '.join(loads)} {spec.body} }}\n}}\n}}\n"
    )


class EmulatedElementwise:
    """ElementwiseKernel bodies compiled for the CPU; ``run(name, dtype, *arrays)`` runs one over every element."""

    def __init__(self, specs) -> None:
        self.specs = {spec.name: spec for spec in specs}
        header = "#include <cmath>\n#define __device__\n#define __forceinline__ inline\nusing std::exp; using std::sqrt; using std::tanh;\n"
        self.lib = build(header + "".join(elementwise_cpp(s, t) for s in specs for t in ("float", "double")))

    def run(self, name: str, dtype, *arrays: np.ndarray) -> None:
        """Arrays in the order of the spec's in_params then out_params (C-contiguous, written in place)."""
        float_type = "float" if np.dtype(dtype) == np.float32 else "double"
        n = max(a.size for a in arrays)
        for a in arrays:
            assert isinstance(a, np.ndarray) and a.flags.c_contiguous
        getattr(self.lib, f"{name}_{float_type}")(
            *(ctypes.c_void_p(a.ctypes.data) for a in arrays), ctypes.c_longlong(n)
        )


class EmulatedKernels:
    """The kernels of one CUDA source compiled for the emulator; call ``launch(name, grid, block, shared, *args)``."""

    def __init__(self, source: str, kernels: dict[str, list[tuple[str, str]]], defines: dict[str, int] | None = None):
        # The one construct C++ cannot take as it is: extern shared memory becomes the emulator's buffer.
        source = source.replace(
            "extern __shared__ __align__(16) unsigned char shared_bytes[];",
            "unsigned char* shared_bytes = emu_dynamic_shared;",
        )
        lines = [f"#define {name} {value}" for name, value in (defines or {}).items()]
        text = "\n".join([SHIM, *lines, source, *(_wrapper(k, p, t) for k, p in kernels.items() for t in ("float", "double")
                          if k.endswith("_" + t))])  # fmt: skip
        self.lib = build(text)
        self.params = kernels

    def launch(self, kernel: str, grid: int, block: int, shared: int, *args) -> None:
        """Launch ``kernel``; arrays are passed by address (C-contiguous NumPy), None as a null pointer."""
        float_type = "float" if kernel.endswith("_float") else "double"
        converted = [ctypes.c_uint(grid), ctypes.c_uint(block), ctypes.c_size_t(shared)]
        for (ctype, name), value in zip(self.params[kernel], args, strict=True):
            if ctype.endswith("*"):
                if value is not None:
                    assert isinstance(value, np.ndarray) and value.flags.c_contiguous, name
                converted.append(ctypes.c_void_p(None if value is None else value.ctypes.data))
            else:
                converted.append(CTYPES[float_type if ctype == "T" else ctype](value))
        getattr(self.lib, f"emu_{kernel}")(*converted)
