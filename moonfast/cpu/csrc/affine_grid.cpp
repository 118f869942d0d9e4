#include "common.h"
#include "ops.h"

// ---- sampling grid of a batch of 3×3 maps (affine or perspective) over normalised output coordinates ----
static void __attribute__((noinline)) grid_row(const float* __restrict__ u, float ax, float ay, float az, float bx, float by,
                                               float bz, float* __restrict__ o, int64_t W) {
  for (int64_t j = 0; j < W; ++j) {
    float x = ax * u[j] + bx, y = ay * u[j] + by, z = az * u[j] + bz;
    o[2 * j] = x / z; o[2 * j + 1] = y / z;
  }
}

// m: (N, 3, 3) float32; us: W and vs: H normalised output coordinates. Returns (N, H, W, 2): (x/z, y/z) for
// (x, y, z) = m · (u, v, 1), the grid `F.grid_sample` takes (z is exactly 1 for an affine map, so x/z is x).
at::Tensor affine_grid(const at::Tensor& m_, const at::Tensor& us_, const at::Tensor& vs_) {
  TORCH_CHECK(m_.device().is_cpu() && m_.dim() == 3 && m_.size(1) == 3 && m_.size(2) == 3 && m_.scalar_type() == at::kFloat,
              "moonfast affine_grid: expected (N, 3, 3) float32 CPU matrices");
  TORCH_CHECK(us_.dim() == 1 && vs_.dim() == 1 && us_.scalar_type() == at::kFloat && vs_.scalar_type() == at::kFloat,
              "moonfast affine_grid: expected 1-d float32 coordinates");
  auto m = m_.contiguous(), us = us_.contiguous(), vs = vs_.contiguous();
  const int64_t N = m.size(0), H = vs.size(0), W = us.size(0);
  auto out = at::empty({N, H, W, 2}, m.options());
  const float *mp = m.data_ptr<float>(), *up = us.data_ptr<float>(), *vp = vs.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N * H, 16, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const float* M = mp + (r / H) * 9;
      const float v = vp[r % H];
      grid_row(up, M[0], M[3], M[6], M[1] * v + M[2], M[4] * v + M[5], M[7] * v + M[8], op + r * W * 2, W);
    }
  });
  return out;
}
