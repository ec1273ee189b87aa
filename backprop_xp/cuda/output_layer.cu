// The whole output layer of a training step, and the hidden layer's bias and activation, in one kernel.
// Built by backprop_xp/cuda/cuda_kernels.py (output_layer_source): it defines ACT_FORWARD(z) and
// ACT_DERIVATIVE(a), the activation's two C expressions (activations.ACTIVATIONS[name].cuda), and compiles
// this file with -DN_CLASSES=<K>. The tests compile it with NVRTC (tests/test_cuda_compile.py) and run it
// on the CPU (tests/cuda_emulator.py, tests/test_cuda_emulated.py).
//
// From z1 = x W1ᵀ (no bias yet) it computes, per row: a1 = f(z1 + b1) (written over z1), z2 = a1 W2ᵀ + b2,
// softmax, the loss and whether argmax = label, δ2 = (ŷ − y)/B, and δ1 = δ2 W2 ⊙ f'(z1); per block of
// rows: partial sums of ∂L/∂W2 = δ2ᵀ a1, ∂L/∂b2 = Σ δ2 and ∂L/∂b1 = Σ δ1; and the last block to finish
// adds the blocks' partials in block order (deterministic: no floating-point atomics) into the gradients.
//
// Layout: a warp per row, its lanes across the H hidden units, so every load of a row is coalesced; the
// K dot products of z2 are reduced with xor shuffles, after which every lane holds all K logits and does
// the (K-element) softmax itself: no broadcast, and every lane has δ2 for the δ1 pass. W2 (K×H) is staged
// once per block in shared memory, beside the block's δ2 rows. N_CLASSES (K) is a compile-time constant
// (-DN_CLASSES=10) so that the K accumulators of a lane stay in registers.

#if !defined(ACT_FORWARD) || !defined(ACT_DERIVATIVE)
#error "define ACT_FORWARD(z) and ACT_DERIVATIVE(a): the activation's expressions (activations.ACTIVATIONS[name].cuda)"
#endif

// f(z), and f'(z) written from a = f(z): the same values as activations.py's lines for the same name
// (and, for the derivatives, the same operations in the same order).
template <typename T> __device__ __forceinline__ T act_forward(T z) { return ACT_FORWARD(z); }
template <typename T> __device__ __forceinline__ T act_derivative(T a) { return ACT_DERIVATIVE(a); }

#ifndef N_CLASSES
#error "compile with -DN_CLASSES=<number of classes>"
#endif

