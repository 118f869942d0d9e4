#include "common.h"
#include "ops.h"
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

// ---- the weight gradient of a 3×3 convolution (stride 1, padding 1) of bf16 channels-last tensors, on AVX-512 BF16 ----
// Under bf16 autocast oneDNN computes this gradient vectorised over channels: with 18 or 36 of them it ran at 83-140
// GFLOP/s on a Zen 4 EPYC whose bf16 matmul ran at 330-425. Here each channel of a sample becomes a zero-bordered plane
// (row length W + 2), so every tap (ky, kx) is one fixed offset in it, and the gradient of weight (o, c, tap) is a dot
// product of output-gradient plane o with input plane c read at that offset: `vdpbf16ps` takes 32 bf16 pairs at a time
// (pairs of neighbouring pixels) into 16 fp32 sums. A tile is 3 output channels × 1 input channel × 9 taps: 27
// accumulators, 3 gradient vectors, 1 input vector (32 registers). Sums are fp32 over one sample's plane, then fp32
// across samples (oneDNN's result is rounded to bf16; this one is not). moonfast.cpu.conv races it against oneDNN.

bool conv3_bf16_available() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

#if defined(__AVX512BF16__)
// channels-last [N, C, H, W] bf16 -> [N][C][S + Lp + S] planes: pixel (y, x) at S + (y + 1)(W + 2) + x + 1, zeros elsewhere
static at::Tensor to_planes(const at::Tensor& x, int64_t S, int64_t Lp) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), W2 = W + 2, R = S + Lp + S;
  auto out = at::empty({N, C, R}, x.options().memory_format(at::MemoryFormat::Contiguous));
  const uint16_t* src = reinterpret_cast<const uint16_t*>(x.data_ptr());
  uint16_t* dst = reinterpret_cast<uint16_t*>(out.data_ptr());
  at::parallel_for(0, N * C, 16, [&](int64_t b, int64_t e) {
    for (int64_t nc = b; nc < e; ++nc) {
      uint16_t* d = dst + nc * R;
      std::memset(d, 0, sizeof(uint16_t) * (S + W2));                                  // front slack, top border row
      std::memset(d + S + (H + 1) * W2, 0, sizeof(uint16_t) * (R - S - (H + 1) * W2));  // bottom border row, tail
    }
  });
  at::parallel_for(0, N * H, 4, [&](int64_t b, int64_t e) {
    for (int64_t nh = b; nh < e; ++nh) {
      const int64_t n = nh / H, y = nh % H;
      const uint16_t* s = src + nh * W * C;
      uint16_t* d0 = dst + n * C * R + S + (y + 1) * W2;
      for (int64_t c = 0; c < C; ++c) {
        uint16_t* d = d0 + c * R;
        d[0] = 0; d[W + 1] = 0;
        for (int64_t xx = 0; xx < W; ++xx) d[xx + 1] = s[xx * C + c];
      }
    }
  });
  return out;
}

template <int CB>
static inline void dw_tile(const uint16_t* g, int64_t gs, const uint16_t* x, int64_t Lp, const int64_t* off, __m512* acc) {
  for (int64_t p = 0; p < Lp; p += 32) {
    __m512bh gv[CB];
    for (int i = 0; i < CB; ++i) gv[i] = (__m512bh)_mm512_loadu_si512(g + i * gs + p);
    for (int t = 0; t < 9; ++t) {
      const __m512bh v = (__m512bh)_mm512_loadu_si512(x + p + off[t]);
      for (int i = 0; i < CB; ++i) acc[i * 9 + t] = _mm512_dpbf16_ps(acc[i * 9 + t], gv[i], v);
    }
  }
}
#endif

std::vector<at::Tensor> conv3_bf16_backward_weight(const at::Tensor& dy, const at::Tensor& x, bool bias) {
  check_cl(x, "x"); check_cl(dy, "dy");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && dy.scalar_type() == at::kBFloat16,
              "moonfast kernels: conv3_bf16_backward_weight takes bf16 tensors");
  TORCH_CHECK(dy.size(0) == x.size(0) && dy.size(2) == x.size(2) && dy.size(3) == x.size(3),
              "moonfast kernels: conv3_bf16_backward_weight: dy must be x's batch and image size");
