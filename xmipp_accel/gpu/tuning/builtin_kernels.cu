// Cross-correlation spectra of frame pairs: out[p, i] = w[i] * F[a_p, i] * conj(F[b_p, i]).
// Tuning parameters (compile-time, set with -D by the autotuner):
//   BLOCK_SIZE       threads per block
//   ITEMS            pixels per thread (strided by BLOCK_SIZE, so loads stay coalesced)
//   PAIRS_PER_BLOCK  pairs handled by one block (the weight of a pixel is read once for all of them)
// Sizes (pixels, pairs) are run-time arguments: no recompilation per size.
#ifndef BLOCK_SIZE
#define BLOCK_SIZE 256
#endif
#ifndef ITEMS
#define ITEMS 1
#endif
#ifndef PAIRS_PER_BLOCK
#define PAIRS_PER_BLOCK 1
#endif

extern "C" __global__ void __launch_bounds__(BLOCK_SIZE)
correlate_pairs(const float2* __restrict__ spectra, const int* __restrict__ pairs,
                const float* __restrict__ weights, float2* __restrict__ out,
                long long n_pixels, int n_pairs)
{
    const int pair0 = blockIdx.y * PAIRS_PER_BLOCK;
    const long long base = (long long)blockIdx.x * (BLOCK_SIZE * ITEMS) + threadIdx.x;
#pragma unroll
    for (int k = 0; k < ITEMS; ++k) {
        const long long i = base + (long long)k * BLOCK_SIZE;
        if (i >= n_pixels) break;
        const float w = weights != nullptr ? weights[i] : 1.0f;
#pragma unroll
        for (int q = 0; q < PAIRS_PER_BLOCK; ++q) {
            const int p = pair0 + q;
            if (p >= n_pairs) break;
            const float2 x = spectra[(long long)pairs[2 * p] * n_pixels + i];
            const float2 y = spectra[(long long)pairs[2 * p + 1] * n_pixels + i];
            out[(long long)p * n_pixels + i] = make_float2(w * (x.x * y.x + x.y * y.y),
                                                           w * (x.y * y.x - x.x * y.y));
        }
    }
}
