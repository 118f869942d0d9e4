#include "common.h"
#include "ops.h"
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

// ---- Winograd F(2×2, 3×3) for the 3×3 stride-1 padding-1 convolutions of bf16 channels-last tensors, AVX-512 BF16 ----
// On a Zen 4 EPYC oneDNN ran the U-Net's wide bf16 layers (36 to 288 channels, 32² to 8²) at 330-460 GFLOP/s, about
// the bf16 matmul's own rate (360-425): only fewer multiplications go faster. F(2×2, 3×3) computes each 2×2 output tile
// from a 4×4 input tile with 16 products per (input, output) channel pair instead of 36:
//   y_tile = Aᵀ [ (G w Gᵀ) ⊙ (Bᵀ d B) ] A,
// Bᵀ = (1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1), G = (1 0 0; ½ ½ ½; ½ -½ ½; 0 0 1), Aᵀ = (1 1 1 0; 0 1 -1 -1).
// The products are 16 matrix products, (tiles × C) · (C × Co), one per position of the 4×4 tile, which moonfast leaves
// to torch.bmm (oneDNN's bf16 matmul). These kernels are the transforms around them, vectorised over channels (16 per
// vector, a masked tail): the input tiles' Bᵀ d B (V, 16 × tiles × C), the output tiles' Aᵀ M A (+ bias), and for the
// weight gradient the adjoint of the output transform, A dy Aᵀ. Since the whole computation is a linear map equal to
// the convolution, the weight gradient is the gradient of that map: dU = Vᵀ · (A dy Aᵀ) for each of the 16 positions,
// then dw = Gᵀ dU G. The input gradient is the forward on dy with the weight's channels swapped and taps reversed.
// Values are fp32 inside a transform and bf16 between (V, U, M, dM): each rounding is one bf16 step of its value.
// moonfast.cpu.conv races this against oneDNN (and moonfast's direct kernels) per layer shape and pass.

bool winograd_bf16_available() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

static void check_tiles(const at::Tensor& m, int64_t T, const char* what) {
  TORCH_CHECK(m.dim() == 3 && m.size(0) == 16 && m.size(1) == T && m.is_contiguous() && m.scalar_type() == at::kBFloat16,
              "moonfast kernels: expected ", what, " to be a contiguous bf16 (16, ", T, ", channels) tensor of tile products");
}

#if defined(__AVX512BF16__)
static inline __m512 load_bf16(const uint16_t* p, __mmask16 m) {   // 16 bf16 → fp32 (masked lanes 0)
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
static inline void store_bf16(uint16_t* p, __mmask16 m, __m512 v) {   // fp32 → bf16, round to nearest even
  _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(v));
}
static inline __mmask16 lanes16(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }
#endif

// x (N, C, H, W) channels-last → (16, T, C) of x's element type E, T = N·⌈H/2⌉·⌈W/2⌉ tiles in (n, ty, tx) order: `tile`
// of each tile's K×K pixel rows (C values each), from row 2ty + first and column 2tx + first on, a row of zeros standing in
// beyond the image, into its 16 output rows. K = 4, first = -1: the input tiles Bᵀ d B; K = 2, first = 0: the adjoint A dy Aᵀ
template <int K, typename E, typename Tile>
static at::Tensor to_tiles(const at::Tensor& x, int64_t first, Tile tile) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), TH = (H + 1) / 2, TW = (W + 1) / 2, T = N * TH * TW;
  auto v = at::empty({16, T, C}, x.options().memory_format(at::MemoryFormat::Contiguous));
  const E* X = reinterpret_cast<const E*>(x.data_ptr());
  E* V = reinterpret_cast<E*>(v.data_ptr());
  const std::vector<E> zero(C, E(0));
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    const E* d[K * K]; E* o[16];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / (TH * TW), ty = (t / TW) % TH, tx = t % TW;
      for (int a = 0; a < K; ++a)
        for (int b = 0; b < K; ++b) {
          const int64_t y = 2 * ty + first + a, xx = 2 * tx + first + b;
          d[K * a + b] = (y >= 0 && y < H && xx >= 0 && xx < W) ? X + ((n * H + y) * W + xx) * C : zero.data();
        }
      for (int k = 0; k < 16; ++k) o[k] = V + (k * T + t) * C;
      tile(d, o, C);
    }
  });
  return v;
}