#if defined(__AVX512BF16__)
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), Co = dy.size(1), W2 = W + 2;
  const int64_t Lp = round_up((H + 2) * W2, 32), S = round_up(W + 3, 32), R = S + Lp + S;   // the slack covers every tap's offset
  auto xp = to_planes(x, S, Lp);
  auto gp = to_planes(dy, 0, Lp);
  const uint16_t* X = reinterpret_cast<const uint16_t*>(xp.data_ptr());
  const uint16_t* G = reinterpret_cast<const uint16_t*>(gp.data_ptr());
  int64_t off[9];
  for (int ky = 0; ky < 3; ++ky)
    for (int kx = 0; kx < 3; ++kx) off[ky * 3 + kx] = S + (ky - 1) * W2 + (kx - 1);
  const int64_t nb = (Co + 2) / 3, tasks = nb * C;
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(N, at::get_num_threads()));
  // each thread takes a share of the samples and, per sample, every (input channel, output block) pair while that
  // sample's planes sit in L2; a pair's 27 accumulators wait in memory between samples
  std::vector<float> part(nt * tasks * 27 * 16, 0.f), partb(bias ? nt * Co * 16 : 0, 0.f);
  at::parallel_for(0, nt, 1, [&](int64_t b, int64_t e) {
    for (int64_t th = b; th < e; ++th) {
      float* am = part.data() + th * tasks * 27 * 16;
      for (int64_t n = th * N / nt; n < (th + 1) * N / nt; ++n) {
        if (bias) {   // the bias gradient: each output-gradient plane summed, as dot products with ones
          const __m512bh one = (__m512bh)_mm512_set1_epi16(0x3F80);
          for (int64_t o = 0; o < Co; ++o) {
            const uint16_t* g = G + (n * Co + o) * Lp;
            __m512 sb = _mm512_loadu_ps(partb.data() + (th * Co + o) * 16);
            for (int64_t p = 0; p < Lp; p += 32) sb = _mm512_dpbf16_ps(sb, (__m512bh)_mm512_loadu_si512(g + p), one);
            _mm512_storeu_ps(partb.data() + (th * Co + o) * 16, sb);
          }
        }
        for (int64_t c = 0; c < C; ++c) {
          const uint16_t* xv = X + (n * C + c) * R;
          for (int64_t blk = 0; blk < nb; ++blk) {
            const int64_t o0 = blk * 3, cb = std::min<int64_t>(3, Co - o0);
            float* a = am + (blk * C + c) * 27 * 16;
            __m512 acc[27];
            for (int i = 0; i < 27; ++i) acc[i] = _mm512_loadu_ps(a + i * 16);
            const uint16_t* g = G + (n * Co + o0) * Lp;
            if (cb == 3) dw_tile<3>(g, Lp, xv, Lp, off, acc);
            else if (cb == 2) dw_tile<2>(g, Lp, xv, Lp, off, acc);
            else dw_tile<1>(g, Lp, xv, Lp, off, acc);
            for (int i = 0; i < 27; ++i) _mm512_storeu_ps(a + i * 16, acc[i]);
          }
        }
      }
    }
  });
  auto dw = at::zeros({Co, C, 3, 3}, x.options().dtype(at::kFloat).memory_format(at::MemoryFormat::Contiguous));
  float* D = dw.data_ptr<float>();
  for (int64_t th = 0; th < nt; ++th)
    for (int64_t blk = 0; blk < nb; ++blk)
      for (int64_t c = 0; c < C; ++c) {
        const float* a = part.data() + (th * tasks + blk * C + c) * 27 * 16;
        for (int64_t i = 0; i < std::min<int64_t>(3, Co - blk * 3); ++i)
          for (int t = 0; t < 9; ++t) {
            float s = 0.f;
            for (int l = 0; l < 16; ++l) s += a[(i * 9 + t) * 16 + l];
            D[((blk * 3 + i) * C + c) * 9 + t] += s;
          }
      }
  at::Tensor db;
  if (bias) {
    db = at::zeros({Co}, x.options().dtype(at::kFloat).memory_format(at::MemoryFormat::Contiguous));
    float* B = db.data_ptr<float>();
    for (int64_t th = 0; th < nt; ++th)
      for (int64_t o = 0; o < Co; ++o)
        for (int l = 0; l < 16; ++l) B[o] += partb[(th * Co + o) * 16 + l];
  }
  return {dw, db};
