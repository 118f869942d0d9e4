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
// one sample of a channels-last [N, C, H, W] bf16 tensor (`src`: its H·W·C values) -> C planes of S + Lp + S values at
// `dst`: pixel (y, x) at S + (y + 1)(W + 2) + x + 1, zeros elsewhere (an even C by register transposes of channel pairs,
// an odd one value by value). A thread makes a sample's planes just before it uses them, so they are written to and
// read from its caches. Made for the whole batch first (30 MB for 36→18 at 128², batch 16), they took about a third of
// the kernel's time on the Zen 4 EPYC; made this way, the kernel ran 1.05-1.21× faster on the U-Net's narrow layers
// (two runs, old and new build alternating).
static void sample_planes(const uint16_t* src, int64_t C, int64_t H, int64_t W, int64_t S, int64_t Lp, uint16_t* dst) {
  const int64_t W2 = W + 2, R = S + Lp + S;
  for (int64_t c = 0; c < C; ++c) {
    uint16_t* d = dst + c * R;
    std::memset(d, 0, sizeof(uint16_t) * (S + W2));                                  // front slack, top border row
    std::memset(d + S + (H + 1) * W2, 0, sizeof(uint16_t) * (R - S - (H + 1) * W2));  // bottom border row, tail
  }
  // the 16-bit words at even (odd) positions of two vectors: channel 2p (2p + 1) of 32 pixels
  const __m512i even16 = _mm512_set_epi16(62, 60, 58, 56, 54, 52, 50, 48, 46, 44, 42, 40, 38, 36, 34, 32,
                                          30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd16 = _mm512_add_epi16(even16, _mm512_set1_epi16(1));
  for (int64_t y = 0; y < H; ++y) {
    const uint16_t* s = src + y * W * C;
    uint16_t* d0 = dst + S + (y + 1) * W2;
    for (int64_t c = 0; c < C; ++c) { d0[c * R] = 0; d0[c * R + W + 1] = 0; }
    if (C % 2) {   // odd (an RGB input): one value at a time
      for (int64_t c = 0; c < C; ++c)
        for (int64_t xx = 0; xx < W; ++xx) d0[c * R + xx + 1] = s[xx * C + c];
      continue;
    }
    // even: 32 pixels × 16 channel pairs at a time, as dwords; two 16×16 transposes give each pair's 32 pixels, whose
    // low and high halves (the pair's two channels) are then gathered apart
    const uint32_t* sp = reinterpret_cast<const uint32_t*>(s);
    const int64_t CP = C / 2;
    for (int64_t x0 = 0; x0 < W; x0 += 32) {
      const int64_t np = std::min<int64_t>(32, W - x0);
      const __mmask32 m = np >= 32 ? __mmask32(0xFFFFFFFFu) : __mmask32((1u << np) - 1);
      for (int64_t p0 = 0; p0 < CP; p0 += 16) {
        const int64_t pn = std::min<int64_t>(16, CP - p0);
        const __mmask16 lm = pn >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << pn) - 1);
        __m512 a[16], b[16];
        for (int i = 0; i < 16; ++i) {
          a[i] = i < np ? _mm512_castsi512_ps(_mm512_maskz_loadu_epi32(lm, sp + (x0 + i) * CP + p0)) : _mm512_setzero_ps();
          b[i] = i + 16 < np ? _mm512_castsi512_ps(_mm512_maskz_loadu_epi32(lm, sp + (x0 + 16 + i) * CP + p0)) : _mm512_setzero_ps();
        }
        transpose16x16(a); transpose16x16(b);
        for (int q = 0; q < pn; ++q) {
          const __m512i ai = _mm512_castps_si512(a[q]), bi = _mm512_castps_si512(b[q]);
          _mm512_mask_storeu_epi16(d0 + 2 * (p0 + q) * R + x0 + 1, m, _mm512_permutex2var_epi16(ai, even16, bi));
          _mm512_mask_storeu_epi16(d0 + (2 * (p0 + q) + 1) * R + x0 + 1, m, _mm512_permutex2var_epi16(ai, odd16, bi));
        }
      }
    }
  }
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
  const uint16_t* xs = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const uint16_t* gs = reinterpret_cast<const uint16_t*>(dy.data_ptr());
  int64_t off[9];
  for (int ky = 0; ky < 3; ++ky)
    for (int kx = 0; kx < 3; ++kx) off[ky * 3 + kx] = S + (ky - 1) * W2 + (kx - 1);
  const int64_t nb = (Co + 2) / 3, tasks = nb * C;
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(N, at::get_num_threads()));
  // each thread takes a share of the samples and, per sample, every (input channel, output block) pair while that
  // sample's planes sit in L2; a pair's 27 accumulators wait in memory between samples
  std::vector<float> part(nt * tasks * 27 * 16, 0.f), partb(bias ? nt * Co * 16 : 0, 0.f);
  // each thread's sample as planes, in one ATen buffer allocated here: as a std::vector a thread, allocated inside the
  // parallel region, the same scratch made the kernel twice as slow on the Zen 4 EPYC (the page-fault count did not
  // change; the cause was not found)
  auto bufs = at::empty({nt, C * R + Co * Lp}, x.options().memory_format(at::MemoryFormat::Contiguous));
  at::parallel_for(0, nt, 1, [&](int64_t b, int64_t e) {
    for (int64_t th = b; th < e; ++th) {
      uint16_t* xbuf = reinterpret_cast<uint16_t*>(bufs.data_ptr()) + th * (C * R + Co * Lp);
      uint16_t* gbuf = xbuf + C * R;
      const uint16_t *X = xbuf, *G = gbuf;
      float* am = part.data() + th * tasks * 27 * 16;
      for (int64_t n = th * N / nt; n < (th + 1) * N / nt; ++n) {
        sample_planes(xs + n * H * W * C, C, H, W, S, Lp, xbuf);
        sample_planes(gs + n * H * W * Co, Co, H, W, 0, Lp, gbuf);
        if (bias) {   // the bias gradient: each output-gradient plane summed, as dot products with ones
          const __m512bh one = (__m512bh)_mm512_set1_epi16(0x3F80);
          for (int64_t o = 0; o < Co; ++o) {
            const uint16_t* g = G + o * Lp;
            __m512 sb = _mm512_loadu_ps(partb.data() + (th * Co + o) * 16);
            for (int64_t p = 0; p < Lp; p += 32) sb = _mm512_dpbf16_ps(sb, (__m512bh)_mm512_loadu_si512(g + p), one);
            _mm512_storeu_ps(partb.data() + (th * Co + o) * 16, sb);
          }
        }
        for (int64_t c = 0; c < C; ++c) {
          const uint16_t* xv = X + c * R;
          for (int64_t blk = 0; blk < nb; ++blk) {
            const int64_t o0 = blk * 3, cb = std::min<int64_t>(3, Co - o0);
            float* a = am + (blk * C + c) * 27 * 16;
            __m512 acc[27];
            for (int i = 0; i < 27; ++i) acc[i] = _mm512_loadu_ps(a + i * 16);
            const uint16_t* g = G + o0 * Lp;
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

// ---- the weight (and bias) gradient of a K×K stride-2 padding-K/2 convolution (K odd: the ResNet stem's 7×7 and the
// downsampling 3×3s), bf16 channels-last, AVX-512 BF16 ----
// oneDNN computed these at 82-175 GFLOP/s on the Zen 4 EPYC (bf16 matmul 390-415) with few input channels: the stem's
// (3 channels) took 16 ms of a 220 ms classifier step, the first 3×3 stride-2 layer's (18 channels at 64×64) 9 ms.
// As a matrix product the gradient is dW (Co × K²C) = dYᵀ (Co × pixels) · patches (pixels × K²C), the patch's values
// ordered (kh, kw, c). The reduction runs over pixel pairs (ow, ow + 1) of an output row, as `vdpbf16ps` wants: for a
// pair, the patches become one row of dwords, dword j = (patch(ow)[j], patch(ow + 1)[j]) (K²C values, then zeros to a
// whole vector), and dY one row of dwords (dy(ow)[o], dy(ow + 1)[o]). For one kh each pixel's patch row is K·C
// contiguous values of a zero-bordered copy of the image, the partner's 2C values later: 32 of each are loaded and
// interleaved by two `vpermt2w`. Rows of a few output rows are made at a time (they stay in L2); then tiles of 6 output
// channels × up to 4 dword vectors (24 accumulators) run down them, each output channel's pair broadcast. Sums are fp32
// within an image, then double across images.

static bool convs2_bf16_kernel(int64_t k) { return k >= 1 && k <= 7 && k % 2 == 1; }

#if defined(__AVX512BF16__)
template <int MR, int NR>
static inline void s2_dw_tile(const int32_t* A, int64_t as, const int32_t* B, int64_t bs, int64_t np, float* acc, int64_t ks) {
  __m512 s[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) s[i][j] = _mm512_loadu_ps(acc + i * ks + j * 16);
  for (int64_t p = 0; p < np; ++p) {
    __m512bh b[NR];
    for (int j = 0; j < NR; ++j) b[j] = (__m512bh)_mm512_loadu_si512(B + p * bs + j * 16);
    for (int i = 0; i < MR; ++i) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(A[p * as + i]);
      for (int j = 0; j < NR; ++j) s[i][j] = _mm512_dpbf16_ps(s[i][j], b[j], a);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) _mm512_storeu_ps(acc + i * ks + j * 16, s[i][j]);
}

// dwords j0 .. j0 + n - 1 (n <= 32) of a pair's row: (a[j], b[j]) from 32 values of each
static inline void interleave32(const uint16_t* a, const uint16_t* b, int32_t* d, int64_t n, __m512i i0, __m512i i1) {
  const __m512i va = _mm512_loadu_si512(a), vb = _mm512_loadu_si512(b);
  const __mmask16 m0 = n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
  _mm512_mask_storeu_epi32(d, m0, _mm512_permutex2var_epi16(va, i0, vb));
  if (n > 16) _mm512_mask_storeu_epi32(d + 16, n >= 32 ? __mmask16(0xFFFF) : __mmask16((1u << (n - 16)) - 1),
                                       _mm512_permutex2var_epi16(va, i1, vb));
}
#endif

std::vector<at::Tensor> convs2_bf16_backward_weight(const at::Tensor& dy, const at::Tensor& x, int64_t K, bool bias) {
  check_cl(x, "x"); check_cl(dy, "dy");
  TORCH_CHECK(convs2_bf16_kernel(K), "moonfast kernels: convs2_bf16_backward_weight: kernel size ", K, ", expected 1, 3, 5 or 7");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && dy.scalar_type() == at::kBFloat16,
              "moonfast kernels: convs2_bf16_backward_weight takes bf16 tensors, got ", x.scalar_type(), " and ", dy.scalar_type());
  const int64_t P = K / 2;
  TORCH_CHECK(x.size(1) >= 1 && x.size(2) > 0 && x.size(3) > 0 && dy.size(1) >= 1 && dy.size(0) == x.size(0) &&
              dy.size(2) == (x.size(2) + 2 * P - K) / 2 + 1 && dy.size(3) == (x.size(3) + 2 * P - K) / 2 + 1,
              "moonfast kernels: convs2_bf16_backward_weight: dy ", dy.sizes(), " is not the ", K, "×", K,
              " stride-2 padding-", P, " output of x ", x.sizes());
#if defined(__AVX512BF16__)
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), Co = dy.size(1), OH = dy.size(2), OW = dy.size(3);
  const int64_t KC = K * C, KK = K * KC, KP = round_up(KK, 16), COP = round_up(Co, 6), PW = (OW + 1) / 2, CR = 4;
  const int64_t HP = H + 2 * P, WP = std::max<int64_t>(W + 2 * P, 4 * PW + K) + 33;   // padded image; the loads' slack
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(N, at::get_num_threads()));
  std::vector<double> tot(nt * COP * KP, 0.0), totb(nt * Co, 0.0);
  const uint16_t* xs = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const uint16_t* gs = reinterpret_cast<const uint16_t*>(dy.data_ptr());
  at::parallel_for(0, nt, 1, [&](int64_t b, int64_t e) {
    // the loop's sizes as locals: the stores below may alias anything, so captured ones would be reloaded after each
    const int64_t c_ = C, kc = KC, kp = KP, h_ = H, w_ = W, co = Co, cop = COP, oh_n = OH, ow_n = OW, wp = WP, pw = PW, k_ = K;
    alignas(64) uint16_t i0[32], i1[32];   // vpermt2w: dword j of the first 16 (then the next 16) is (a[j], b[j])
    for (int j = 0; j < 16; ++j) { i0[2 * j] = j; i0[2 * j + 1] = 32 + j; i1[2 * j] = 16 + j; i1[2 * j + 1] = 48 + j; }
    const __m512i idx0 = _mm512_load_si512(i0), idx1 = _mm512_load_si512(i1);
    for (int64_t th = b; th < e; ++th) {
      std::vector<uint16_t> xp((HP + 1) * wp * c_, 0);                // the image, zero-bordered: P rows / pixels before
      std::vector<int32_t> bufB(CR * pw * kp, 0);                     // dwords KK..KP-1 of every row stay 0
      std::vector<int32_t> bufA(CR * pw * cop, 0);                    // and output channels Co..COP-1
      std::vector<float> acc(cop * kp);
      double* T = tot.data() + th * cop * kp;
      for (int64_t n = th * N / nt; n < (th + 1) * N / nt; ++n) {
        for (int64_t h = 0; h < h_; ++h)
          std::memcpy(xp.data() + ((h + P) * wp + P) * c_, xs + (n * h_ + h) * w_ * c_, w_ * c_ * sizeof(uint16_t));
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t oh0 = 0; oh0 < oh_n; oh0 += CR) {
          const int64_t rows = std::min(CR, oh_n - oh0), np = rows * pw;
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t oh = oh0 + r;
            const uint16_t* g = gs + (n * oh_n + oh) * ow_n * co;
            for (int64_t p = 0; p < pw; ++p) {
              int32_t* Bp = bufB.data() + (r * pw + p) * kp;
              for (int64_t kh = 0; kh < k_; ++kh) {
                const uint16_t* a = xp.data() + ((2 * oh + kh) * wp + 4 * p) * c_;
                for (int64_t j0 = 0; j0 < kc; j0 += 32)
                  interleave32(a + j0, a + 2 * c_ + j0, Bp + kh * kc + j0, std::min<int64_t>(32, kc - j0), idx0, idx1);
              }
              // dy's pair: both pixels' values per output channel; an odd row's last pixel has no partner, whose dy and
              // patch are then 0 (the patch too: 0 · inf would be a NaN)
              const uint16_t* g0 = g + 2 * p * co;
              const bool two = 2 * p + 1 < ow_n;
              if (!two) for (int64_t j = 0; j < k_ * kc; ++j) Bp[j] &= 0xFFFF;
              int32_t* Ap = bufA.data() + (r * pw + p) * cop;
              for (int64_t o0 = 0; o0 < co; o0 += 16) {
                const int64_t m = std::min<int64_t>(16, co - o0);
                const __mmask32 lm = __mmask32((1ull << m) - 1);
                const __m512i va = _mm512_maskz_loadu_epi16(lm, g0 + o0), vb = _mm512_maskz_loadu_epi16(two ? lm : 0, g0 + co + o0);
                _mm512_mask_storeu_epi32(Ap + o0, __mmask16(lm), _mm512_permutex2var_epi16(va, idx0, vb));
              }
            }
          }
          for (int64_t kv = 0; kv < kp / 16; kv += 4) {
            const int64_t nr = std::min<int64_t>(4, kp / 16 - kv);
            for (int64_t o0 = 0; o0 < cop; o0 += 6) {
              const int32_t* A = bufA.data() + o0;
              const int32_t* B = bufB.data() + kv * 16;
              float* a = acc.data() + o0 * kp + kv * 16;
              if (nr == 4) s2_dw_tile<6, 4>(A, cop, B, kp, np, a, kp);
              else if (nr == 3) s2_dw_tile<6, 3>(A, cop, B, kp, np, a, kp);
              else if (nr == 2) s2_dw_tile<6, 2>(A, cop, B, kp, np, a, kp);
              else s2_dw_tile<6, 1>(A, cop, B, kp, np, a, kp);
            }
          }
        }
        for (int64_t i = 0; i < cop * kp; ++i) T[i] += acc[i];
        if (bias) {   // the bias gradient: dy summed per channel, in fp32 within an image
          std::vector<float> sb(co, 0.f);
          const uint16_t* g = gs + n * oh_n * ow_n * co;
          for (int64_t i = 0; i < oh_n * ow_n; ++i)
            for (int64_t o = 0; o < co; ++o) sb[o] += Elt<c10::BFloat16>::ld(g[i * co + o]);
          for (int64_t o = 0; o < co; ++o) totb[th * co + o] += sb[o];
        }
      }
    }
  });
  auto dw = at::empty({Co, C, K, K}, x.options().dtype(at::kFloat).memory_format(at::MemoryFormat::Contiguous));
  float* D = dw.data_ptr<float>();
  for (int64_t o = 0; o < Co; ++o)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t kh = 0; kh < K; ++kh)
        for (int64_t kw = 0; kw < K; ++kw) {
          double s = 0.0;
          for (int64_t th = 0; th < nt; ++th) s += tot[(th * COP + o) * KP + (kh * K + kw) * C + c];
          D[((o * C + c) * K + kh) * K + kw] = float(s);
        }
  at::Tensor db;
  if (bias) {
    db = at::empty({Co}, x.options().dtype(at::kFloat).memory_format(at::MemoryFormat::Contiguous));
    float* Bd = db.data_ptr<float>();
    for (int64_t o = 0; o < Co; ++o) {
      double s = 0.0;
      for (int64_t th = 0; th < nt; ++th) s += totb[th * Co + o];
      Bd[o] = float(s);
    }
  }
  return {dw, db};
#else
  TORCH_CHECK(false, "moonfast kernels: convs2_bf16_backward_weight needs AVX-512 BF16, which this build lacks");
  return {};
#endif
}

