// Gather insertion of projection Fourier transforms into a Hermitian half volume
// (Xmipp reconstruct_fourier; Strelak et al., IJHPCA 2019, doi:10.1177/1094342019832958),
// and the symmetrisation of the accumulated data and weights (RELION-style).
//
// Layouts (all sizes passed at run time, so a new box does not recompile):
//   data   (M, M, Mh) float2, weight (M, M, Mh) float: index [kz][ky][kx], kz and ky in FFT order
//          (k = i for i < M/2, i - M otherwise), kx = 0..Mh-1 with Mh = M/2 + 1 (rfft half axis).
//   proj   (B, W, W) float4: packed projections (see pack_projections), centred, W = 2 Kp + 1.
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
//   BLOB_MODE  0: blob evaluated on the fly (Bessel I_m), 1: table of (value, slope) pairs read
//              through the L1/texture path, 2: table copied into shared memory (table_n floats)
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

__device__ __forceinline__ int wrap_index(int k, int M)
{
    return k < 0 ? k + M : k;
}

// Packed projections (what the insertion kernel reads): for each image a centred square of
// W = 2 Kp + 1 pixels (Kp = K + ceil(r) + 1, so that every pixel a blob can reach is inside),
// float4 (re, im, weight, 0) at [py + Kp][px + Kp]: the rfft value for px >= 0 and its Hermitian
// mate conj(F(-p)) for px < 0, already multiplied by the shift phase and the CTF treatment, and
// exact zeros (weight too) outside the pixels that take part (|p|^2 <= kmax2, |px|, |py| <= K).
// The insertion loop then needs neither bounds checks nor Hermitian branches.
//   mode 0: weight 1; 1: Wiener (F*ctf, ctf^2); 2: Wiener on CTF-premultiplied data (F, ctf^2);
//   3: phase flip (F*sign(ctf), 1); 4: explicit per-pixel weights (F, aux).
// The CTF of modes 1-3 is aux (rfft layout, like ft) or, when ctfp is given, evaluated here from each
// image's five coefficients of the phase (em/ctf.py ctf_coefficients: chi = -(a u2 + b (fx^2 - fy^2) +
// c 2 fx fy) + d u2^2 - e) at f = p / (M pixel_size) = p * inv_box_A: chi (hundreds of radians at high
// defocus) is formed and reduced modulo 2 pi in double precision, its sine taken in single precision.
// No full-grid CTF image is computed or read.
__device__ __forceinline__ float ctf_from_coefficients(const double* __restrict__ c, int px, int py, double inv_box_A)
{
    const double fx = (double)px * inv_box_A, fy = (double)py * inv_box_A;
    const double u2 = fx * fx + fy * fy;
    const double chi = -(c[0] * u2 + c[1] * (fx * fx - fy * fy) + c[2] * 2.0 * fx * fy) + c[3] * u2 * u2 - c[4];
    const double turns = rint(chi * 0.15915494309189535);          // chi / (2 pi)
    const float reduced = (float)fma(-turns, 6.283185307179586, chi);
    return -sinf(reduced);
}

extern "C" __global__ void pack_projections(const float2* __restrict__ ft, const float* __restrict__ aux,
                                            const double* __restrict__ shift, float4* __restrict__ out,
                                            const int B, const int M, const int Mh, const int K, const int kmax2,
                                            const int Kp, const int mode, const double* __restrict__ ctfp,
                                            const double inv_box_A)
{
    const int W = 2 * Kp + 1;
    const size_t total = (size_t)B * W * W;
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    const int b = (int)(i / ((size_t)W * W));
    const int rem = (int)(i - (size_t)b * W * W);
    const int py = rem / W - Kp;
    const int px = rem % W - Kp;
    if (px * px + py * py > kmax2 || abs(px) > K || abs(py) > K) {
        out[i] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        return;
    }
    int ax = px, ay = py;
    float sg = 1.0f;
    if (px < 0) { ax = -px; ay = -py; sg = -1.0f; }
    const size_t j = (size_t)b * M * Mh + (size_t)(ay < 0 ? ay + M : ay) * Mh + ax;
    float2 f = ft[j];
    f.y *= sg;
    if (shift != nullptr) {   // content moves by +shift and its centre goes to the origin: exp(-2 pi i p.s'/M)
        const double ang = -6.283185307179586 * ((double)px * shift[2 * b] + (double)py * shift[2 * b + 1]) / M;
        double sn, cs;
        sincos(ang, &sn, &cs);
        const float c = (float)cs, s = (float)sn;
        f = make_float2(f.x * c - f.y * s, f.x * s + f.y * c);
    }
    float w = 1.0f;
    float c = 1.0f;
    if (mode >= 1 && mode <= 3) c = (ctfp != nullptr) ? ctf_from_coefficients(ctfp + 5 * b, px, py, inv_box_A) : aux[j];
    if (mode == 1) {
        f.x *= c; f.y *= c; w = c * c;
    } else if (mode == 2) {
        w = c * c;
    } else if (mode == 3) {
        c = c < 0.0f ? -1.0f : 1.0f;
        f.x *= c; f.y *= c;
    } else if (mode == 4) {
        w = aux[j];
    }
    out[i] = make_float4(f.x, f.y, w, 0.0f);
}

