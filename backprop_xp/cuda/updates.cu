// The optimizers' updates, one element at a time: the bodies of the ElementwiseKernels that
// backprop_xp/cuda/cuda_kernels.py builds (each body is one call of a function below, with this file as
// its preamble). Every parameter is a view into one flat buffer, so one launch updates them all.
//
// Compiled with --fmad=false: no multiply-add is contracted, so each line rounds as NumPy's separate
// operations do and the result is bit-identical to optimizers.py's step() for normal numbers (CuPy adds
// -ftz=true: float32 subnormals become zero on the GPU). The numbers a step multiplies by live in a small
// device array `hyper`, so a captured CUDA graph sees a changed learning rate or step count. `g` is never
// written: the next backward pass overwrites it anyway.

// SGD with momentum, PyTorch's rule in NumPy's operation order (optimizers.SGD.step):
// g' = g + λw; v = μv + g'; w = w − ηv.   hyper = [η, μ, λ]
template <typename T>
__device__ __forceinline__ void sgd_momentum_update(const T g, const T* hyper, T& w, T& v) {
    const T lr = hyper[0], mu = hyper[1], wd = hyper[2];
    const T gd = g + w * wd;
    v = v * mu;
    v = v + gd;
    w = w - v * lr;
}

// SGD without momentum: g' = g + λw; w = w − ηg'.   hyper = [η, μ (unused), λ]
template <typename T>
__device__ __forceinline__ void sgd_plain_update(const T g, const T* hyper, T& w) {
    const T lr = hyper[0], wd = hyper[2];
    const T gd = g + w * wd;
    w = w - gd * lr;
}

// Adam and AdamW (optimizers.Adam.step), the same operations in the same order as its NumPy lines and
// cpu/numba_loops.py's adam_loop_. hyper = Adam.fused_hyper() at this step's t, then the AdamW flag:
// [β₁, 1 − β₁, β₂, 1 − β₂, √(1 − β₂ᵗ), ε, η / (1 − β₁ᵗ), λ or (AdamW) 1 − ηλ, 1 if AdamW else 0]
template <typename T>
__device__ __forceinline__ void adam_update(const T g, const T* hyper, T& w, T& m, T& v) {
    const T b1 = hyper[0], c1 = hyper[1], b2 = hyper[2], c2 = hyper[3], root2 = hyper[4], eps = hyper[5];
    const T step = hyper[6], wd = hyper[7];
    T gd = g, wd_w = w;
    if (hyper[8] != T(0)) {
        wd_w = w * wd;  // AdamW: w (1 − ηλ), before the update; the gradient is left alone
    } else if (wd != T(0)) {
        gd = g + w * wd;  // Adam: the L2 term into the gradient
    }
    const T mi = m * b1 + gd * c1;  // m = β₁ m + (1 − β₁) g
    m = mi;
    const T vi = v * b2 + (gd * gd) * c2;  // v = β₂ v + (1 − β₂) g²
    v = vi;
    w = wd_w - (mi / (sqrt(vi) / root2 + eps)) * step;  // w − (η / (1 − β₁ᵗ)) m / (√v / √(1 − β₂ᵗ) + ε)
}
