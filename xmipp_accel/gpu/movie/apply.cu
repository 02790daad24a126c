// Local motion correction of movie frames: out[f](p) = frames[f](p - s_f(p)), Keys cubic convolution
// (correct_local_motion) or bilinear interpolation (correct_local_motion_linear).
// Both entry points run one template, correct_pixel<Interp>, with the interpolation's taps and weights.
//
// s_f(p) is a cubic B-spline over the frame: control point j along an axis sits at (j - 1) h, and the
// shift at pixel (x, y) is sum_{j,i} C[f, c, j, i] beta3(y/hy - (j-1)) beta3(x/hx - (i-1)), c = 0 (x), 1 (y).
// Only the 4 x 4 control points around the pixel contribute. Sizes are run-time arguments (one compile).
// NumPy twin: apply.py correct_local_motion_reference.

__device__ __forceinline__ float beta3(float u) {
    float a = fabsf(u);
    if (a < 1.0f) return 2.0f / 3.0f - a * a + 0.5f * a * a * a;
    if (a < 2.0f) { float b = 2.0f - a; return b * b * b / 6.0f; }
    return 0.0f;
}

// The shift (pixels) of frame f at pixel (x, y): the 4 x 4 active control points of its B-spline.
__device__ __forceinline__ void local_shift(const float* __restrict__ coef, int f, int x, int y, int lx, int ly,
                                            float inv_hx, float inv_hy, float* sx_out, float* sy_out) {
    const float* cxs = coef + (size_t)f * 2 * ly * lx;
    const float* cys = cxs + (size_t)ly * lx;

    float u = x * inv_hx, v = y * inv_hy;
    int iu = (int)floorf(u), iv = (int)floorf(v);
    float bx[4], by[4];
    #pragma unroll
    for (int k = 0; k < 4; ++k) {
        int jx = iu + k, jy = iv + k;
        bx[k] = (jx >= 0 && jx < lx) ? beta3(u - (float)(jx - 1)) : 0.0f;
        by[k] = (jy >= 0 && jy < ly) ? beta3(v - (float)(jy - 1)) : 0.0f;
    }
    float sx = 0.0f, sy = 0.0f;
    #pragma unroll
    for (int a = 0; a < 4; ++a) {
        int jy = iv + a;
        if (jy < 0 || jy >= ly) continue;
        float rx = 0.0f, ry = 0.0f;
        #pragma unroll
        for (int b = 0; b < 4; ++b) {
            int jx = iu + b;
            if (jx < 0 || jx >= lx) continue;
            rx += bx[b] * cxs[jy * lx + jx];
            ry += bx[b] * cys[jy * lx + jx];
        }
        sx += by[a] * rx;
        sy += by[a] * ry;
    }

    *sx_out = sx;
    *sy_out = sy;
}

// The interpolations, each its taps per axis, the offset of its first tap from floor(p) and its weights at
// the fractional part t of the sample position: Keys cubic convolution (a = -0.5) and bilinear.
struct KeysInterpolation {
    static constexpr int TAPS = 4;
    static constexpr int FIRST = -1;
    __device__ __forceinline__ static void weights(float t, float w[TAPS]) {
        float t2 = t * t, t3 = t2 * t;
        w[0] = -0.5f * t3 + t2 - 0.5f * t;
        w[1] = 1.5f * t3 - 2.5f * t2 + 1.0f;
        w[2] = -1.5f * t3 + 2.0f * t2 + 0.5f * t;
        w[3] = 0.5f * t3 - 0.5f * t2;
    }
};

struct LinearInterpolation {
    static constexpr int TAPS = 2;
    static constexpr int FIRST = 0;
    __device__ __forceinline__ static void weights(float t, float w[TAPS]) {
        w[0] = 1.0f - t;
        w[1] = t;
    }
};

// One output pixel (x, y) of frame f: frames[f] sampled at p - s_f(p) with Interp's TAPS x TAPS weights,
// sample indices clamped to the frame.
template <class Interp>
__device__ __forceinline__ void correct_pixel(const float* __restrict__ frames, float* __restrict__ out,
                                              const float* __restrict__ coef, int nx, int ny, int lx, int ly,
                                              float inv_hx, float inv_hy) {
    constexpr int T = Interp::TAPS;
    int x = blockIdx.x * blockDim.x + threadIdx.x;
    int y = blockIdx.y * blockDim.y + threadIdx.y;
    int f = blockIdx.z;
    if (x >= nx || y >= ny) return;
    float sx, sy;
    local_shift(coef, f, x, y, lx, ly, inv_hx, inv_hy, &sx, &sy);

    float px = (float)x - sx, py = (float)y - sy;
    float fx = floorf(px), fy = floorf(py);
    float wx[T], wy[T];
    Interp::weights(px - fx, wx);
    Interp::weights(py - fy, wy);
    int ix = (int)fx, iy = (int)fy;
    const float* fr = frames + (size_t)f * nx * ny;
    int cols[T];
    #pragma unroll
    for (int b = 0; b < T; ++b) cols[b] = min(max(ix + b + Interp::FIRST, 0), nx - 1);
    float acc = 0.0f;
    #pragma unroll
    for (int a = 0; a < T; ++a) {
        int yy = min(max(iy + a + Interp::FIRST, 0), ny - 1);
        const float* row = fr + (size_t)yy * nx;
        float r = 0.0f;
        #pragma unroll
        for (int b = 0; b < T; ++b) r += wx[b] * __ldg(row + cols[b]);
        acc += wy[a] * r;
    }
    out[(size_t)f * nx * ny + (size_t)y * nx + x] = acc;
}

// The entry points apply.py launches (extern "C": unmangled names for CuPy's RawModule.get_function).
extern "C" __global__ void correct_local_motion(const float* __restrict__ frames, float* __restrict__ out,
                                                const float* __restrict__ coef, int nx, int ny, int lx, int ly,
                                                float inv_hx, float inv_hy) {
    correct_pixel<KeysInterpolation>(frames, out, coef, nx, ny, lx, ly, inv_hx, inv_hy);
}

extern "C" __global__ void correct_local_motion_linear(const float* __restrict__ frames, float* __restrict__ out,
                                                       const float* __restrict__ coef, int nx, int ny, int lx,
                                                       int ly, float inv_hx, float inv_hy) {
    correct_pixel<LinearInterpolation>(frames, out, coef, nx, ny, lx, ly, inv_hx, inv_hy);
}
