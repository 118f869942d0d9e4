// The augmentation's affine (or perspective) resampling: the sampling grid of a batch of 3×3 maps, and the whole
// resampling in one pass (grid, then `grid_sample`'s bilinear or nearest taps with its three padding modes).
#include "common.h"
#include "ops.h"

// (x/z, y/z) for (x, y, z) = (a·u + b) over the normalised output coordinates u of one row, interleaved in o
static void __attribute__((noinline)) grid_row(const float* __restrict__ u, float ax, float ay, float az, float bx, float by,
                                               float bz, float* __restrict__ o, int64_t W) {
  for (int64_t j = 0; j < W; ++j) {
    float x = ax * u[j] + bx, y = ay * u[j] + by, z = az * u[j] + bz;
    o[2 * j] = x / z; o[2 * j + 1] = y / z;
  }
}
// the row r = (n, oh) of the grid of maps m (N, 3, 3) over output coordinates us (W) and vs (H)
static inline void grid_row_of(const float* m, const float* us, const float* vs, int64_t r, int64_t H, int64_t W, float* o) {
  const float* M = m + (r / H) * 9;
  const float v = vs[r % H];
  grid_row(us, M[0], M[3], M[6], M[1] * v + M[2], M[4] * v + M[5], M[7] * v + M[8], o, W);
}

static void check_maps(const at::Tensor& m, const at::Tensor& us, const at::Tensor& vs, const char* what) {
  TORCH_CHECK(m.device().is_cpu() && m.dim() == 3 && m.size(1) == 3 && m.size(2) == 3 && m.scalar_type() == at::kFloat,
              "moonfast ", what, ": expected (N, 3, 3) float32 CPU matrices, got ", m.sizes(), " ", m.scalar_type());
  TORCH_CHECK(us.device().is_cpu() && vs.device().is_cpu() && us.dim() == 1 && vs.dim() == 1 && us.scalar_type() == at::kFloat &&
              vs.scalar_type() == at::kFloat && us.numel() > 0 && vs.numel() > 0,
              "moonfast ", what, ": expected non-empty 1-d float32 CPU output coordinates");
}

// m: (N, 3, 3) float32; us: W and vs: H normalised output coordinates. Returns (N, H, W, 2): (x/z, y/z) for
// (x, y, z) = m · (u, v, 1), the grid `F.grid_sample` takes (z is exactly 1 for an affine map, so x/z is x).
at::Tensor affine_grid(const at::Tensor& m_, const at::Tensor& us_, const at::Tensor& vs_) {
  check_maps(m_, us_, vs_, "affine_grid");
  auto m = m_.contiguous(), us = us_.contiguous(), vs = vs_.contiguous();
  const int64_t N = m.size(0), H = vs.size(0), W = us.size(0);
  auto out = at::empty({N, H, W, 2}, m.options());
  const float *mp = m.data_ptr<float>(), *up = us.data_ptr<float>(), *vp = vs.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N * H, 16, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) grid_row_of(mp, up, vp, r, H, W, op + r * W * 2);
  });
  return out;
}

// ---- the resampling in one pass ----
// The input is first copied with its channels interleaved in groups of 4 (a pixel of a group is one 16-byte vector)
// and a zero border (1 pixel before, 2 after each row and column). A bilinear output pixel is then two 32-byte loads
// (its 2×2 taps, all 4 channels) and a few vector products, where `grid_sample` gathers each tap of each channel.
// Coordinates are clipped so that every tap is inside the bordered plane: the zeros mode's out-of-range taps read
// the border (coordinates -1 and `size`), the others clip to [0, size - 1] first, as `grid_sample` does.

enum Pad { ZEROS = 0, BORDER = 1, REFLECTION = 2 };
constexpr float BIG = 4194304.f;   // 2^22: coordinates are held within ±BIG, where floats still tell pixels apart