// ---- the prologue shared by the insertion kernels (insert_gather, insert_gather_coop) ----

// Blob value at squared distance d2 (pixels^2, d2 <= r^2): on the fly (BLOB_MODE 0), from the (value,
// slope) table through the L1/texture path (1) or from the table copied into shared memory (2).
template <int BLOB_MODE, int ORDER>
__device__ __forceinline__ float blob_weight(float d2, float inv_r2, float alpha, float inv_norm,
                                             const float2* __restrict__ table2, const float* s_table,
                                             int last, float table_scale)
{
    if (BLOB_MODE == 0) return blob_on_the_fly<ORDER>(d2, inv_r2, alpha, inv_norm);
    const float tt = d2 * table_scale;
    const int ti = min((int)tt, last);
    const float tf = tt - (float)ti;
    if (BLOB_MODE == 1) {
        const float2 tb = __ldg(table2 + ti);
        return fmaf(tf, tb.y, tb.x);
    }
    const float t0 = s_table[ti];
    return fmaf(tf, s_table[min(ti + 1, last)] - t0, t0);
}

// Copies the blob table into shared memory (BLOB_MODE 2; no-op otherwise); the tile loop's first
// __syncthreads orders it before any read.
template <int BLOB_MODE>
__device__ __forceinline__ void stage_blob_table(float* s_table, const float* __restrict__ table, const int table_n,
                                                 const int tid, const int nthreads)
{
    if (BLOB_MODE == 2) {
        for (int i = tid; i < table_n; i += nthreads) s_table[i] = table[i];
    }
}

// This thread's column: face coordinates (u fastest): axis 2 -> (kx, ky), axis 1 -> (kx, kz),
// axis 0 -> (ky, kz), and the range [c_lo, c_hi] of the column inside the sphere |k|^2 <= kmax2 and
// the box |k_i| <= K (only kx >= 0 along x). Returns false (c_hi < c_lo) when the column is outside.
__device__ __forceinline__ bool column_range(const int axis, const int K, const int kmax2,
                                             int& u, int& v, int& c_lo, int& c_hi)
{
    u = ((axis == 0) ? -K : 0) + (int)(blockIdx.x * blockDim.x + threadIdx.x);
    v = -K + (int)(blockIdx.y * blockDim.y + threadIdx.y);
    c_lo = 0;
    c_hi = -1;
    if (u > K || v > K) return false;
    const int rem = kmax2 - u * u - v * v;
    if (rem < 0) return false;
    int cs = (int)floorf(sqrtf((float)rem));
    while ((cs + 1) * (cs + 1) <= rem) ++cs;
    while (cs * cs > rem) --cs;
    cs = min(cs, K);
    c_hi = cs;
    c_lo = (axis == 0) ? 0 : -cs;
    return true;
}

// This block's replica: its contiguous share [e_begin, e_end) of the entries; returns the offset of
// its replica of data/weight (replica_stride elements apart).
__device__ __forceinline__ size_t replica_share(const int n_entries, const long long replica_stride,
                                                int& e_begin, int& e_end)
{
    e_begin = (int)(((long long)n_entries * blockIdx.z) / gridDim.z);
    e_end = (int)(((long long)n_entries * (blockIdx.z + 1)) / gridDim.z);
    return (size_t)blockIdx.z * (size_t)replica_stride;
}