// ---- the output and the input gradient of a 3×3 stride-1 padding-1 convolution, bf16 channels-last, AVX-512 BF16 ----
// oneDNN vectorises these over channels: with 18 or 36 of them (the U-Net's 128² and 64² layers) it ran the forward at
// 165-270 GFLOP/s and the input gradient at 160-270 on the Zen 4 EPYC whose bf16 matmul ran at 360-425. Here 16 output
// pixels of a row sit across the lanes, one accumulator per output channel (tiles of at most 18), and the reduction runs
// over (ky; input-channel pair; kx): each input row is rewritten once as planes of channel pairs, dword j of plane p
// holding pixel j - 1's channels (2p, 2p + 1) (zeros at the borders and for a missing odd channel), so the 16 pixels'
// pair for one (ky, p, kx) is one unaligned load and one `vdpbf16ps` per output channel, its weight pair broadcast.
// Three such rows (a ring: the image's rows above, at and below the output row) are all a thread holds of its image.
// The tile's accumulators are rounded to bf16 (oneDNN rounds its fp32 sums the same way), paired by channel and
// transposed in registers into the output's channels-last order. The input gradient is the same computation on the
// output gradient with the weight's channels swapped and its taps reversed.

#if defined(__AVX512BF16__)
// 16×16 dwords in registers → their transpose, in place (common.h's, through free casts)
__attribute__((always_inline)) static inline void transpose16(__m512i* r) {
  __m512 f[16];
  for (int i = 0; i < 16; ++i) f[i] = _mm512_castsi512_ps(r[i]);
  transpose16x16(f);
  for (int i = 0; i < 16; ++i) r[i] = _mm512_castps_si512(f[i]);
}