#if defined(__AVX512BF16__)
// bf16 rows: the input tile Bᵀ d B of the 16 rows d (d[4a + b]: patch row a, column b), 16 channels at a time
static void input_tile_bf16(const uint16_t* const* d, uint16_t* const* o, int64_t C) {
  for (int64_t c0 = 0; c0 < C; c0 += 16) {
    const __mmask16 m = lanes16(C - c0);
    __m512 e[4][4];
    for (int b = 0; b < 4; ++b) {   // Bᵀ d, column by column
      const __m512 d0 = load_bf16(d[b] + c0, m), d1 = load_bf16(d[4 + b] + c0, m);
      const __m512 d2 = load_bf16(d[8 + b] + c0, m), d3 = load_bf16(d[12 + b] + c0, m);
      e[0][b] = _mm512_sub_ps(d0, d2); e[1][b] = _mm512_add_ps(d1, d2);
      e[2][b] = _mm512_sub_ps(d2, d1); e[3][b] = _mm512_sub_ps(d1, d3);
    }
    for (int a = 0; a < 4; ++a) {   // (Bᵀ d) B, row by row
      store_bf16(o[4 * a] + c0, m, _mm512_sub_ps(e[a][0], e[a][2]));
      store_bf16(o[4 * a + 1] + c0, m, _mm512_add_ps(e[a][1], e[a][2]));
      store_bf16(o[4 * a + 2] + c0, m, _mm512_sub_ps(e[a][2], e[a][1]));
      store_bf16(o[4 * a + 3] + c0, m, _mm512_sub_ps(e[a][1], e[a][3]));
    }
  }
}

// bf16 rows: the adjoint A g Aᵀ of the 4 rows g (g[2i + j]: output row i, column j), A = (1 0; 1 1; 1 -1; 0 -1)
static void adjoint_tile_bf16(const uint16_t* const* g, uint16_t* const* o, int64_t C) {
  const __m512 z = _mm512_setzero_ps();
  for (int64_t c0 = 0; c0 < C; c0 += 16) {
    const __mmask16 m = lanes16(C - c0);
    __m512 r[4][2];   // A g
    for (int j = 0; j < 2; ++j) {
      const __m512 g0 = load_bf16(g[j] + c0, m), g1 = load_bf16(g[2 + j] + c0, m);
      r[0][j] = g0; r[1][j] = _mm512_add_ps(g0, g1); r[2][j] = _mm512_sub_ps(g0, g1); r[3][j] = _mm512_sub_ps(z, g1);
    }
    for (int a = 0; a < 4; ++a) {   // (A g) Aᵀ
      store_bf16(o[4 * a] + c0, m, r[a][0]);
      store_bf16(o[4 * a + 1] + c0, m, _mm512_add_ps(r[a][0], r[a][1]));
      store_bf16(o[4 * a + 2] + c0, m, _mm512_sub_ps(r[a][0], r[a][1]));
      store_bf16(o[4 * a + 3] + c0, m, _mm512_sub_ps(z, r[a][1]));
    }
  }
}
#endif

// x (N, C, H, W) channels-last bf16 → V (16, T, C) bf16: V[4a + b][t] = (Bᵀ d B)[a][b], d the 4×4 patch at rows
// 2ty - 1 .. 2ty + 2, columns 2tx - 1 .. 2tx + 2 (zeros outside)
at::Tensor winograd_bf16_input(const at::Tensor& x) {
  check_cl(x, "x");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "moonfast kernels: winograd_bf16_input takes a bf16 tensor");