// floor and round-half-even (std::nearbyint's rounding) of |v| <= 2^23, as int32: loops of std::floor or
// std::nearbyint only vectorise with -fno-trapping-math. The conditions adjust integers, not floats: a float operation
// under a condition would have to be speculated, which gcc (under the default -ftrapping-math) only does with AVX-512's
// masks, so the loops would run scalar on AVX2.
static inline int32_t ifloor(float v) { const int32_t t = int32_t(v); return t - int32_t(float(t) > v); }
static inline int32_t irint(float v) {   // adding 1.5·2^23 leaves a float whose ulp is 1, rounded to even
  const float m = 12582912.f;
  return int32_t((v + m) - m);
}
// one axis of `s` pixels: reflection about lo and lo + span, and the range coordinates are clipped to
struct Axis {
  float s, lo, span, inv, cmin, cmax;
  Axis(int64_t size, bool ac, int pad) : s(float(size)) {
    lo = ac ? 0.f : -0.5f; span = ac ? s - 1.f : s; inv = 1.f / (span > 0.f ? span : 1.f);
    cmin = pad == ZEROS ? -1.f : 0.f; cmax = pad == ZEROS ? s : s - 1.f;
  }
};
// the pixel coordinate of normalised coordinate g, by `grid_sample`'s rules for its padding mode (NaN: as -BIG)
template <int pad, bool ac>
static inline float source(float g, const Axis& A) {
  float c = ac ? (g + 1.f) / 2.f * (A.s - 1.f) : ((g + 1.f) * A.s - 1.f) / 2.f;
  if (pad == REFLECTION) {   // span 0 (one pixel, align_corners) reflects everything to lo
    // (no constant is added right after a clamp: gcc moves such an addition into the clamp's branches, see ifloor)
    float r = c - A.lo;
    r = r > -BIG ? r : -BIG; r = r < BIG ? r : BIG;
    const float a = std::fabs(r); const int32_t q = ifloor(a * A.inv); const float e = a - float(q) * A.span;
    const float odd = float(q & 1);   // an odd number of reflections: (span − e) + lo, else e + lo, without a branch
    c = (odd * A.span + (1.f - 2.f * odd) * e) + A.lo;
  }
  c = c > -BIG ? c : -BIG; c = c < BIG ? c : BIG;
  c = c > A.cmin ? c : A.cmin; c = c < A.cmax ? c : A.cmax;
  return c;
}

// per output pixel of a row (grid g, interleaved x, y): the pixel offset of its (top-left) tap in the bordered plane
// (rows of W + 3 pixels), and its fractions fx, fy (bilinear)
template <int pad, bool ac, bool nearest>
static void __attribute__((noinline)) taps(const float* __restrict__ g, int64_t OW, int64_t H, int64_t W,
                                           int32_t* __restrict__ i0, float* __restrict__ fx, float* __restrict__ fy) {
  const int32_t W3 = int32_t(W + 3); const Axis ax(W, ac, pad), ay(H, ac, pad);
  for (int64_t j = 0; j < OW; ++j) {
    const float ix = source<pad, ac>(g[2 * j], ax), iy = source<pad, ac>(g[2 * j + 1], ay);
    const int32_t x0 = nearest ? irint(ix) : ifloor(ix), y0 = nearest ? irint(iy) : ifloor(iy);
    fx[j] = ix - float(x0); fy[j] = iy - float(y0);
    i0[j] = (y0 + 1) * W3 + x0 + 1;
  }
}
using TapsFn = void (*)(const float*, int64_t, int64_t, int64_t, int32_t*, float*, float*);
template <bool ac, bool nearest> static TapsFn taps_for(int64_t pad) {
  return pad == ZEROS ? taps<ZEROS, ac, nearest> : pad == BORDER ? taps<BORDER, ac, nearest> : taps<REFLECTION, ac, nearest>;
}

typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));
// the 4 channels of one output pixel: nearest (the pixel at q) or bilinear (the 2×2 block at q, rows W3 pixels apart)
template <bool nearest>
static inline v4 sample4(const float* __restrict__ q, float a, float c, int64_t W3) {
  v4 r;
  if (nearest) { std::memcpy(&r, q, 16); return r; }
  v8 t, b; std::memcpy(&t, q, 32); std::memcpy(&b, q + 4 * W3, 32);
  const float l = 1.f - a; const v8 w = {l, l, l, l, a, a, a, a};
  const v8 s = t * w * (1.f - c) + b * w * c;
  return __builtin_shufflevector(s, s, 0, 1, 2, 3) + __builtin_shufflevector(s, s, 4, 5, 6, 7);
}
// a row of outputs of one group of nc <= 4 channels, from its interleaved bordered plane p, into the channel rows o[k]
template <bool nearest>
static void __attribute__((noinline)) sample_row(const float* __restrict__ p, const int32_t* __restrict__ i0,
    const float* __restrict__ fx, const float* __restrict__ fy, float* const* o, int64_t nc, int64_t OW, int64_t W3) {
  int64_t j = 0;
  for (; j + 4 <= OW; j += 4) {   // 4 pixels, transposed into 4 values of each channel
    v4 r[4];
    for (int k = 0; k < 4; ++k) r[k] = sample4<nearest>(p + 4 * int64_t(i0[j + k]), fx[j + k], fy[j + k], W3);
    const v4 t0 = __builtin_shufflevector(r[0], r[1], 0, 4, 1, 5), t1 = __builtin_shufflevector(r[0], r[1], 2, 6, 3, 7);
    const v4 t2 = __builtin_shufflevector(r[2], r[3], 0, 4, 1, 5), t3 = __builtin_shufflevector(r[2], r[3], 2, 6, 3, 7);
    const v4 c[4] = {__builtin_shufflevector(t0, t2, 0, 1, 4, 5), __builtin_shufflevector(t0, t2, 2, 3, 6, 7),
                     __builtin_shufflevector(t1, t3, 0, 1, 4, 5), __builtin_shufflevector(t1, t3, 2, 3, 6, 7)};
    for (int64_t k = 0; k < nc; ++k) std::memcpy(o[k] + j, &c[k], 16);
  }
  for (; j < OW; ++j) {
    const v4 r = sample4<nearest>(p + 4 * int64_t(i0[j]), fx[j], fy[j], W3);
    for (int64_t k = 0; k < nc; ++k) o[k][j] = r[k];
  }
}