static inline __mmask16 first_lanes(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

// one image row (or nullptr: a border row of zeros) as CP planes of WP dwords: dword j of plane p = pixel j - 1's (2p, 2p+1)
static void pair_row(const uint16_t* xs, int64_t C, int64_t W, int64_t CP, int64_t WP, uint32_t* d) {
  if (!xs) { std::memset(d, 0, sizeof(uint32_t) * CP * WP); return; }
  for (int64_t p = 0; p < CP; ++p) { d[p * WP] = 0; std::memset(d + p * WP + W + 1, 0, sizeof(uint32_t) * (WP - W - 1)); }
  if (C % 2) {   // odd: the last pair's high half is 0
    for (int64_t x = 0; x < W; ++x)
      for (int64_t p = 0; p < CP; ++p)
        d[p * WP + x + 1] = uint32_t(xs[x * C + 2 * p]) | (2 * p + 1 < C ? uint32_t(xs[x * C + 2 * p + 1]) << 16 : 0u);
    return;
  }
  const uint32_t* s = reinterpret_cast<const uint32_t*>(xs);   // even: a pixel's pairs are CP consecutive dwords
  for (int64_t x0 = 0; x0 < W; x0 += 16) {
    const int64_t np = std::min<int64_t>(16, W - x0);
    for (int64_t p0 = 0; p0 < CP; p0 += 16) {   // 16 pixels × 16 pairs at a time, transposed
      const int64_t pn = std::min<int64_t>(16, CP - p0);
      __m512i r[16];
      for (int i = 0; i < 16; ++i) r[i] = i < np ? _mm512_maskz_loadu_epi32(first_lanes(pn), s + (x0 + i) * CP + p0) : _mm512_setzero_si512();
      transpose16(r);
      for (int q = 0; q < pn; ++q) _mm512_mask_storeu_epi32(d + (p0 + q) * WP + x0 + 1, first_lanes(np), r[q]);
    }
  }
}

// output pixels ow0 .. ow0 + np - 1 of one row, output channels co0 .. co0 + CO - 1 (CO even, at most 18)
template <int CO>
static inline void pair_tile(const uint32_t* const* rows, int64_t CP, int64_t WP, const int32_t* wq, int64_t Co, int64_t co0,
                             const float* bias, int64_t ow0, int64_t np, uint32_t* yrow, const __m512i inter) {
  __m512 acc[CO];
  for (int c = 0; c < CO; ++c) acc[c] = _mm512_set1_ps(bias[co0 + c]);
  for (int ky = 0; ky < 3; ++ky) {
    const uint32_t* r = rows[ky] + ow0;
    for (int64_t p = 0; p < CP; ++p)
      for (int kx = 0; kx < 3; ++kx) {
        const __m512bh A = (__m512bh)_mm512_loadu_si512(r + p * WP + kx);
        const int32_t* wk = wq + ((ky * CP + p) * 3 + kx) * Co + co0;
#pragma GCC unroll 18
        for (int c = 0; c < CO; ++c) acc[c] = _mm512_dpbf16_ps(acc[c], A, (__m512bh)_mm512_set1_epi32(wk[c]));
      }
  }
  __m512i v[16];   // v[j] lane i: pixel i's channels (co0 + 2j, co0 + 2j + 1) as a bf16 pair
  for (int j = 0; j < CO / 2; ++j) v[j] = _mm512_permutexvar_epi16(inter, (__m512i)_mm512_cvtne2ps_pbh(acc[2 * j + 1], acc[2 * j]));
  for (int j = CO / 2; j < 16; ++j) v[j] = _mm512_setzero_si512();
  transpose16(v);
  for (int q = 0; q < np; ++q) _mm512_mask_storeu_epi32(yrow + (ow0 + q) * (Co / 2) + co0 / 2, first_lanes(CO / 2), v[q]);
}
#endif

// y (N, Co, H, W) channels-last bf16 = x ⋆ w + b; flip: w is (C, Co, 3, 3) and is used swapped and reversed (the input gradient)
static at::Tensor conv3_pairs(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, bool flip, const char* name) {
  check_cl(x, flip ? "dy" : "x");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "moonfast kernels: ", name,
              " takes bf16 tensors, got ", x.scalar_type(), " and ", w.scalar_type());
  TORCH_CHECK(w.dim() == 4 && w.size(2) == 3 && w.size(3) == 3 && w.size(flip ? 0 : 1) == x.size(1), "moonfast kernels: ", name,
              ": expected a 3×3 weight ", flip ? "of " : "with ", x.size(1), flip ? " output channels" : " input channels",
              ", got ", w.sizes());
  const int64_t Co = w.size(flip ? 1 : 0);
  TORCH_CHECK(Co >= 2 && Co % 2 == 0, "moonfast kernels: ", name, " computes an even number of channels, got ", Co);
  const bool has_b = b.defined() && b.numel() > 0;
  TORCH_CHECK(!has_b || b.numel() == Co, "moonfast kernels: ", name, ": bias of ", b.numel(), " values for ", Co, " channels");
#if defined(__AVX512BF16__)
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), CP = (C + 1) / 2, WP = round_up(W, 16) + 2;
  auto y = at::empty({N, Co, H, W}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (y.numel() == 0) return y;
  auto wc = w.contiguous();
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(wc.data_ptr());
  std::vector<int32_t> wq(9 * CP * Co, 0);   // wq[ky][p][kx][o]: weight pair (2p, 2p + 1) of output channel o, low half first
  for (int ky = 0; ky < 3; ++ky)
    for (int64_t p = 0; p < CP; ++p)
      for (int kx = 0; kx < 3; ++kx)
        for (int64_t o = 0; o < Co; ++o) {
          uint32_t pr = 0;
          for (int h = 0; h < 2 && 2 * p + h < C; ++h) {
            const int64_t c = 2 * p + h;
            pr |= uint32_t(flip ? wp[((c * Co + o) * 3 + 2 - ky) * 3 + 2 - kx] : wp[((o * C + c) * 3 + ky) * 3 + kx]) << (16 * h);
          }
          wq[((ky * CP + p) * 3 + kx) * Co + o] = int32_t(pr);
        }
  std::vector<float> bias(Co, 0.f);
  if (has_b) { auto bf = b.to(at::kFloat).contiguous(); std::memcpy(bias.data(), bf.data_ptr<float>(), Co * sizeof(float)); }
  const int64_t nT = (Co + 17) / 18, TS = round_up((Co + nT - 1) / nT, 2);   // tiles of at most 18 output channels
  int16_t il[32];
  for (int i = 0; i < 16; ++i) { il[2 * i] = int16_t(i); il[2 * i + 1] = int16_t(16 + i); }
  const __m512i inter = _mm512_loadu_si512(il);
  const uint16_t* xs = reinterpret_cast<const uint16_t*>(x.data_ptr());
  uint32_t* ys = reinterpret_cast<uint32_t*>(y.data_ptr());
  at::parallel_for(0, N, 1, [&](int64_t lo, int64_t hi) {
    std::vector<uint32_t> ring(3 * CP * WP + 16);   // padded image rows r, r + 1, r + 2 in slots r mod 3
    auto slot = [&](int64_t r) { return ring.data() + (r % 3) * CP * WP; };
    for (int64_t n = lo; n < hi; ++n) {
      auto src = [&](int64_t r) { return r >= 1 && r <= H ? xs + (n * H + r - 1) * W * C : nullptr; };   // padded row r
      pair_row(nullptr, C, W, CP, WP, slot(0));
      pair_row(src(1), C, W, CP, WP, slot(1));
      for (int64_t oh = 0; oh < H; ++oh) {
        pair_row(src(oh + 2), C, W, CP, WP, slot(oh + 2));
        const uint32_t* rows[3] = {slot(oh), slot(oh + 1), slot(oh + 2)};
        uint32_t* yrow = ys + (n * H + oh) * W * (Co / 2);
        for (int64_t ow0 = 0; ow0 < W; ow0 += 16)
          for (int64_t co0 = 0; co0 < Co; co0 += TS) {
            const int64_t cn = std::min(TS, Co - co0), np = std::min<int64_t>(16, W - ow0);
            switch (cn) {
#define MOONFAST_PAIR_TILE(k) case k: pair_tile<k>(rows, CP, WP, wq.data(), Co, co0, bias.data(), ow0, np, yrow, inter); break;
              MOONFAST_PAIR_TILE(2) MOONFAST_PAIR_TILE(4) MOONFAST_PAIR_TILE(6) MOONFAST_PAIR_TILE(8) MOONFAST_PAIR_TILE(10)
              MOONFAST_PAIR_TILE(12) MOONFAST_PAIR_TILE(14) MOONFAST_PAIR_TILE(16) MOONFAST_PAIR_TILE(18)
#undef MOONFAST_PAIR_TILE
              default: TORCH_CHECK(false, "moonfast kernels: ", name, ": no tile of ", cn, " channels");
            }
          }
      }
    }
  });
  return y;
#else
  TORCH_CHECK(false, "moonfast kernels: ", name, " needs AVX-512 BF16, which this build lacks");
  return {};
#endif
}

at::Tensor conv3_bf16_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  return conv3_pairs(x, w, b, false, "conv3_bf16_forward");
}

at::Tensor conv3_bf16_backward_input(const at::Tensor& dy, const at::Tensor& w) {
  return conv3_pairs(dy, w, at::Tensor(), true, "conv3_bf16_backward_input");
}
