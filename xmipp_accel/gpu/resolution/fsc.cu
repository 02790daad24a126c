// Shell sums for the Fourier shell correlation of two half maps.
//
// Inputs are the non-redundant halves (rfftn layout, shape (nz, ny, nx/2+1)) of two
// real maps of shape (nz, ny, nx). For every Fourier voxel the kernel computes the
// shell index round(|k| * nref) with k in cycles/pixel (k_axis = index / n_axis,
// signed along z and y), and adds, with the Hermitian weight (1 on the planes x = 0
// and x = nx/2 that hold their own mirror, 2 elsewhere):
//     sums[0 * nshell + s] += w * Re(F1 conj(F2))
//     sums[1 * nshell + s] += w * |F1|^2
//     sums[2 * nshell + s] += w * |F2|^2
//     sums[3 * nshell + s] += w                      (voxels of the full sphere)
// Voxels with s >= nshell (the corners beyond Nyquist) are skipped. An optional cone
// (unit axis (cx, cy, cz) in x, y, z order, cos_half_angle > -1) keeps only voxels whose
// wave vector is within the double cone |k . c| >= cos_half_angle * |k| (the DC voxel is
// always kept).
//
// Each block accumulates privately in shared memory (ACC = float for complex64 input,
// double for complex128), then adds its partial sums to the double-precision output with
// global atomics. Sizes are run-time arguments (no recompilation per box). The NumPy twin
// is xmipp_accel.gpu.resolution.fsc._shell_sums_xp.
#include <cupy/complex.cuh>

template <typename T, typename ACC>
__device__ void shell_sums_impl(const complex<T>* __restrict__ f1, const complex<T>* __restrict__ f2,
                                unsigned int nz, unsigned int ny, unsigned int nxh, unsigned int nx,
                                double scale_z, double scale_y, double scale_x, int nshell,
                                double cx, double cy, double cz, double cos_half_angle,
                                double* __restrict__ sums)
{
    extern __shared__ __align__(8) unsigned char shared_raw[];
    ACC* acc = reinterpret_cast<ACC*>(shared_raw);
    for (int i = threadIdx.x; i < 4 * nshell; i += blockDim.x) acc[i] = ACC(0);
    __syncthreads();

    const unsigned int total = nz * ny * nxh;
    const unsigned int stride = gridDim.x * blockDim.x;
    const bool use_cone = cos_half_angle > -1.0;
    const bool nx_even = (nx % 2u) == 0u;
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        const unsigned int x = i % nxh;
        const unsigned int row = i / nxh;
        const unsigned int y = row % ny;
        const unsigned int z = row / ny;
        // shell index in double with explicit rounding (no FMA contraction): bit-identical to the
        // NumPy twin's  floor(sqrt(kz*kz + ky*ky + kx*kx) + 0.5)
        const double kx = __dmul_rn(double(x), scale_x);
        const double ky = __dmul_rn(double(2u * y < ny ? int(y) : int(y) - int(ny)), scale_y);
        const double kz = __dmul_rn(double(2u * z < nz ? int(z) : int(z) - int(nz)), scale_z);
        const double r2 = __dadd_rn(__dadd_rn(__dmul_rn(kz, kz), __dmul_rn(ky, ky)), __dmul_rn(kx, kx));
        const double r = sqrt(r2);
        const int s = int(floor(__dadd_rn(r, 0.5)));
        if (s >= nshell) continue;
        if (use_cone && r2 > 0.0) {
            const double proj = fabs(__dadd_rn(__dadd_rn(__dmul_rn(kx, cx), __dmul_rn(ky, cy)), __dmul_rn(kz, cz)));
            if (proj < __dmul_rn(cos_half_angle, r)) continue;
        }
        const ACC w = (x == 0u || (nx_even && 2u * x == nx)) ? ACC(1) : ACC(2);
        const complex<T> a = f1[i];
        const complex<T> b = f2[i];
        const ACC cross = ACC(a.real()) * ACC(b.real()) + ACC(a.imag()) * ACC(b.imag());
        const ACC p1 = ACC(a.real()) * ACC(a.real()) + ACC(a.imag()) * ACC(a.imag());
        const ACC p2 = ACC(b.real()) * ACC(b.real()) + ACC(b.imag()) * ACC(b.imag());
        atomicAdd(&acc[s], w * cross);
        atomicAdd(&acc[nshell + s], w * p1);
        atomicAdd(&acc[2 * nshell + s], w * p2);
        atomicAdd(&acc[3 * nshell + s], w);
    }
    __syncthreads();
    for (int i = threadIdx.x; i < 4 * nshell; i += blockDim.x) {
        const ACC v = acc[i];
        if (v != ACC(0)) atomicAdd(&sums[i], double(v));
    }
}

extern "C" __global__ void fsc_shell_sums_complex64(
    const complex<float>* f1, const complex<float>* f2, unsigned int nz, unsigned int ny, unsigned int nxh,
    unsigned int nx, double scale_z, double scale_y, double scale_x, int nshell, double cx, double cy, double cz,
    double cos_half_angle, double* sums)
{
    shell_sums_impl<float, float>(f1, f2, nz, ny, nxh, nx, scale_z, scale_y, scale_x, nshell,
                                  cx, cy, cz, cos_half_angle, sums);
}

extern "C" __global__ void fsc_shell_sums_complex128(
    const complex<double>* f1, const complex<double>* f2, unsigned int nz, unsigned int ny, unsigned int nxh,
    unsigned int nx, double scale_z, double scale_y, double scale_x, int nshell, double cx, double cy, double cz,
    double cos_half_angle, double* sums)
{
    shell_sums_impl<double, double>(f1, f2, nz, ny, nxh, nx, scale_z, scale_y, scale_x, nshell,
                                    cx, cy, cz, cos_half_angle, sums);
}