#if defined(__AVX512BF16__)
  return to_tiles<4, uint16_t>(x, -1, input_tile_bf16);
#else
  TORCH_CHECK(false, "moonfast kernels: winograd_bf16_input needs AVX-512 BF16, which this build lacks");
  return {};
#endif
}

// dy (N, Co, H, W) channels-last bf16 → dM (16, T, Co) bf16: each tile's A dy Aᵀ (the adjoint of the output transform;
// outputs beyond the image count as 0)
at::Tensor winograd_bf16_adjoint(const at::Tensor& dy) {
  check_cl(dy, "dy");
  TORCH_CHECK(dy.scalar_type() == at::kBFloat16, "moonfast kernels: winograd_bf16_adjoint takes a bf16 tensor");
#if defined(__AVX512BF16__)
  return to_tiles<2, uint16_t>(dy, 0, adjoint_tile_bf16);
#else
  TORCH_CHECK(false, "moonfast kernels: winograd_bf16_adjoint needs AVX-512 BF16, which this build lacks");
  return {};
#endif
}

// M (16, T, Co) bf16 → y (N, Co, H, W) channels-last bf16: each 2×2 tile Aᵀ M A + bias (fp32; empty: none), cut to the image
at::Tensor winograd_bf16_output(const at::Tensor& mm, const at::Tensor& bias, int64_t N, int64_t H, int64_t W) {
  TORCH_CHECK(N >= 1 && H >= 1 && W >= 1, "moonfast kernels: winograd_bf16_output: expected a batch and image size of at least 1");
  const int64_t TH = (H + 1) / 2, TW = (W + 1) / 2, T = N * TH * TW;
  check_tiles(mm, T, "M");
  const int64_t Co = mm.size(2);
  TORCH_CHECK(bias.numel() == 0 || (bias.numel() == Co && bias.scalar_type() == at::kFloat && bias.is_contiguous()),
              "moonfast kernels: winograd_bf16_output: expected an empty bias or ", Co, " fp32 values");
#if defined(__AVX512BF16__)
  auto y = at::empty({N, Co, H, W}, mm.options().memory_format(at::MemoryFormat::ChannelsLast));
  const uint16_t* M = reinterpret_cast<const uint16_t*>(mm.data_ptr());
  uint16_t* Y = reinterpret_cast<uint16_t*>(y.data_ptr());
  const float* B = bias.numel() ? bias.data_ptr<float>() : nullptr;
  const int64_t P = T * Co;
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / (TH * TW), ty = (t / TW) % TH, tx = t % TW;
      for (int64_t c0 = 0; c0 < Co; c0 += 16) {
        const __mmask16 m = lanes16(Co - c0);
        __m512 s[2][4];
        for (int b = 0; b < 4; ++b) {   // Aᵀ M, column by column
          const uint16_t* p = M + b * P + t * Co + c0;
          const __m512 m0 = load_bf16(p, m), m1 = load_bf16(p + 4 * P, m), m2 = load_bf16(p + 8 * P, m), m3 = load_bf16(p + 12 * P, m);
          s[0][b] = _mm512_add_ps(_mm512_add_ps(m0, m1), m2);
          s[1][b] = _mm512_sub_ps(_mm512_sub_ps(m1, m2), m3);
        }
        const __m512 bv = B ? _mm512_maskz_loadu_ps(m, B + c0) : _mm512_setzero_ps();
        for (int i = 0; i < 2 && 2 * ty + i < H; ++i) {   // (Aᵀ M) A, row by row
          uint16_t* q = Y + ((n * H + 2 * ty + i) * W + 2 * tx) * Co + c0;
          store_bf16(q, m, _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(s[i][0], s[i][1]), s[i][2]), bv));
          if (2 * tx + 1 < W) store_bf16(q + Co, m, _mm512_add_ps(_mm512_sub_ps(_mm512_sub_ps(s[i][1], s[i][2]), s[i][3]), bv));
        }
      }
    }
  });
  return y;
