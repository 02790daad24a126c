// Gather insertion of projection Fourier transforms into a Hermitian half volume
// (Xmipp reconstruct_fourier; Strelak et al., IJHPCA 2019, doi:10.1177/1094342019832958),
// and the symmetrisation of the accumulated data and weights (RELION-style).
//
// Layouts (all sizes passed at run time, so a new box does not recompile):
//   data   (M, M, Mh) float2, weight (M, M, Mh) float: index [kz][ky][kx], kz and ky in FFT order
//          (k = i for i < M/2, i - M otherwise), kx = 0..Mh-1 with Mh = M/2 + 1 (rfft half axis).
//   proj   (B, M, Mh) float2: rfft2 of each padded projection, [ky][kx], ky in FFT order.
//   proj_w (B, M, Mh) float or nullptr: per-pixel weight (CTF^2 for Wiener, nullptr = 1).
//   mats   (E, 9) float: row-major A of each entry (image x symmetry operator); a voxel k
//          (vector (kx, ky, kz)) sits at q = A k in the projection frame; q_z is the distance
//          to the central plane and (q_x, q_y) the position in the 2-D transform.
//   img    (E,) int: image of each entry in proj.
//
// One thread owns one column of the half volume along `axis` (0: x, 1: y, 2: z); one launch
// handles the entries whose plane normal (third row of A) is dominated by that axis, so each
// column crosses each plane's slab |q_z| <= blob radius in at most ceil(2 r sqrt(3)) + 1 voxels.
// Threads loop over the entries (staged TILE at a time in shared memory), visit the voxels of
// their column inside the slab, and sum the blob-weighted pixels within the blob radius into
// registers before one read-modify-write of the voxel: no atomics, no races.
// Small boxes have few columns; to fill the GPU, blockIdx.z splits the entries into gridDim.z
// contiguous shares, each accumulated into its own replica of data/weight (replica_stride
// elements apart), summed once at the end by the caller.
//
// Template parameters (the autotuner's knobs, see insert.py INSERT_TUNING_SPACE):
//   TILE       entries staged per shared-memory tile
//   BLOB_MODE  0: blob evaluated on the fly (Bessel I_m), 1: table read through the L1/texture
//              path, 2: table copied into shared memory (dynamic shared memory, table_n floats)
//   ORDER      blob order m for BLOB_MODE 0 (0, 1 or 2)

template <int ORDER>
__device__ __forceinline__ float blob_on_the_fly(float d2, float inv_r2, float alpha, float inv_norm)
{
    const float u = fmaxf(1.0f - d2 * inv_r2, 0.0f);
    const float s = sqrtf(u);
    const float z = alpha * s;
    if (ORDER == 0) {
        return cyl_bessel_i0f(z) * inv_norm;
    } else if (ORDER == 1) {
        return s * cyl_bessel_i1f(z) * inv_norm;
    } else {
        const float i2 = (z > 1e-3f) ? cyl_bessel_i0f(z) - 2.0f * cyl_bessel_i1f(z) / z : 0.125f * z * z;
        return u * i2 * inv_norm;
    }
}

__device__ __forceinline__ float blob_from_table(const float* __restrict__ table, int table_n, float scale,
                                                 float d2)
{
    const float t = d2 * scale;
    int i = (int)t;
    i = min(max(i, 0), table_n - 1);
    const int j = min(i + 1, table_n - 1);
    const float f = t - (float)i;
    return table[i] + f * (table[j] - table[i]);
}

__device__ __forceinline__ int wrap_index(int k, int M)
{
    return k < 0 ? k + M : k;
}