// Stages the rotations and image indices of entries [base, base + nt) in shared memory, between two
// barriers (the first one: every thread is done with the previous tile).
__device__ __forceinline__ void stage_entry_tile(float (*s_mat)[9], int* s_img, const float* __restrict__ mats,
                                                 const int* __restrict__ img, const int base, const int nt,
                                                 const int tid, const int nthreads)
{
    __syncthreads();
    for (int i = tid; i < nt * 9; i += nthreads) s_mat[i / 9][i % 9] = mats[(size_t)base * 9 + i];
    for (int i = tid; i < nt; i += nthreads) s_img[i] = img[base + i];
    __syncthreads();
}

// The voxels [c0, c1] of column (u, v) inside entry A's slab |q_z| <= r (c0 > c1: none), clipped to
// [c_lo, c_hi].
__device__ __forceinline__ void slab_range(const float* A, const int axis, const int u, const int v, const float r,
                                           const int c_lo, const int c_hi, int& c0, int& c1)
{
    float nc, nu, nv;
    if (axis == 2) { nc = A[8]; nu = A[6]; nv = A[7]; }
    else if (axis == 1) { nc = A[7]; nu = A[6]; nv = A[8]; }
    else { nc = A[6]; nu = A[7]; nv = A[8]; }
    const float t = nu * (float)u + nv * (float)v;
    const float inv = 1.0f / nc;
    const float a = (-r - t) * inv, b = (r - t) * inv;
    c0 = max((int)ceilf(fminf(a, b)), c_lo);
    c1 = min((int)floorf(fmaxf(a, b)), c_hi);
}

// Voxel k = (kx, ky, kz) at place c of column (u, v), and its position q = A k in the projection frame.
__device__ __forceinline__ void column_voxel(const float* A, const int axis, const int u, const int v, const int c,
                                             int& kx, int& ky, int& kz, float& qx, float& qy, float& qz)
{
    if (axis == 2) { kx = u; ky = v; kz = c; }
    else if (axis == 1) { kx = u; ky = c; kz = v; }
    else { kx = c; ky = u; kz = v; }
    const float fx = (float)kx, fy = (float)ky, fz = (float)kz;
    qx = A[0] * fx + A[1] * fy + A[2] * fz;
    qy = A[3] * fx + A[4] * fy + A[5] * fz;
    qz = A[6] * fx + A[7] * fy + A[8] * fz;
}

// One read-modify-write of voxel k (skipped when nothing was gathered).
__device__ __forceinline__ void add_to_voxel(float2* __restrict__ data, float* __restrict__ weight, const int kx,
                                             const int ky, const int kz, const int M, const int Mh, const float sre,
                                             const float sim, const float sw)
{
    if (sw != 0.0f || sre != 0.0f || sim != 0.0f) {
        const size_t vox = ((size_t)wrap_index(kz, M) * M + wrap_index(ky, M)) * Mh + kx;
        float2 d = data[vox];
        d.x += sre;
        d.y += sim;
        data[vox] = d;
        weight[vox] += sw;
    }
}