// x: (N, C, H, W) float32; m, us, vs as for affine_grid. Returns (N, C, OH, OW) = F.grid_sample(x, affine_grid(m, us,
// vs), mode, padding_mode, align_corners) with mode bilinear or nearest (`nearest`) and padding_mode zeros, border or
// reflection (`pad` 0, 1, 2), up to float rounding. Taps outside the input contribute nothing in the zeros mode.
at::Tensor affine_sample(const at::Tensor& x_, const at::Tensor& m_, const at::Tensor& us_, const at::Tensor& vs_,
                         bool nearest, int64_t pad, bool ac) {
  check_maps(m_, us_, vs_, "affine_sample");
  TORCH_CHECK(x_.device().is_cpu() && x_.dim() == 4 && x_.scalar_type() == at::kFloat,
              "moonfast affine_sample: expected a 4-d float32 CPU batch (N, C, H, W), got ", x_.sizes(), " ", x_.scalar_type());
  TORCH_CHECK(x_.size(0) == m_.size(0), "moonfast affine_sample: ", x_.size(0), " images but ", m_.size(0), " maps");
  TORCH_CHECK(pad >= ZEROS && pad <= REFLECTION, "moonfast affine_sample: padding must be 0 (zeros), 1 (border) or 2 (reflection), got ", pad);
  const int64_t N = x_.size(0), C = x_.size(1), H = x_.size(2), W = x_.size(3), OH = vs_.size(0), OW = us_.size(0);
  TORCH_CHECK(H > 0 && W > 0 && (H + 3) * (W + 3) < (int64_t(1) << 31), "moonfast affine_sample: input of ", H, "×", W, " pixels");
  auto out = at::empty({N, C, OH, OW}, x_.options());
  if (N == 0 || C == 0) return out;
  auto x = x_.contiguous(), m = m_.contiguous(), us = us_.contiguous(), vs = vs_.contiguous();
  const int64_t G = (C + 3) / 4, W3 = W + 3, P = (H + 3) * W3 * 4;   // groups of 4 channels, a group's bordered plane
  auto xb = at::empty({N * G * P}, x.options());
  float* bp = xb.data_ptr<float>(); const float* xp = x.data_ptr<float>();
  at::parallel_for(0, N * G, 1, [&](int64_t b, int64_t e) {
    for (int64_t q = b; q < e; ++q) {
      const int64_t n = q / G, c0 = (q % G) * 4, nc = std::min<int64_t>(4, C - c0);
      float* d = bp + q * P;
      std::fill(d, d + W3 * 4, 0.f); std::fill(d + (H + 1) * W3 * 4, d + P, 0.f);
      for (int64_t h = 0; h < H; ++h) {
        float* r = d + (h + 1) * W3 * 4;
        std::fill(r, r + 4, 0.f); std::fill(r + (W + 1) * 4, r + W3 * 4, 0.f);
        for (int64_t c = 0; c < 4; ++c) {
          float* rc = r + 4 + c;
          if (c < nc) { const float* s = xp + ((n * C + c0 + c) * H + h) * W; for (int64_t w = 0; w < W; ++w) rc[4 * w] = s[w]; }
          else for (int64_t w = 0; w < W; ++w) rc[4 * w] = 0.f;
        }
      }
    }
  });
  const float *mp = m.data_ptr<float>(), *up = us.data_ptr<float>(), *vp = vs.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const TapsFn tp = nearest ? (ac ? taps_for<true, true>(pad) : taps_for<false, true>(pad))
                            : (ac ? taps_for<true, false>(pad) : taps_for<false, false>(pad));
  at::parallel_for(0, N * OH, 16, [&](int64_t b, int64_t e) {
    std::vector<float> g(2 * OW), f(2 * OW); std::vector<int32_t> idx(OW);
    for (int64_t r = b; r < e; ++r) {
      const int64_t n = r / OH, oh = r % OH;
      grid_row_of(mp, up, vp, r, OH, OW, g.data());
      tp(g.data(), OW, H, W, idx.data(), f.data(), f.data() + OW);
      for (int64_t gi = 0; gi < G; ++gi) {
        const int64_t nc = std::min<int64_t>(4, C - gi * 4);
        float* o[4];
        for (int64_t k = 0; k < nc; ++k) o[k] = op + ((n * C + gi * 4 + k) * OH + oh) * OW;
        const float* pl = bp + (n * G + gi) * P;
        if (nearest) sample_row<true>(pl, idx.data(), f.data(), f.data() + OW, o, nc, OW, W3);
        else sample_row<false>(pl, idx.data(), f.data(), f.data() + OW, o, nc, OW, W3);
      }
    }
  });
  return out;
}