template <int TILE, int BLOB_MODE, int ORDER>
__global__ void insert_gather(float2* __restrict__ data, float* __restrict__ weight,
                              const float2* __restrict__ proj, const float* __restrict__ proj_w,
                              const float* __restrict__ mats, const int* __restrict__ img,
                              const int n_entries, const int axis, const long long replica_stride,
                              const int M, const int Mh, const int K, const int kmax2,
                              const float r, const float r2, const float alpha, const float inv_norm,
                              const float* __restrict__ table, const int table_n, const float table_scale)
{
    extern __shared__ float s_table[];
    __shared__ float s_mat[TILE][9];
    __shared__ int s_img[TILE];

    const int nthreads = blockDim.x * blockDim.y;
    const int tid = threadIdx.y * blockDim.x + threadIdx.x;
    if (BLOB_MODE == 2) {
        for (int i = tid; i < table_n; i += nthreads) s_table[i] = table[i];
    }
    const float* tab = (BLOB_MODE == 2) ? s_table : table;

    // face coordinates (u fastest): axis 2 -> (kx, ky), axis 1 -> (kx, kz), axis 0 -> (ky, kz)
    const int u = ((axis == 0) ? -K : 0) + (int)(blockIdx.x * blockDim.x + threadIdx.x);
    const int v = -K + (int)(blockIdx.y * blockDim.y + threadIdx.y);
    int c_lo = 0, c_hi = -1;
    bool active = (u <= K) && (v <= K);
    if (active) {
        const int rem = kmax2 - u * u - v * v;
        if (rem < 0) {
            active = false;
        } else {
            int cs = (int)floorf(sqrtf((float)rem));
            while ((cs + 1) * (cs + 1) <= rem) ++cs;
            while (cs * cs > rem) --cs;
            cs = min(cs, K);
            c_hi = cs;
            c_lo = (axis == 0) ? 0 : -cs;
        }
    }
    const size_t plane = (size_t)M * Mh;
    const float inv_r2 = 1.0f / r2;
    // this replica's share of the entries
    const int e_begin = (int)(((long long)n_entries * blockIdx.z) / gridDim.z);
    const int e_end = (int)(((long long)n_entries * (blockIdx.z + 1)) / gridDim.z);
    data += (size_t)blockIdx.z * (size_t)replica_stride;
    weight += (size_t)blockIdx.z * (size_t)replica_stride;

    for (int base = e_begin; base < e_end; base += TILE) {
        const int nt = min(TILE, e_end - base);
        __syncthreads();
        for (int i = tid; i < nt * 9; i += nthreads) s_mat[i / 9][i % 9] = mats[(size_t)base * 9 + i];
        for (int i = tid; i < nt; i += nthreads) s_img[i] = img[base + i];
        __syncthreads();
        if (!active) continue;
        for (int e = 0; e < nt; ++e) {
            const float* A = s_mat[e];
            float nc, nu, nv;
            if (axis == 2) { nc = A[8]; nu = A[6]; nv = A[7]; }
            else if (axis == 1) { nc = A[7]; nu = A[6]; nv = A[8]; }
            else { nc = A[6]; nu = A[7]; nv = A[8]; }
            const float t = nu * (float)u + nv * (float)v;
            const float inv = 1.0f / nc;
            const float a = (-r - t) * inv, b = (r - t) * inv;
            const int c0 = max((int)ceilf(fminf(a, b)), c_lo);
            const int c1 = min((int)floorf(fmaxf(a, b)), c_hi);
            if (c0 > c1) continue;
            const float2* P = proj + (size_t)s_img[e] * plane;
            const float* PW = (proj_w != nullptr) ? proj_w + (size_t)s_img[e] * plane : nullptr;
            for (int c = c0; c <= c1; ++c) {
                int kx, ky, kz;
                if (axis == 2) { kx = u; ky = v; kz = c; }
                else if (axis == 1) { kx = u; ky = c; kz = v; }
                else { kx = c; ky = u; kz = v; }
                const float fx = (float)kx, fy = (float)ky, fz = (float)kz;
                const float qx = A[0] * fx + A[1] * fy + A[2] * fz;
                const float qy = A[3] * fx + A[4] * fy + A[5] * fz;
                const float qz = A[6] * fx + A[7] * fy + A[8] * fz;
                const float qz2 = qz * qz;
                if (qz2 > r2) continue;
                const float rp = sqrtf(r2 - qz2);
                const int x0 = (int)ceilf(qx - rp), x1 = (int)floorf(qx + rp);
                const int y0 = (int)ceilf(qy - rp), y1 = (int)floorf(qy + rp);
                float sre = 0.0f, sim = 0.0f, sw = 0.0f;
                for (int py = y0; py <= y1; ++py) {
                    const float dy = (float)py - qy;
                    for (int px = x0; px <= x1; ++px) {
                        const float dx = (float)px - qx;
                        const float d2 = dx * dx + dy * dy + qz2;
                        if (d2 > r2) continue;
                        if (px * px + py * py > kmax2 || abs(px) > K || abs(py) > K) continue;
                        float w;
                        if (BLOB_MODE == 0) w = blob_on_the_fly<ORDER>(d2, inv_r2, alpha, inv_norm);
                        else w = blob_from_table(tab, table_n, table_scale, d2);
                        int ax = px, ay = py;
                        float sgn = 1.0f;
                        if (px < 0) { ax = -px; ay = -py; sgn = -1.0f; }   // Hermitian mate
                        const int idx = wrap_index(ay, M) * Mh + ax;
                        const float2 f = __ldg(P + idx);
                        sre += w * f.x;
                        sim += sgn * w * f.y;
                        sw += (PW != nullptr) ? w * __ldg(PW + idx) : w;
                    }
                }
                if (sw != 0.0f || sre != 0.0f || sim != 0.0f) {
                    const size_t vox = ((size_t)wrap_index(kz, M) * M + wrap_index(ky, M)) * Mh + kx;
                    float2 d = data[vox];
                    d.x += sre;
                    d.y += sim;
                    data[vox] = d;
                    weight[vox] += sw;
                }
            }
        }
    }
}