template <int TILE, int BLOB_MODE, int ORDER>
__global__ void insert_gather(float2* __restrict__ data, float* __restrict__ weight,
                              const float4* __restrict__ proj,
                              const float* __restrict__ mats, const int* __restrict__ img,
                              const int n_entries, const int axis, const long long replica_stride,
                              const int K, const int kmax2, const int M, const int Mh, const int Kp,
                              const float r, const float r2, const float alpha, const float inv_norm,
                              const float* __restrict__ table, const float2* __restrict__ table2,
                              const int table_n, const float table_scale)
{
    extern __shared__ float s_table[];
    __shared__ float s_mat[TILE][9];
    __shared__ int s_img[TILE];

    const int nthreads = blockDim.x * blockDim.y;
    const int tid = threadIdx.y * blockDim.x + threadIdx.x;
    stage_blob_table<BLOB_MODE>(s_table, table, table_n, tid, nthreads);
    int u, v, c_lo, c_hi;
    const bool active = column_range(axis, K, kmax2, u, v, c_lo, c_hi);
    const int W = 2 * Kp + 1;
    const size_t plane = (size_t)W * W;
    const float inv_r2 = 1.0f / r2;
    const int last = table_n - 1;
    int e_begin, e_end;
    const size_t replica = replica_share(n_entries, replica_stride, e_begin, e_end);
    data += replica;
    weight += replica;

    for (int base = e_begin; base < e_end; base += TILE) {
        const int nt = min(TILE, e_end - base);
        stage_entry_tile(s_mat, s_img, mats, img, base, nt, tid, nthreads);
        if (!active) continue;
        for (int e = 0; e < nt; ++e) {
            const float* A = s_mat[e];
            int c0, c1;
            slab_range(A, axis, u, v, r, c_lo, c_hi, c0, c1);
            if (c0 > c1) continue;
            const float4* P = proj + (size_t)s_img[e] * plane + (size_t)Kp * W + Kp;   // pixel (0, 0)
            for (int c = c0; c <= c1; ++c) {
                int kx, ky, kz;
                float qx, qy, qz;
                column_voxel(A, axis, u, v, c, kx, ky, kz, qx, qy, qz);
                const float qz2 = qz * qz;
                if (qz2 > r2) continue;
                const float rp = sqrtf(r2 - qz2);
                const int y0 = (int)ceilf(qy - rp), y1 = (int)floorf(qy + rp);
                float sre = 0.0f, sim = 0.0f, sw = 0.0f;
                for (int py = y0; py <= y1; ++py) {
                    const float dy = (float)py - qy;
                    const float dyz = fmaf(dy, dy, qz2);
                    const float rx2 = r2 - dyz;
                    if (rx2 < 0.0f) continue;
                    const float rx = sqrtf(rx2);
                    const int x0 = (int)ceilf(qx - rx), x1 = (int)floorf(qx + rx);
                    const float4* row = P + (long long)py * W;
                    for (int px = x0; px <= x1; ++px) {
                        const float dx = (float)px - qx;
                        const float d2 = fmaf(dx, dx, dyz);
                        const float w = blob_weight<BLOB_MODE, ORDER>(d2, inv_r2, alpha, inv_norm, table2, s_table,
                                                                      last, table_scale);
                        const float4 p = __ldg(row + px);
                        sre = fmaf(w, p.x, sre);
                        sim = fmaf(w, p.y, sim);
                        sw = fmaf(w, p.z, sw);
                    }
                }
                add_to_voxel(data, weight, kx, ky, kz, M, Mh, sre, sim, sw);
            }
        }
    }
}