#else
  TORCH_CHECK(false, "moonfast kernels: conv3_bf16_backward_weight needs AVX-512 BF16, which this build lacks");
  return {};
#endif
}

// ---- the ResNet stem: a 7×7 stride-2 padding-3 convolution of 3 input channels, bf16 channels-last, AVX-512 BF16 ----
// oneDNN ran it at about 145 GFLOP/s on the Zen 4 EPYC (bf16 matmul 330-425): 3 input channels fill no vector. Here
// 16 output pixels of a row sit across the lanes and every output channel has an accumulator. The reduction runs over
// (kh; kw, c): for one kh the 21 values (7 pixels × 3 channels) of a pixel's patch row are contiguous in channels-last
// memory, and are taken as 11 bf16 pairs (the 22nd value's weight is 0). Pixel p of the 16 starts 3p dwords after
// pixel 0 (2 input pixels of 3 bf16), so pair j of all 16 pixels is one permutation of the row's dwords: two
// `vpermt2d`s (pixels 0-7 from dwords 0-31, 8-15 from dwords 24-55), then one `vdpbf16ps` per output channel with its
// weight pair broadcast. Each thread copies an image at a time into a zero-bordered buffer (3 pixels before, the
// slack the last group's loads need after), which also puts every row's dwords on pair boundaries.

#if defined(__AVX512BF16__)
template <int CO>
static void stem_image(const uint16_t* xp, int64_t WP, const int32_t* wq, const float* bias, uint16_t* y, int64_t OH,
                       int64_t OW, int64_t Co) {
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i base3 = _mm512_mullo_epi32(_mm512_and_epi32(lane, _mm512_set1_epi32(7)), _mm512_set1_epi32(3));  // 3·(p mod 8)
  alignas(64) uint16_t tmp[CO][16];
  for (int64_t oh = 0; oh < OH; ++oh)
    for (int64_t ow0 = 0; ow0 < OW; ow0 += 16) {
      __m512 acc[CO];
      for (int c = 0; c < CO; ++c) acc[c] = _mm512_set1_ps(bias[c]);
      for (int kh = 0; kh < 7; ++kh) {
        const int32_t* row = reinterpret_cast<const int32_t*>(xp + ((2 * oh + kh) * WP + 2 * ow0) * 3);
        const __m512i a0 = _mm512_loadu_si512(row), a1 = _mm512_loadu_si512(row + 16);
        const __m512i b0 = _mm512_loadu_si512(row + 24), b1 = _mm512_loadu_si512(row + 40);
        const int32_t* wk = wq + kh * 11 * CO;
        for (int j = 0; j < 11; ++j) {
          const __m512i idx = _mm512_add_epi32(base3, _mm512_set1_epi32(j));
          const __m512bh A = (__m512bh)_mm512_or_si512(_mm512_maskz_permutex2var_epi32(0x00FF, a0, idx, a1),
                                                       _mm512_maskz_permutex2var_epi32(0xFF00, b0, idx, b1));
#pragma GCC unroll 32
          for (int c = 0; c < CO; ++c) acc[c] = _mm512_dpbf16_ps(acc[c], A, (__m512bh)_mm512_set1_epi32(wk[j * CO + c]));
        }
      }
      for (int c = 0; c < CO; ++c) _mm256_store_si256(reinterpret_cast<__m256i*>(tmp[c]), (__m256i)_mm512_cvtneps_pbh(acc[c]));
      const int64_t np = std::min<int64_t>(16, OW - ow0);
      uint16_t* yr = y + (oh * OW + ow0) * Co;
      for (int64_t p = 0; p < np; ++p)
        for (int64_t c = 0; c < Co; ++c) yr[p * Co + c] = tmp[c][p];
    }
}
#endif