#else
  TORCH_CHECK(false, "moonfast kernels: winograd_bf16_output needs AVX-512 BF16, which this build lacks");
  return {};
#endif
}

// w (Co, C, 3, 3), fp32 or bf16 → U (16, C, Co), U[4a + b][c][o] = (G w[o][c] Gᵀ)[a][b] (summed in fp32), bf16 or fp32;
// flip: U for the input gradient, (16, Co, C), of w[o][c] with its taps reversed
template <typename S, typename T>
static void weight_tiles(const S* Wp, const int64_t* st, T* U, int64_t Co, int64_t C, bool flip) {
  // Wp: w (Co, C, 3, 3) with strides st: a channels-last weight, bf16 or fp32, is read in place, not copied first
  const int64_t P = C * Co;
  at::parallel_for(0, Co * C, 256, [&](int64_t b0, int64_t b1) {
    for (int64_t oc = b0; oc < b1; ++oc) {
      const int64_t o = oc / C, c = oc % C;
      const S* wp = Wp + o * st[0] + c * st[1];
      float g[3][3], h[4][3];
      for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j) g[i][j] = float(flip ? wp[(2 - i) * st[2] + (2 - j) * st[3]] : wp[i * st[2] + j * st[3]]);
      for (int j = 0; j < 3; ++j) {   // G g
        h[0][j] = g[0][j]; h[1][j] = 0.5f * (g[0][j] + g[1][j] + g[2][j]);
        h[2][j] = 0.5f * (g[0][j] - g[1][j] + g[2][j]); h[3][j] = g[2][j];
      }
      const int64_t at = flip ? o * C + c : c * Co + o;
      for (int a = 0; a < 4; ++a) {   // (G g) Gᵀ
        const float r[4] = {h[a][0], 0.5f * (h[a][0] + h[a][1] + h[a][2]), 0.5f * (h[a][0] - h[a][1] + h[a][2]), h[a][2]};
        for (int b = 0; b < 4; ++b) U[(4 * a + b) * P + at] = T(r[b]);
      }
    }
  });
}

at::Tensor winograd_weight(const at::Tensor& w, bool flip, bool bf16) {
  TORCH_CHECK(w.dim() == 4 && w.size(2) == 3 && w.size(3) == 3 && (w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16),
              "moonfast kernels: winograd_weight: expected a (Co, C, 3, 3) fp32 or bf16 weight");
  const int64_t Co = w.size(0), C = w.size(1), st[4] = {w.stride(0), w.stride(1), w.stride(2), w.stride(3)};
  auto u = at::empty({16, flip ? Co : C, flip ? C : Co},
                     w.options().dtype(bf16 ? at::kBFloat16 : at::kFloat).memory_format(at::MemoryFormat::Contiguous));
  const bool wbf = w.scalar_type() == at::kBFloat16;
  if (bf16 && wbf) weight_tiles(w.data_ptr<at::BFloat16>(), st, u.data_ptr<at::BFloat16>(), Co, C, flip);
  else if (bf16) weight_tiles(w.data_ptr<float>(), st, u.data_ptr<at::BFloat16>(), Co, C, flip);
  else if (wbf) weight_tiles(w.data_ptr<at::BFloat16>(), st, u.data_ptr<float>(), Co, C, flip);
  else weight_tiles(w.data_ptr<float>(), st, u.data_ptr<float>(), Co, C, flip);
  return u;
}