// Cooperative variant: the same columns, voxels and pixels as insert_gather, but LPV lanes of a
// warp share one voxel. For each entry the lanes compute their column's slab range, a warp scan
// turns the ranges into one list of (column, c) voxels, and the warp walks that list 32 / LPV voxels
// at a time; the LPV lanes of a voxel cover the n_p x n_p candidate square of its blob (n_p =
// floor(2 r) + 1) with a fixed, branch-free trip count, read neighbouring pixels of the same rows
// (coalesced), keep those with d^2 <= r^2 and reduce their sums with shuffles; the voxel's first lane
// does the read-modify-write. A voxel still belongs to one column owned by one warp: no atomics.
//
// NP > 0: the candidate square has the compile-time side NP (= floor(2 r) + 1, 4 for the default
// radius 1.9) and each lane's ceil(NP^2 / LPV) candidates are unrolled: all their pixel and table
// loads are issued before the sums (more loads in flight per thread: the kernel is latency bound),
// branch-free (pixels beyond the radius get weight 0; every candidate lies inside the packed margin).
// NP = 0: the candidate loop runs with a run-time trip count (any radius).
template <int TILE, int BLOB_MODE, int ORDER, int LPV, int NP>
__global__ void insert_gather_coop(float2* __restrict__ data, float* __restrict__ weight,
                                   const float4* __restrict__ proj,
                                   const float* __restrict__ mats, const int* __restrict__ img,
                                   const int n_entries, const int axis, const long long replica_stride,
                                   const int K, const int kmax2, const int M, const int Mh, const int Kp,
                                   const float r, const float r2, const float alpha, const float inv_norm,
                                   const float* __restrict__ table, const float2* __restrict__ table2,
                                   const int table_n, const float table_scale)
{
    extern __shared__ float s_table[];
    __shared__ float s_mat[TILE][9];
    __shared__ int s_img[TILE];

    const int nthreads = blockDim.x * blockDim.y;
    const int tid = threadIdx.y * blockDim.x + threadIdx.x;
    const int lane = tid & 31;
    stage_blob_table<BLOB_MODE>(s_table, table, table_n, tid, nthreads);
    int u, v, c_lo, c_hi;
    column_range(axis, K, kmax2, u, v, c_lo, c_hi);   // outside: c_hi < c_lo, no voxel (every lane still
                                                      // takes part in the warp's shuffles)
    const int W = 2 * Kp + 1;
    const size_t plane = (size_t)W * W;
    const float inv_r2 = 1.0f / r2;
    const int last = table_n - 1;
    const int n_p = (int)floorf(2.0f * r) + 1;       // candidate pixels per axis of a blob
    const int n_p2 = n_p * n_p;
    const int sub = lane % LPV;                      // this lane's place among its voxel's lanes
    const int group = lane / LPV;                    // which voxel of a step this lane works on
    const int GROUPS = 32 / LPV;
    int e_begin, e_end;
    const size_t replica = replica_share(n_entries, replica_stride, e_begin, e_end);
    data += replica;
    weight += replica;

    for (int base = e_begin; base < e_end; base += TILE) {
        const int nt = min(TILE, e_end - base);
        stage_entry_tile(s_mat, s_img, mats, img, base, nt, tid, nthreads);
        for (int e = 0; e < nt; ++e) {
            const float* A = s_mat[e];
            int c0, c1;
            slab_range(A, axis, u, v, r, c_lo, c_hi, c0, c1);
            const int cnt = max(c1 - c0 + 1, 0);
            int incl = cnt;                                  // inclusive warp scan of the counts
            for (int o = 1; o < 32; o <<= 1) {
                const int y = __shfl_up_sync(0xffffffffu, incl, o);
                if (lane >= o) incl += y;
            }
            const int total = __shfl_sync(0xffffffffu, incl, 31);
            if (total == 0) continue;
            const int cbase = c0 - (incl - cnt);             // voxel j of this column has c = cbase + j
            const float4* P = proj + (size_t)s_img[e] * plane + (size_t)Kp * W + Kp;   // pixel (0, 0)
            for (int s0 = 0; s0 < total; s0 += GROUPS) {
                unsigned owners[32 / LPV];
#pragma unroll
                for (int g = 0; g < 32 / LPV; ++g) owners[g] = __ballot_sync(0xffffffffu, incl <= s0 + g);
                const int j = s0 + group;
                unsigned mine = owners[0];
#pragma unroll
                for (int g = 1; g < 32 / LPV; ++g) if (group == g) mine = owners[g];
                const int owner = min(__popc(mine), 31);
                const int oc = __shfl_sync(0xffffffffu, cbase, owner) + j;
                const int ou = __shfl_sync(0xffffffffu, u, owner);
                const int ov = __shfl_sync(0xffffffffu, v, owner);
                int kx, ky, kz;
                float qx, qy, qz;
                column_voxel(A, axis, ou, ov, oc, kx, ky, kz, qx, qy, qz);
                const float qz2 = qz * qz;
                const bool live = (j < total) && (qz2 <= r2);
                const int x0 = (int)ceilf(qx - r), y0 = (int)ceilf(qy - r);
                float sre = 0.0f, sim = 0.0f, sw = 0.0f;
                if (live && NP > 0) {
                    constexpr int SIDE = NP > 0 ? NP : 1;       // NP = 0 never reaches here; keeps it compiling
                    constexpr int PER = (SIDE * SIDE + LPV - 1) / LPV;
                    float wv[PER];
                    float4 pv[PER];
#pragma unroll
                    for (int t = 0; t < PER; ++t) {
                        const int ci0 = sub + t * LPV;
                        const bool in_square = (SIDE * SIDE % LPV == 0) || (ci0 < SIDE * SIDE);
                        const int ci = in_square ? ci0 : 0;
                        const int py = y0 + ci / SIDE, px = x0 + ci % SIDE;
                        const float dy = (float)py - qy;
                        const float dx = (float)px - qx;
                        const float d2 = fmaf(dx, dx, fmaf(dy, dy, qz2));
                        const bool inside = in_square && (d2 <= r2);
                        wv[t] = blob_weight<BLOB_MODE, ORDER>(fminf(d2, r2), inv_r2, alpha, inv_norm, table2,
                                                              s_table, last, table_scale);
                        wv[t] = inside ? wv[t] : 0.0f;
                        pv[t] = __ldg(P + (long long)py * W + px);
                    }
#pragma unroll
                    for (int t = 0; t < PER; ++t) {
                        sre = fmaf(wv[t], pv[t].x, sre);
                        sim = fmaf(wv[t], pv[t].y, sim);
                        sw = fmaf(wv[t], pv[t].z, sw);
                    }
                } else if (live) {
                    for (int ci = sub; ci < n_p2; ci += LPV) {
                        const int py = y0 + ci / n_p, px = x0 + ci % n_p;
                        const float dy = (float)py - qy;
                        const float dyz = fmaf(dy, dy, qz2);
                        const float dx = (float)px - qx;
                        const float d2 = fmaf(dx, dx, dyz);
                        if (d2 <= r2) {
                            const float w = blob_weight<BLOB_MODE, ORDER>(d2, inv_r2, alpha, inv_norm, table2,
                                                                          s_table, last, table_scale);
                            const float4 p = __ldg(P + (long long)py * W + px);
                            sre = fmaf(w, p.x, sre);
                            sim = fmaf(w, p.y, sim);
                            sw = fmaf(w, p.z, sw);
                        }
                    }
                }
#pragma unroll
                for (int o = LPV / 2; o > 0; o >>= 1) {
                    sre += __shfl_xor_sync(0xffffffffu, sre, o);
                    sim += __shfl_xor_sync(0xffffffffu, sim, o);
                    sw += __shfl_xor_sync(0xffffffffu, sw, o);
                }
                if (live && sub == 0) add_to_voxel(data, weight, kx, ky, kz, M, Mh, sre, sim, sw);
            }
            __syncwarp();   // the next entry may give this voxel to another lane of the warp: order the writes
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
    // 3-D thread blocks: the voxels of a block stay close together once rotated, so the taps of
    // one operator fall in a few cache lines (a flat 1-D block would map to a rotated line).
    const int kx = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    const int iy = (int)(blockIdx.y * blockDim.y + threadIdx.y);
    const int iz = (int)(blockIdx.z * blockDim.z + threadIdx.z);
    if (kx >= Mh || iy >= M || iz >= M) return;
    const size_t i = ((size_t)iz * M + iy) * Mh + kx;
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
        // the 8 taps unrolled and branch-free: all 16 loads issued before the sums (latency bound, like
        // the insertion); taps outside the written box get weight 0 and read voxel 0 (x0 >= 0 as rx >= 0)
        float2 d[8];
        float wv[8], tw[8];
#pragma unroll
        for (int t = 0; t < 8; ++t) {
            const int cx = x0 + (t & 1), cy = y0 + ((t >> 1) & 1), cz = z0 + (t >> 2);
            const bool inside = (cx <= K) && (abs(cy) <= K) && (abs(cz) <= K);
            const float w = ((t & 1) ? tx : 1.0f - tx) * (((t >> 1) & 1) ? ty : 1.0f - ty) * ((t >> 2) ? tz : 1.0f - tz);
            tw[t] = inside ? w : 0.0f;
            const size_t j = inside ? ((size_t)wrap_index(cz, M) * M + wrap_index(cy, M)) * Mh + cx : 0;
            d[t] = __ldg(data + j);
            wv[t] = __ldg(weight + j);
        }
#pragma unroll
        for (int t = 0; t < 8; ++t) {
            sre = fmaf(tw[t], d[t].x, sre);
            sim = fmaf(sgn * tw[t], d[t].y, sim);
            sw = fmaf(tw[t], wv[t], sw);
        }
    }
    out_data[i] = make_float2(sre, sim);
    out_weight[i] = sw;
}