at::Tensor stem_bf16_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  check_cl(x, "x");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16 && x.size(1) == 3 && w.dim() == 4 &&
              w.size(1) == 3 && w.size(2) == 7 && w.size(3) == 7 && w.size(0) >= 1 && w.size(0) <= 24,
              "moonfast kernels: stem_bf16_forward takes a bf16 input of 3 channels and a bf16 (1..24, 3, 7, 7) weight, got ",
              x.sizes(), " ", x.scalar_type(), " and ", w.sizes(), " ", w.scalar_type());
  TORCH_CHECK(b.numel() == 0 || b.numel() == w.size(0), "moonfast kernels: stem_bf16_forward: bias of ", b.numel(), " values");
  TORCH_CHECK(x.size(2) > 0 && x.size(3) > 0, "moonfast kernels: stem_bf16_forward: an empty image, ", x.sizes());
#if defined(__AVX512BF16__)
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3), Co = w.size(0);
  const int64_t OH = (H - 1) / 2 + 1, OW = (W - 1) / 2 + 1, HP = H + 6, WP = round_up(W + 40, 2);
  const int CO = Co <= 8 ? 8 : Co <= 16 ? 16 : Co <= 18 ? 18 : 24;   // accumulators (a template's); the rest weigh 0
  // wq[kh][j][o]: the bf16 pair (k = 2j, 2j + 1) of (kw, c) = (k / 3, k % 3), low half first; k = 21 and o >= Co: 0
  auto wc = w.contiguous();
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(wc.data_ptr());
  std::vector<int32_t> wq(7 * 11 * CO, 0);
  for (int kh = 0; kh < 7; ++kh)
    for (int j = 0; j < 11; ++j)
      for (int64_t o = 0; o < Co; ++o) {
        uint32_t pr = 0;
        for (int h = 0; h < 2; ++h) {
          const int k = 2 * j + h;
          if (k < 21) pr |= uint32_t(wp[((o * 3 + k % 3) * 7 + kh) * 7 + k / 3]) << (16 * h);
        }
        wq[(kh * 11 + j) * CO + o] = int32_t(pr);
      }
  std::vector<float> bias(CO, 0.f);
  if (b.numel()) { auto bf = b.to(at::kFloat).contiguous(); std::memcpy(bias.data(), bf.data_ptr<float>(), Co * sizeof(float)); }
  auto y = at::empty({N, Co, OH, OW}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const uint16_t* xs = reinterpret_cast<const uint16_t*>(x.data_ptr());
  uint16_t* ys = reinterpret_cast<uint16_t*>(y.data_ptr());
  at::parallel_for(0, N, 1, [&](int64_t lo, int64_t hi) {
    std::vector<uint16_t> xp(HP * WP * 3, 0);   // rows and columns outside the image stay 0
    for (int64_t n = lo; n < hi; ++n) {
      for (int64_t h = 0; h < H; ++h) std::memcpy(xp.data() + ((h + 3) * WP + 3) * 3, xs + (n * H + h) * W * 3, W * 3 * sizeof(uint16_t));
      uint16_t* yn = ys + n * OH * OW * Co;
      if (CO == 8) stem_image<8>(xp.data(), WP, wq.data(), bias.data(), yn, OH, OW, Co);
      else if (CO == 16) stem_image<16>(xp.data(), WP, wq.data(), bias.data(), yn, OH, OW, Co);
      else if (CO == 18) stem_image<18>(xp.data(), WP, wq.data(), bias.data(), yn, OH, OW, Co);
      else stem_image<24>(xp.data(), WP, wq.data(), bias.data(), yn, OH, OW, Co);
    }
  });
  return y;
#else
  TORCH_CHECK(false, "moonfast kernels: stem_bf16_forward needs AVX-512 BF16, which this build lacks");
  return {};
#endif
}