// dU (16, C, Co) (bf16 or fp32, any strides: (16, Co, C) transposed is read in place) → dw (Co, C, 3, 3) fp32:
// Gᵀ dU[:, c, o] G, the gradient of winograd_weight (unflipped)
template <typename S>
static void weight_grad_tiles(const S* D, int64_t sk, int64_t sc, int64_t so, float* Wp, int64_t Co, int64_t C) {
  // D: dU (16, C, Co) with strides (sk, sc, so), bf16 or fp32, read in place
  at::parallel_for(0, Co * C, 256, [&](int64_t b0, int64_t b1) {
    for (int64_t oc = b0; oc < b1; ++oc) {
      const int64_t o = oc / C, c = oc % C;
      float d[4][4], h[3][4];
      for (int k = 0; k < 16; ++k) d[k / 4][k % 4] = float(D[k * sk + c * sc + o * so]);
      for (int b = 0; b < 4; ++b) {   // Gᵀ d
        h[0][b] = d[0][b] + 0.5f * (d[1][b] + d[2][b]); h[1][b] = 0.5f * (d[1][b] - d[2][b]);
        h[2][b] = 0.5f * (d[1][b] + d[2][b]) + d[3][b];
      }
      for (int i = 0; i < 3; ++i) {   // (Gᵀ d) G
        Wp[oc * 9 + 3 * i] = h[i][0] + 0.5f * (h[i][1] + h[i][2]);
        Wp[oc * 9 + 3 * i + 1] = 0.5f * (h[i][1] - h[i][2]);
        Wp[oc * 9 + 3 * i + 2] = 0.5f * (h[i][1] + h[i][2]) + h[i][3];
      }
    }
  });
}

at::Tensor winograd_weight_grad(const at::Tensor& du) {
  TORCH_CHECK(du.dim() == 3 && du.size(0) == 16 && (du.scalar_type() == at::kFloat || du.scalar_type() == at::kBFloat16),
              "moonfast kernels: winograd_weight_grad: expected a (16, C, Co) fp32 or bf16 tensor");
  const int64_t C = du.size(1), Co = du.size(2);
  const int64_t sk = du.stride(0), sc = du.stride(1), so = du.stride(2);
  auto dw = at::empty({Co, C, 3, 3}, du.options().dtype(at::kFloat).memory_format(at::MemoryFormat::Contiguous));
  if (du.scalar_type() == at::kBFloat16) weight_grad_tiles(du.data_ptr<at::BFloat16>(), sk, sc, so, dw.data_ptr<float>(), Co, C);
  else weight_grad_tiles(du.data_ptr<float>(), sk, sc, so, dw.data_ptr<float>(), Co, C);
  return dw;
}

// ---- the same in fp32, for any instruction set (AVX2 or AVX-512; the loops over channels are vectorised by the compiler) ----
// oneDNN's fp32 wide layers run near the fp32 matmul's rate too, so Winograd's 2.25× fewer products pay there as well
// (the products are then torch.bmm's fp32 matmul). Each tile's 4×4 input rows (or 2×2 output-gradient rows) are read
// through pointers, a row of zeros standing in beyond the image, and the cut-off outputs of an odd size go to a scratch row.

static void check_f32(const at::Tensor& x, const char* what, const char* fn) {
  check_cl(x, what);
  TORCH_CHECK(x.scalar_type() == at::kFloat, "moonfast kernels: ", fn, " takes an fp32 tensor");
}

// V[k] row t = (Bᵀ d B)[k] of the 16 rows d (d[4a + b]: patch row a, column b)
static inline void input_tile(const float* const* d, float* const* o, int64_t C) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    float e[4][4];
    for (int b = 0; b < 4; ++b) {
      const float d0 = d[b][c], d1 = d[4 + b][c], d2 = d[8 + b][c], d3 = d[12 + b][c];
      e[0][b] = d0 - d2; e[1][b] = d1 + d2; e[2][b] = d2 - d1; e[3][b] = d1 - d3;
    }
    for (int a = 0; a < 4; ++a) {
      o[4 * a][c] = e[a][0] - e[a][2]; o[4 * a + 1][c] = e[a][1] + e[a][2];
      o[4 * a + 2][c] = e[a][2] - e[a][1]; o[4 * a + 3][c] = e[a][1] - e[a][3];
    }
  }
}