// out(k) = sum_g in(g k) for data (complex) and weight (real) of a Hermitian half volume,
// trilinear interpolation; a point with negative x is read at -g k and conjugated.
// Voxels outside the sphere |k|^2 <= kmax2 or with any |component| > K are set to 0;
// neighbours outside that box read as 0 (they were never written by the insertion).
extern "C" __global__ void symmetrize_half_volume(const float2* __restrict__ data,
                                                  const float* __restrict__ weight,
                                                  float2* __restrict__ out_data, float* __restrict__ out_weight,
                                                  const float* __restrict__ syms, const int n_sym,
                                                  const int M, const int Mh, const int K, const int kmax2)
{
    const size_t total = (size_t)M * M * Mh;
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    const int kx = (int)(i % Mh);
    const int iy = (int)((i / Mh) % M);
    const int iz = (int)(i / ((size_t)Mh * M));
    const int ky = (iy < (M + 1) / 2) ? iy : iy - M;
    const int kz = (iz < (M + 1) / 2) ? iz : iz - M;
    if (kx > K || abs(ky) > K || abs(kz) > K || kx * kx + ky * ky + kz * kz > kmax2) {
        out_data[i] = make_float2(0.0f, 0.0f);
        out_weight[i] = 0.0f;
        return;
    }
    const float fx = (float)kx, fy = (float)ky, fz = (float)kz;
    float sre = 0.0f, sim = 0.0f, sw = 0.0f;
    for (int s = 0; s < n_sym; ++s) {
        const float* g = syms + 9 * s;
        float rx = g[0] * fx + g[1] * fy + g[2] * fz;
        float ry = g[3] * fx + g[4] * fy + g[5] * fz;
        float rz = g[6] * fx + g[7] * fy + g[8] * fz;
        float sgn = 1.0f;
        if (rx < 0.0f) { rx = -rx; ry = -ry; rz = -rz; sgn = -1.0f; }
        const float flx = floorf(rx), fly = floorf(ry), flz = floorf(rz);
        const int x0 = (int)flx, y0 = (int)fly, z0 = (int)flz;
        const float tx = rx - flx, ty = ry - fly, tz = rz - flz;
        for (int dz = 0; dz < 2; ++dz) {
            const int cz = z0 + dz;
            if (abs(cz) > K) continue;
            const float wz = dz ? tz : 1.0f - tz;
            for (int dy = 0; dy < 2; ++dy) {
                const int cy = y0 + dy;
                if (abs(cy) > K) continue;
                const float wzy = wz * (dy ? ty : 1.0f - ty);
                for (int dx = 0; dx < 2; ++dx) {
                    const int cx = x0 + dx;
                    if (cx > K) continue;
                    const float w = wzy * (dx ? tx : 1.0f - tx);
                    if (w == 0.0f) continue;
                    const size_t j = ((size_t)wrap_index(cz, M) * M + wrap_index(cy, M)) * Mh + cx;
                    const float2 d = __ldg(data + j);
                    sre += w * d.x;
                    sim += sgn * w * d.y;
                    sw += w * __ldg(weight + j);
                }
            }
        }
    }
    out_data[i] = make_float2(sre, sim);
    out_weight[i] = sw;
}