template <typename T>
__device__ __forceinline__ T warp_allsum(T v) {  // every lane gets the same sum (xor butterfly)
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// partials, one row of `width` = 1 + K + H + K*H per block: [Σ loss | Σ δ2 (K) | Σ δ1 (H) | δ2ᵀ a1 (K×H)]
template <typename T>
__device__ void output_layer(T* a1, const T* b1, const T* w2, const T* b2, const long long* labels,
                             int batch, int n_hidden, int rows_per_block, T inv_batch,
                             T* delta2, T* delta1, T* grad_w2, T* grad_b1, T* grad_b2, T* loss,
                             long long* n_correct, T* partials, long long* partial_correct,
                             unsigned int* blocks_done) {
    extern __shared__ __align__(16) unsigned char shared_bytes[];
    T* w2_tile = reinterpret_cast<T*>(shared_bytes);        // K × H
    T* delta2_tile = w2_tile + N_CLASSES * n_hidden;         // rows_per_block × K
    __shared__ T warp_loss[32];
    __shared__ long long warp_correct[32];
    __shared__ bool is_last;

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    const int first_row = blockIdx.x * rows_per_block;
    const int n_rows = min(rows_per_block, batch - first_row);
    for (int i = threadIdx.x; i < N_CLASSES * n_hidden; i += blockDim.x) w2_tile[i] = w2[i];
    __syncthreads();

    // ---- phase 1: a warp per row
    T my_loss = T(0);
    long long my_correct = 0;
    for (int r = warp; r < n_rows; r += n_warps) {
        const long long row = first_row + r;
        T* a = a1 + row * n_hidden;
        T v[N_CLASSES];  // z2 of this row, then δ2
#pragma unroll
        for (int k = 0; k < N_CLASSES; ++k) v[k] = T(0);
        for (int h = lane; h < n_hidden; h += 32) {
            const T ah = act_forward<T>(a[h] + b1[h]);  // a1 = f(z1 + b1), in place
            a[h] = ah;
#pragma unroll
            for (int k = 0; k < N_CLASSES; ++k) v[k] += ah * w2_tile[k * n_hidden + h];
        }
        const long long label = labels[row];
        const bool good = label >= 0 && label < N_CLASSES;  // never index with a bad label: poison the row
        T zmax, sum = T(0), label_logit = T(0);
        int argmax = 0;
#pragma unroll
        for (int k = 0; k < N_CLASSES; ++k) {
            v[k] = warp_allsum(v[k]) + b2[k];  // z2 = a1 W2ᵀ + b2
            if (k == 0 || v[k] > zmax) { zmax = v[k]; argmax = k; }  // first maximum, as NumPy's argmax
        }
#pragma unroll
        for (int k = 0; k < N_CLASSES; ++k) {
            const T shifted = v[k] - zmax;
            if (k == label) label_logit = shifted;
            v[k] = exp(shifted);
            sum += v[k];
        }
        const T nan = T(0) / T(0);
#pragma unroll
        for (int k = 0; k < N_CLASSES; ++k) {  // δ2 = (ŷ − y) / B
            v[k] = good ? (v[k] / sum - (k == label ? T(1) : T(0))) * inv_batch : nan;
            if (lane == (k & 31)) {
                delta2[row * N_CLASSES + k] = v[k];
                delta2_tile[r * N_CLASSES + k] = v[k];
            }
        }
        if (lane == 0) {
            my_loss += good ? log(sum) - label_logit : nan;  // −log ŷ_y = log Σ exp − (z_y − max)
            my_correct += (good && argmax == label) ? 1 : 0;
        }
        T* d1 = delta1 + row * n_hidden;
        for (int h = lane; h < n_hidden; h += 32) {  // δ1 = δ2 W2 ⊙ f'(z1)
            T s = T(0);
#pragma unroll
            for (int k = 0; k < N_CLASSES; ++k) s += v[k] * w2_tile[k * n_hidden + h];
            d1[h] = s * act_derivative<T>(a[h]);
        }
    }
    if (lane == 0) {
        warp_loss[warp] = my_loss;
        warp_correct[warp] = my_correct;
    }
    __syncthreads();  // the block's a1, δ1 and δ2 rows are written and visible to the whole block

    // ---- phase 2: the block's partial sums, a thread per column
    const long long width = 1 + N_CLASSES + n_hidden + (long long)N_CLASSES * n_hidden;
    T* mine = partials + blockIdx.x * width;
    if (threadIdx.x == 0) {
        T s = T(0);
        long long c = 0;
        for (int w = 0; w < n_warps; ++w) { s += warp_loss[w]; c += warp_correct[w]; }
        mine[0] = s;
        partial_correct[blockIdx.x] = c;
    }
    for (int k = threadIdx.x; k < N_CLASSES; k += blockDim.x) {
        T s = T(0);
        for (int r = 0; r < n_rows; ++r) s += delta2_tile[r * N_CLASSES + k];
        mine[1 + k] = s;
    }
    for (int h = threadIdx.x; h < n_hidden; h += blockDim.x) {
        T g[N_CLASSES];
#pragma unroll
        for (int k = 0; k < N_CLASSES; ++k) g[k] = T(0);
        T g_b1 = T(0);
        for (int r = 0; r < n_rows; ++r) {
            const long long at = (first_row + r) * (long long)n_hidden + h;
            const T ah = a1[at];
            g_b1 += delta1[at];
#pragma unroll
            for (int k = 0; k < N_CLASSES; ++k) g[k] += delta2_tile[r * N_CLASSES + k] * ah;
        }
        mine[1 + N_CLASSES + h] = g_b1;
#pragma unroll
        for (int k = 0; k < N_CLASSES; ++k) mine[1 + N_CLASSES + n_hidden + (long long)k * n_hidden + h] = g[k];
    }

    // ---- the last block adds every block's partials, in block order
    __threadfence();  // this thread's partials are visible device-wide before the block counts itself done
    __syncthreads();
    if (threadIdx.x == 0) is_last = (atomicAdd(blocks_done, 1u) == gridDim.x - 1);
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    for (long long j = threadIdx.x; j < width; j += blockDim.x) {
        T total = T(0);
        for (int b = 0; b < gridDim.x; ++b) total += __ldcg(partials + b * width + j);  // L2, never a stale L1
        if (j == 0) {
            *loss = total / T(batch);
        } else if (j <= N_CLASSES) {
            grad_b2[j - 1] = total;
        } else if (j <= N_CLASSES + n_hidden) {
            grad_b1[j - 1 - N_CLASSES] = total;
        } else {
            grad_w2[j - 1 - N_CLASSES - n_hidden] = total;
        }
    }
    if (threadIdx.x == 0) {
        long long total = 0;
        for (int b = 0; b < gridDim.x; ++b) total += __ldcg(partial_correct + b);
        *n_correct = total;
        *blocks_done = 0u;  // ready for the next launch (or graph replay)
    }
}

#define OUTPUT_LAYER_ENTRY(NAME, T)                                                                          \
    extern "C" __global__ void NAME(T* a1, const T* b1, const T* w2, const T* b2, const long long* labels,   \
                                    int batch, int n_hidden, int rows_per_block, T inv_batch, T* delta2,      \
                                    T* delta1, T* grad_w2, T* grad_b1, T* grad_b2, T* loss,                   \
                                    long long* n_correct, T* partials, long long* partial_correct,            \
                                    unsigned int* blocks_done) {                                              \
        output_layer<T>(a1, b1, w2, b2, labels, batch, n_hidden, rows_per_block, inv_batch, delta2, delta1,   \
                        grad_w2, grad_b1, grad_b2, loss, n_correct, partials, partial_correct, blocks_done);   \
    }
OUTPUT_LAYER_ENTRY(output_layer_float, float)
OUTPUT_LAYER_ENTRY(output_layer_double, double)