// the adjoint of the output transform, A g Aᵀ, of the 4 rows g (g[2i + j]: output row i, column j)
static inline void adjoint_tile(const float* const* g, float* const* o, int64_t C) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    float r[4][2];   // A g, A = (1 0; 1 1; 1 -1; 0 -1)
    for (int j = 0; j < 2; ++j) {
      const float g0 = g[j][c], g1 = g[2 + j][c];
      r[0][j] = g0; r[1][j] = g0 + g1; r[2][j] = g0 - g1; r[3][j] = -g1;
    }
    for (int a = 0; a < 4; ++a) {   // (A g) Aᵀ
      o[4 * a][c] = r[a][0]; o[4 * a + 1][c] = r[a][0] + r[a][1];
      o[4 * a + 2][c] = r[a][0] - r[a][1]; o[4 * a + 3][c] = -r[a][1];
    }
  }
}

at::Tensor winograd_f32_input(const at::Tensor& x) {
  check_f32(x, "x", "winograd_f32_input");
  return to_tiles<4, float>(x, -1, input_tile);
}

at::Tensor winograd_f32_adjoint(const at::Tensor& dy) {
  check_f32(dy, "dy", "winograd_f32_adjoint");
  return to_tiles<2, float>(dy, 0, adjoint_tile);
}

at::Tensor winograd_f32_output(const at::Tensor& mm, const at::Tensor& bias, int64_t N, int64_t H, int64_t W) {
  TORCH_CHECK(N >= 1 && H >= 1 && W >= 1, "moonfast kernels: winograd_f32_output: expected a batch and image size of at least 1");
  const int64_t TH = (H + 1) / 2, TW = (W + 1) / 2, T = N * TH * TW;
  TORCH_CHECK(mm.dim() == 3 && mm.size(0) == 16 && mm.size(1) == T && mm.is_contiguous() && mm.scalar_type() == at::kFloat,
              "moonfast kernels: expected M to be a contiguous fp32 (16, ", T, ", channels) tensor of tile products");
  const int64_t Co = mm.size(2);
  TORCH_CHECK(bias.numel() == 0 || (bias.numel() == Co && bias.scalar_type() == at::kFloat && bias.is_contiguous()),
              "moonfast kernels: winograd_f32_output: expected an empty bias or ", Co, " fp32 values");
  auto y = at::empty({N, Co, H, W}, mm.options().memory_format(at::MemoryFormat::ChannelsLast));
  const float* M = mm.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  const std::vector<float> zero(Co, 0.f);
  const float* B = bias.numel() ? bias.data_ptr<float>() : zero.data();
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    std::vector<float> scratch(Co);
    const float* m[16]; float* q[4];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / (TH * TW), ty = (t / TW) % TH, tx = t % TW;
      for (int k = 0; k < 16; ++k) m[k] = M + (k * T + t) * Co;
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j) {
          const int64_t yy = 2 * ty + i, xx = 2 * tx + j;
          q[2 * i + j] = (yy < H && xx < W) ? Y + ((n * H + yy) * W + xx) * Co : scratch.data();
        }
#pragma omp simd
      for (int64_t c = 0; c < Co; ++c) {
        float s[2][4];
        for (int b = 0; b < 4; ++b) {   // Aᵀ M
          const float m0 = m[b][c], m1 = m[4 + b][c], m2 = m[8 + b][c], m3 = m[12 + b][c];
          s[0][b] = m0 + m1 + m2; s[1][b] = m1 - m2 - m3;
        }
        for (int i = 0; i < 2; ++i) {   // (Aᵀ M) A + bias
          q[2 * i][c] = s[i][0] + s[i][1] + s[i][2] + B[c];
          q[2 * i + 1][c] = s[i][1] - s[i][2] - s[i][3] + B[c];
        }
      }
    }
  });
  return y;
}
