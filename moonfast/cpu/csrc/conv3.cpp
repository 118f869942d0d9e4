#include "common.h"
#include "ops.h"
#if defined(__AVX__)
#include <immintrin.h>
#endif

// ---- 3×3 convolution, stride 1, padding 1, on channels-last fp32 tensors, vectorised along the image row ----
// oneDNN vectorises a channels-last convolution over its channels, so a layer of 18 channels fills an AVX-512 register
// and an eighth (18 of 32 lanes). These kernels turn a few rows at a time into channel planes (register
// transposes), run the arithmetic along the row (every lane full), and turn the result back: the narrow layers of
// moonfast's U-Nets then run near the machine's matmul rate. Where oneDNN is faster, moonfast.cpu.conv keeps oneDNN.

#if defined(__AVX512F__)
constexpr int V = 16;
#else
constexpr int V = 8;
#endif
typedef float vf __attribute__((vector_size(V * 4)));
typedef float vfu __attribute__((vector_size(V * 4), aligned(4)));
static inline vf ldu(const float* p) { return *(const vfu*)p; }
static inline void stu(float* p, vf v) { *(vfu*)p = v; }
// Keep v in a register here. Without it GCC folds a load into every FMA that uses it (a value used 3 times is read 3
// times: the weight-gradient loop then waits on loads, not on arithmetic), and in the forward tile it kept accumulators
// on the stack. On a Zen 3 EPYC (AVX2), with the pins (and the 4-channel tile below) the weight gradient of the U-Net's
// 18-72-channel layers ran 1.4-1.65× and its forward tile about 1.3× faster (nbs/13b_cpu_conv.ipynb).
static inline void pin(vf& v) {
#if defined(__AVX512F__)
  asm("" : "+v"(v));   // any of the 32 registers ("x" would allow only the first 16)
#elif defined(__AVX__)
  asm("" : "+x"(v));
#endif
}
constexpr int NREG = V == 16 ? 32 : 16;   // vector registers
constexpr int64_t PADL = V;   // zero columns left of a plane row: one whole vector
constexpr int OBF = 6;        // output channels a forward tile computes
// vector registers: 32 with AVX-512, 16 with AVX2: tiles of 6 channels × 4 vectors (forward) and 4 × 2 channels × 3 taps
// (weight gradient) with AVX-512, 6 × 2 and 4 × 1 × 3 with AVX2, so the accumulators stay in registers (the AVX2
// weight-gradient tile: 12 accumulators, 3 input vectors and 1 gradient vector, all 16 registers, held there by `pin`)
constexpr int WBF = V == 16 ? 4 : 2, WOB = 4, WCB = V == 16 ? 2 : 1;

int64_t conv3_lanes() { return V; }

// Register transposes of TB×TB blocks: 16×16 with AVX-512, 8×8 with AVX2 (plain loops elsewhere)
#if defined(__AVX512F__)
constexpr int TB = 16;
typedef __m512 tb_t;
static inline tb_t tb_load(const float* p) { return _mm512_loadu_ps(p); }
static inline void tb_store(float* p, tb_t v) { _mm512_storeu_ps(p, v); }
static inline void tb_transpose(tb_t r[16]) { transpose16x16(r); }   // r: 16 rows of 16 floats → its transpose, in place
#elif defined(__AVX__)
constexpr int TB = 8;
typedef __m256 tb_t;
static inline tb_t tb_load(const float* p) { return _mm256_loadu_ps(p); }
static inline void tb_store(float* p, tb_t v) { _mm256_storeu_ps(p, v); }
static inline void tb_transpose(tb_t r[8]) {    // r: 8 rows of 8 floats → its transpose, in place
  __m256 t[8], u[8];
  for (int k = 0; k < 4; ++k) { t[2 * k] = _mm256_unpacklo_ps(r[2 * k], r[2 * k + 1]); t[2 * k + 1] = _mm256_unpackhi_ps(r[2 * k], r[2 * k + 1]); }
  for (int k = 0; k < 2; ++k) {
    u[4 * k] = _mm256_shuffle_ps(t[4 * k], t[4 * k + 2], 0x44); u[4 * k + 1] = _mm256_shuffle_ps(t[4 * k], t[4 * k + 2], 0xEE);
    u[4 * k + 2] = _mm256_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0x44); u[4 * k + 3] = _mm256_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0xEE);
  }
  for (int e = 0; e < 4; ++e) { r[e] = _mm256_permute2f128_ps(u[e], u[4 + e], 0x20); r[4 + e] = _mm256_permute2f128_ps(u[e], u[4 + e], 0x31); }
}
#endif

constexpr int64_t LEFT = 4;   // at most this many channels past the last whole block are copied one by one
// P pixels of C channels (pixel p, channel c at p·sp + c) ↔ C planes (at c·sd + p): pixels to planes when TO_PLANES,
// planes to pixels otherwise. TB×TB register transposes where C >= TB; past the last whole block, up to LEFT channels
// are copied one by one, more by a block overlapping the one before (the same values written twice).
template <bool TO_PLANES>
static void relayout(const float* __restrict__ src, float* __restrict__ dst, int64_t sp, int64_t sd, int64_t P, int64_t C) {
  auto px = [&](int64_t p, int64_t c) { return p * sp + c; };   // offset in the pixel layout
  auto pl = [&](int64_t p, int64_t c) { return c * sd + p; };   // offset in the plane layout
  int64_t p0 = 0;
#if defined(__AVX512F__) || defined(__AVX__)
  if (C >= TB)
    for (; p0 + TB <= P; p0 += TB)
      for (int64_t c0 = 0; c0 < C; c0 += TB) {
        if (c0 + TB > C && C - c0 <= LEFT) {   // a few channels left: copied one by one
          for (int j = 0; j < TB; ++j) for (int64_t c = c0; c < C; ++c)
            if (TO_PLANES) dst[pl(p0 + j, c)] = src[px(p0 + j, c)]; else dst[px(p0 + j, c)] = src[pl(p0 + j, c)];
          break;
        }
        const int64_t c = std::min(c0, C - TB);
        tb_t r[TB];   // row i: pixel p0 + i (from pixels) or channel c + i (from planes)
        for (int i = 0; i < TB; ++i) r[i] = tb_load(src + (TO_PLANES ? px(p0 + i, c) : pl(p0, c + i)));
        tb_transpose(r);
        for (int i = 0; i < TB; ++i) tb_store(dst + (TO_PLANES ? pl(p0, c + i) : px(p0 + i, c)), r[i]);
      }
#endif
  for (int64_t p = p0; p < P; ++p) for (int64_t c = 0; c < C; ++c)
    if (TO_PLANES) dst[pl(p, c)] = src[px(p, c)]; else dst[px(p, c)] = src[pl(p, c)];
}

// Image row r (zeros outside 0..H-1) of x (H, W, C) into C plane rows at dst + c·sd: PADL zeros, W values, zeros to LD.
static void load_row(const float* x, int64_t H, int64_t W, int64_t C, int64_t r, float* dst, int64_t sd, int64_t LD) {
  const bool in = r >= 0 && r < H;
  for (int64_t c = 0; c < C; ++c) {
    float* d = dst + c * sd;
    if (!in) { std::memset(d, 0, LD * sizeof(float)); continue; }
    std::memset(d, 0, PADL * sizeof(float)); std::memset(d + PADL + W, 0, (LD - PADL - W) * sizeof(float));
  }
  if (in) relayout<true>(x + r * W * C, dst + PADL, C, sd, W, C);
}

// OBF output channels × WB vectors of one output row: Σ over input planes c and the 3×3 taps (plane rows at off[kh]).
template <int WB>
static inline void fwd_tile(const float* __restrict__ xb, int64_t C, int64_t PS, const int64_t* off, int64_t w0,
                            const float* __restrict__ wp, const float* __restrict__ bias, float* __restrict__ out, int64_t ldo) {
  vf acc[OBF][WB];
  for (int o = 0; o < OBF; ++o) for (int v = 0; v < WB; ++v) acc[o][v] = (vf){} + bias[o];
  for (int64_t c = 0; c < C; ++c)
    for (int kh = 0; kh < 3; ++kh) {
      const float* xr = xb + c * PS + off[kh] + PADL + w0 - 1;
      const float* wk = wp + (c * 3 + kh) * 3 * OBF;
      // With AVX2 (16 registers), unrolled, GCC hoisted the three taps' loads and kept accumulators on the stack: one tap
      // at a time, pinned. With AVX-512 it keeps all 24 in registers unaided, and pinning there made it spill them.
#if !defined(__AVX512F__)
#pragma GCC unroll 1
#endif
      for (int kw = 0; kw < 3; ++kw) {
        vf xv[WB];
        for (int v = 0; v < WB; ++v) { xv[v] = ldu(xr + v * V + kw); if (V == 8) pin(xv[v]); }
        for (int o = 0; o < OBF; ++o) { const float s = wk[kw * OBF + o]; for (int v = 0; v < WB; ++v) acc[o][v] += xv[v] * s; }
        if (V == 8) for (int o = 0; o < OBF; ++o) for (int v = 0; v < WB; ++v) pin(acc[o][v]);
      }
    }
  for (int o = 0; o < OBF; ++o) for (int v = 0; v < WB; ++v) stu(out + o * ldo + w0 + v * V, acc[o][v]);
}

// Weights (O, C, K, K) packed for the forward tiles as [block][c][kh][kw][OBF] (output channels beyond O zero), and
// the biases padded to whole blocks (zeros when `b` is empty).
static std::pair<at::Tensor, at::Tensor> pack_weights(const at::Tensor& w, const at::Tensor& b, int64_t K) {
  const int64_t O = w.size(0), C = w.size(1), Op = round_up(O, OBF);
  auto wpad = at::zeros({Op, C, K, K}, w.options());
  wpad.narrow(0, 0, O).copy_(w);
  auto bp = at::zeros({Op}, w.options());
  if (b.numel()) bp.narrow(0, 0, O).copy_(b.reshape({O}));
  return {wpad.view({Op / OBF, OBF, C, K, K}).permute({0, 2, 3, 4, 1}).contiguous(), bp};
}

// Tasks of the forward passes: image n, a block of its Ho output rows; fewer images than twice the threads: split the
// rows too. Returns (blocks an image, rows a block).
static std::pair<int64_t, int64_t> row_blocks(int64_t N, int64_t Ho) {
  const int64_t nt = at::get_num_threads();
  const int64_t nblk = N >= 2 * nt ? 1 : std::min(Ho, (2 * nt + N - 1) / N);
  return {nblk, (Ho + nblk - 1) / nblk};
}

// Add one task's bias gradient (Σ of RR gradient plane rows of O channels in gb) into the thread's partials at `m`.
static void bias_part(const float* gb, int64_t O, int64_t RR, int64_t LD, int64_t Wv, float* m) {
  for (int64_t oc = 0; oc < O; ++oc) {
    vf a = (vf){};
    for (int64_t i = 0; i < RR; ++i) for (int64_t w0 = 0; w0 < Wv; w0 += V) a += ldu(gb + (oc * RR + i) * LD + PADL + w0);
    stu(m + oc * V, ldu(m + oc * V) + a);
  }
}

// The threads' partial sums (nw weights then O biases, V lanes each) summed in double: the weight gradient of `shape`
// and the bias gradient (O values when `bias`, else empty), float32.
static std::vector<at::Tensor> reduce_parts(const std::vector<std::vector<float>>& parts, at::IntArrayRef shape, bool bias,
                                            const at::TensorOptions& opt) {
  const int64_t O = shape[0], nw = c10::multiply_integers(shape);
  std::vector<double> dw(nw, 0.0), db(O, 0.0);
  for (const auto& p : parts) {
    if (p.empty()) continue;
    for (int64_t j = 0; j < nw; ++j) { double s = 0; for (int l = 0; l < V; ++l) s += p[j * V + l]; dw[j] += s; }
    for (int64_t oc = 0; oc < O; ++oc) { double s = 0; for (int l = 0; l < V; ++l) s += p[(nw + oc) * V + l]; db[oc] += s; }
  }
  auto gw = at::empty(shape, opt), gbias = at::empty({bias ? O : 0}, opt);
  float* gwp = gw.data_ptr<float>();
  for (int64_t j = 0; j < nw; ++j) gwp[j] = float(dw[j]);
  if (bias) { float* gbp = gbias.data_ptr<float>(); for (int64_t oc = 0; oc < O; ++oc) gbp[oc] = float(db[oc]); }
  return {gw, gbias};
}

// A weight gradient of `shape` (O, C, K, K) summed over `tasks` tasks: body(part, s, e) adds tasks s..e-1 into its
// thread's float partials `part` (the weights, then O biases, V lanes each), which are then summed in double.
template <typename F>
static std::vector<at::Tensor> weight_grad_tasks(int64_t tasks, at::IntArrayRef shape, bool bias, const at::TensorOptions& opt, F body) {
  const int64_t n = c10::multiply_integers(shape) + shape[0];
  std::vector<std::vector<float>> parts(at::get_num_threads());
  at::parallel_for(0, tasks, 1, [&](int64_t s, int64_t e) {
    auto& part = parts[at::get_thread_num()];
    if (part.empty()) part.assign(n * V, 0.f);
    body(part.data(), s, e);
  });
  return reduce_parts(parts, shape, bias, opt);
}

static void check_conv(const at::Tensor& x, const at::Tensor& w, const char* what) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4 && x.scalar_type() == at::kFloat && x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "moonfast conv3x3: expected ", what, " to be a 4-d channels-last float32 CPU tensor");
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 4 && w.size(2) == 3 && w.size(3) == 3 && w.scalar_type() == at::kFloat,
              "moonfast conv3x3: expected float32 CPU weights of shape (out, in, 3, 3)");
}

// x (N, C, H, W) channels-last; w (O, C, 3, 3); b: O values or an empty tensor. Returns the channels-last (N, O, H, W) output.
at::Tensor conv3_forward(const at::Tensor& x, const at::Tensor& w_, const at::Tensor& b_) {
  check_conv(x, w_, "the input");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), O = w_.size(0);
  TORCH_CHECK(w_.size(1) == C, "moonfast conv3x3: weights for ", w_.size(1), " input channels, input has ", C);
  TORCH_CHECK(b_.numel() == 0 || (b_.numel() == O && b_.scalar_type() == at::kFloat), "moonfast conv3x3: expected ", O, " float32 biases");
  const int64_t Op = round_up(O, OBF), NB = Op / OBF, Wv = round_up(W, V), LD = PADL + Wv + V, PS = 3 * LD;
  const auto [wp, bp] = pack_weights(w_, b_, 3);
  auto y = at::empty({N, O, H, W}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (y.numel() == 0) return y;
  const float* xp = x.data_ptr<float>(); const float* wpp = wp.data_ptr<float>(); const float* bpp = bp.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const auto [nblk, RB] = row_blocks(N, H);   // each task: image n, rows h0..h1-1
  at::parallel_for(0, N * nblk, 1, [&](int64_t s, int64_t e) {
    std::vector<float> buf(C * PS), ot(Op * Wv);
    for (int64_t t = s; t < e; ++t) {
      const int64_t n = t / nblk, h0 = (t % nblk) * RB, h1 = std::min(H, h0 + RB);
      const float* xn = xp + n * H * W * C;
      // three plane rows a plane, used in rotation: image row r lives in slot r mod 3
      auto slot = [&](int64_t r) { return ((r % 3) + 3) % 3 * LD; };
      if (h0 < h1) { load_row(xn, H, W, C, h0 - 1, buf.data() + slot(h0 - 1), PS, LD); load_row(xn, H, W, C, h0, buf.data() + slot(h0), PS, LD); }
      for (int64_t h = h0; h < h1; ++h) {
        load_row(xn, H, W, C, h + 1, buf.data() + slot(h + 1), PS, LD);
        if (h + 1 < h1) {   // the next input row (to L2) and output row (for writing), while this row computes: 2-10% faster
          const char* nx = reinterpret_cast<const char*>(xn + std::min(h + 2, H - 1) * W * C);
          for (int64_t q = 0; q < W * C * 4; q += 64) __builtin_prefetch(nx + q, 0, 2);
          char* ny = reinterpret_cast<char*>(yp + (n * H + h + 1) * W * O);
          for (int64_t q = 0; q < W * O * 4; q += 64) __builtin_prefetch(ny + q, 1, 2);
        }
        const int64_t off[3] = {slot(h - 1), slot(h), slot(h + 1)};
        for (int64_t ob = 0; ob < NB; ++ob) {
          const float* wo = wpp + ob * C * 9 * OBF; const float* bo = bpp + ob * OBF;
          float* oo = ot.data() + ob * OBF * Wv;
          int64_t w0 = 0;
          if (WBF == 4) for (; w0 + 4 * V <= Wv; w0 += 4 * V) fwd_tile<WBF>(buf.data(), C, PS, off, w0, wo, bo, oo, Wv);
          for (; w0 + 2 * V <= Wv; w0 += 2 * V) fwd_tile<2>(buf.data(), C, PS, off, w0, wo, bo, oo, Wv);
          for (; w0 < Wv; w0 += V) fwd_tile<1>(buf.data(), C, PS, off, w0, wo, bo, oo, Wv);
        }
        relayout<false>(ot.data(), yp + (n * H + h) * W * O, O, Wv, W, O);
      }
    }
  });
  return y;
}

// The input gradient: a convolution of dy with the weights flipped and their in/out channels swapped.
at::Tensor conv3_backward_input(const at::Tensor& dy, const at::Tensor& w) {
  check_conv(dy, w, "the output gradient");
  return conv3_forward(dy, w.flip({2, 3}).transpose(0, 1).contiguous(), at::empty({0}, w.options()));
}

// OB output channels × CB input channels × 3 horizontal taps, for one vertical tap, summed over RR rows and Wv columns.
template <int OB, int CB>
static inline void wgrad_tile(const float* __restrict__ xr, int64_t xs, const float* __restrict__ gr, int64_t gs,
                              int64_t RR, int64_t LD, int64_t Wv, float* __restrict__ part, int64_t ps) {
  vf acc[OB][CB][3];
  for (int o = 0; o < OB; ++o) for (int c = 0; c < CB; ++c) for (int k = 0; k < 3; ++k) acc[o][c][k] = (vf){};
  for (int64_t i = 0; i < RR; ++i) {
    const float* x = xr + i * LD; const float* g = gr + i * LD;
    for (int64_t w0 = 0; w0 < Wv; w0 += V) {
      vf xv[CB][3];
      for (int c = 0; c < CB; ++c) for (int k = 0; k < 3; ++k) { xv[c][k] = ldu(x + c * xs + w0 + k - 1); pin(xv[c][k]); }
      for (int o = 0; o < OB; ++o) {
        vf gg = ldu(g + o * gs + w0);
        pin(gg);
        for (int c = 0; c < CB; ++c) for (int k = 0; k < 3; ++k) acc[o][c][k] += gg * xv[c][k];
      }
    }
  }
  for (int o = 0; o < OB; ++o) for (int c = 0; c < CB; ++c) for (int k = 0; k < 3; ++k) {
    float* m = part + o * ps + (c * 9 + k) * V;   // part: [o][c][kh][kw][V], kh already in the pointer
    stu(m, ldu(m) + acc[o][c][k]);
  }
}

template <int OB>
static void wgrad_block(const float* xb, int64_t C, int64_t R, const float* gb, int64_t RR, int64_t LD, int64_t Wv,
                        float* part, int64_t ps) {
  for (int64_t c = 0; c < C; c += WCB)
    for (int kh = 0; kh < 3; ++kh) {
      const float* xr = xb + (c * R + kh) * LD + PADL;
      float* pc = part + (c * 9 + kh * 3) * V;
      if (c + WCB <= C) wgrad_tile<OB, WCB>(xr, R * LD, gb + PADL, RR * LD, RR, LD, Wv, pc, ps);
      else wgrad_tile<OB, 1>(xr, R * LD, gb + PADL, RR * LD, RR, LD, Wv, pc, ps);
    }
}

// dy (N, O, H, W) and x (N, C, H, W), both channels-last: the weight gradient (O, C, 3, 3) and, when `bias`, the bias
// gradient (O), float32 (summed in float vectors per thread, then in double).
std::vector<at::Tensor> conv3_backward_weight(const at::Tensor& dy, const at::Tensor& x, bool bias) {
  check_conv(x, at::empty({1, 1, 3, 3}, x.options()), "the input");
  check_conv(dy, at::empty({1, 1, 3, 3}, x.options()), "the output gradient");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), O = dy.size(1);
  TORCH_CHECK(dy.size(0) == N && dy.size(2) == H && dy.size(3) == W, "moonfast conv3x3: output gradient of shape ", dy.sizes(),
              " for an input of shape ", x.sizes());
  const int64_t Wv = round_up(W, V), LD = PADL + Wv + V, RB = std::min<int64_t>(H, std::max<int64_t>(8, 1024 / Wv));
  const int64_t nblk = H ? (H + RB - 1) / RB : 0;
  const int64_t ps = C * 9 * V;   // one output channel's partial sums
  const float* xp = x.data_ptr<float>(); const float* gp = dy.data_ptr<float>();
  return weight_grad_tasks(N * nblk, {O, C, 3, 3}, bias, x.options(), [&](float* part, int64_t s, int64_t e) {
    std::vector<float> xb(C * (RB + 2) * LD), gb(O * RB * LD);
    for (int64_t t = s; t < e; ++t) {
      const int64_t n = t / nblk, h0 = (t % nblk) * RB, h1 = std::min(H, h0 + RB), RR = h1 - h0, R = RR + 2;
      for (int64_t i = 0; i < R; ++i) load_row(xp + n * H * W * C, H, W, C, h0 - 1 + i, xb.data() + i * LD, R * LD, LD);
      for (int64_t i = 0; i < RR; ++i) load_row(gp + n * H * W * O, H, W, O, h0 + i, gb.data() + i * LD, RR * LD, LD);
      // blocks of WOB = 4 channels, the last ones of 3 where that leaves no remainder (18 = 4·3 + 3·2)
      const int64_t n3 = std::min<int64_t>((4 - O % 4) % 4, O / 3);
      int64_t o = 0;
      for (; o + WOB <= O - 3 * n3; o += WOB) wgrad_block<WOB>(xb.data(), C, R, gb.data() + o * RR * LD, RR, LD, Wv, part + o * ps, ps);
      for (int64_t j = 0; j < n3; ++j, o += 3) wgrad_block<3>(xb.data(), C, R, gb.data() + o * RR * LD, RR, LD, Wv, part + o * ps, ps);
      const float* go = gb.data() + o * RR * LD; float* po = part + o * ps;
      switch (O - o) {   // left over: 2 channels (O = 2 or 5) or 1 (O = 1)
        case 2: wgrad_block<2>(xb.data(), C, R, go, RR, LD, Wv, po, ps); break;
        case 1: wgrad_block<1>(xb.data(), C, R, go, RR, LD, Wv, po, ps); break;
        default: break;
      }
      if (bias) bias_part(gb.data(), O, RR, LD, Wv, part + O * ps);
    }
  });
}

// ---- K×K convolution (K = 3, 5 or 7), stride 2, padding K/2, on channels-last fp32 tensors, along the image row ----
// The ResNet's stem (7×7 on 3 channels) and its first 3×3 stride-2 layer are where oneDNN's channel-vectorised code
// is furthest from the matmul rate (3 input channels, 18 outputs). Each input row is split into its even and its odd
// columns (two "phase" rows a plane), so the input of a tap is again a contiguous run: output column w, tap kx reads
// input column 2w + kx − K/2, which is phase (kx − K/2) mod 2 at index w + ⌊(kx − K/2)/2⌋. The input gradient stays
// oneDNN's (the stem's input, the image, needs none).

// Input row r of x (H, W, C), zeros outside 0..H-1, as C × 2 phase rows at dst + (2c + p)·LD: PADL zeros, then
// x[r, 2j + p] for j = 0, 1, …, zeros to LD. tmp: room for C·W floats.
static void load_phase_row(const float* x, int64_t H, int64_t W, int64_t C, int64_t r, float* dst, int64_t LD, float* tmp) {
  if (r < 0 || r >= H) { std::memset(dst, 0, 2 * C * LD * sizeof(float)); return; }
  relayout<true>(x + r * W * C, tmp, C, W, W, C);   // C planes of W
  const int64_t We = (W + 1) / 2, Wo = W / 2;
  for (int64_t c = 0; c < C; ++c) {
    const float* s = tmp + c * W;
    float* e = dst + 2 * c * LD; float* o = e + LD;
    std::memset(e, 0, PADL * sizeof(float)); std::memset(o, 0, PADL * sizeof(float));
    for (int64_t j = 0; j < Wo; ++j) { e[PADL + j] = s[2 * j]; o[PADL + j] = s[2 * j + 1]; }
    if (We > Wo) e[PADL + Wo] = s[2 * Wo];
    std::memset(e + PADL + We, 0, (LD - PADL - We) * sizeof(float));
    std::memset(o + PADL + Wo, 0, (LD - PADL - Wo) * sizeof(float));
  }
}

// where tap kx reads: phase and index shift
template <int K> static constexpr int tap_phase(int kx) { return (kx - K / 2) & 1; }
template <int K> static constexpr int tap_shift(int kx) { return (kx - K / 2 - tap_phase<K>(kx)) / 2; }

// OBF output channels × WB vectors of one output row; off[kh]: the slot of input row 2h + kh − K/2, C·2 phase rows each.
template <int K, int WB>
static inline void fwd2_tile(const float* __restrict__ buf, int64_t C, int64_t LD, const int64_t* off, int64_t w0,
                             const float* __restrict__ wp, const float* __restrict__ bias, float* __restrict__ out, int64_t ldo) {
  vf acc[OBF][WB];
  for (int o = 0; o < OBF; ++o) for (int v = 0; v < WB; ++v) acc[o][v] = (vf){} + bias[o];
  for (int64_t c = 0; c < C; ++c)
    for (int kh = 0; kh < K; ++kh) {
      const float* xr = buf + off[kh] + 2 * c * LD + PADL + w0;
      const float* wk = wp + (c * K + kh) * K * OBF;
#pragma GCC unroll 7
      for (int kx = 0; kx < K; ++kx) {
        const float* xp = xr + tap_phase<K>(kx) * LD + tap_shift<K>(kx);
        vf xv[WB];
        for (int v = 0; v < WB; ++v) xv[v] = ldu(xp + v * V);
        for (int o = 0; o < OBF; ++o) { const float s = wk[kx * OBF + o]; for (int v = 0; v < WB; ++v) acc[o][v] += xv[v] * s; }
      }
    }
  for (int o = 0; o < OBF; ++o) for (int v = 0; v < WB; ++v) stu(out + o * ldo + w0 + v * V, acc[o][v]);
}

static void check_conv_s2(const at::Tensor& x, const at::Tensor& w, int64_t K, const char* what) {
  TORCH_CHECK(K == 3 || K == 5 || K == 7, "moonfast conv_s2: kernel size ", K, " (expected 3, 5 or 7)");
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4 && x.scalar_type() == at::kFloat && x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "moonfast conv_s2: expected ", what, " to be a 4-d channels-last float32 CPU tensor");
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 4 && w.size(2) == K && w.size(3) == K && w.scalar_type() == at::kFloat,
              "moonfast conv_s2: expected float32 CPU weights of shape (out, in, ", K, ", ", K, ")");
}

template <int K>
static at::Tensor convs2_forward_k(const at::Tensor& x, const at::Tensor& w_, const at::Tensor& b_) {
  constexpr int P = K / 2, S = K + 1;   // padding; input-row slots in rotation
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), O = w_.size(0);
  const int64_t Ho = (H - 1) / 2 + 1, Wo = (W - 1) / 2 + 1;
  const int64_t Op = round_up(O, OBF), NB = Op / OBF, Wv = round_up(Wo, V), LD = PADL + Wv + V, SL = 2 * C * LD;
  const auto [wp, bp] = pack_weights(w_, b_, K);
  auto y = at::empty({N, O, Ho, Wo}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (y.numel() == 0) return y;
  const float* xp = x.data_ptr<float>(); const float* wpp = wp.data_ptr<float>(); const float* bpp = bp.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const auto [nblk, RB] = row_blocks(N, Ho);
  at::parallel_for(0, N * nblk, 1, [&](int64_t s, int64_t e) {
    std::vector<float> buf(S * SL), ot(Op * Wv), tmp(W * C);
    for (int64_t t = s; t < e; ++t) {
      const int64_t n = t / nblk, h0 = (t % nblk) * RB, h1 = std::min(Ho, h0 + RB);
      const float* xn = xp + n * H * W * C;
      auto slot = [&](int64_t r) { return ((r % S) + S) % S * SL; };
      int64_t next = 2 * h0 - P;   // the next input row to load
      for (int64_t h = h0; h < h1; ++h) {
        for (; next <= 2 * h + P; ++next) load_phase_row(xn, H, W, C, next, buf.data() + slot(next), LD, tmp.data());
        int64_t off[K];
        for (int kh = 0; kh < K; ++kh) off[kh] = slot(2 * h + kh - P);
        for (int64_t ob = 0; ob < NB; ++ob) {
          const float* wo = wpp + ob * C * K * K * OBF; const float* bo = bpp + ob * OBF;
          float* oo = ot.data() + ob * OBF * Wv;
          int64_t w0 = 0;
          if (WBF == 4) for (; w0 + 4 * V <= Wv; w0 += 4 * V) fwd2_tile<K, WBF>(buf.data(), C, LD, off, w0, wo, bo, oo, Wv);
          for (; w0 + 2 * V <= Wv; w0 += 2 * V) fwd2_tile<K, 2>(buf.data(), C, LD, off, w0, wo, bo, oo, Wv);
          for (; w0 < Wv; w0 += V) fwd2_tile<K, 1>(buf.data(), C, LD, off, w0, wo, bo, oo, Wv);
        }
        relayout<false>(ot.data(), yp + (n * Ho + h) * Wo * O, O, Wv, Wo, O);
      }
    }
  });
  return y;
}

// x (N, C, H, W) channels-last; w (O, C, K, K); b: O values or an empty tensor. The channels-last (N, O, ⌈H/2⌉, ⌈W/2⌉) output.
at::Tensor convs2_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  const int64_t K = w.dim() == 4 ? w.size(2) : 0;
  check_conv_s2(x, w, K, "the input");
  TORCH_CHECK(w.size(1) == x.size(1), "moonfast conv_s2: weights for ", w.size(1), " input channels, input has ", x.size(1));
  TORCH_CHECK(b.numel() == 0 || (b.numel() == w.size(0) && b.scalar_type() == at::kFloat), "moonfast conv_s2: expected ",
              w.size(0), " float32 biases");
  return K == 3 ? convs2_forward_k<3>(x, w, b) : K == 5 ? convs2_forward_k<5>(x, w, b) : convs2_forward_k<7>(x, w, b);
}

// OB output channels × K horizontal taps of one input channel and one vertical tap, summed over RR output rows.
// xr: the phase rows of input row 2·0 + kh (row i at xr + 2i·xs); gr: OB gradient plane rows (row i at gr + i·LD).
template <int K, int OB>
static inline void wgrad2_tile(const float* __restrict__ xr, int64_t xs, int64_t LD, const float* __restrict__ gr, int64_t gs,
                               int64_t RR, int64_t Wv, float* __restrict__ part, int64_t ps) {
  vf acc[OB][K];
  for (int o = 0; o < OB; ++o) for (int k = 0; k < K; ++k) acc[o][k] = (vf){};
  for (int64_t i = 0; i < RR; ++i) {
    const float* x = xr + 2 * i * xs; const float* g = gr + i * LD;
    for (int64_t w0 = 0; w0 < Wv; w0 += V) {
      vf gg[OB];
      for (int o = 0; o < OB; ++o) { gg[o] = ldu(g + o * gs + w0); pin(gg[o]); }
#pragma GCC unroll 7
      for (int k = 0; k < K; ++k) {
        vf xv = ldu(x + tap_phase<K>(k) * LD + tap_shift<K>(k) + w0);
        if (OB * K + OB + 1 <= NREG) pin(xv);   // else no register is left for it: read from memory by each FMA
        for (int o = 0; o < OB; ++o) acc[o][k] += gg[o] * xv;
      }
    }
  }
  for (int o = 0; o < OB; ++o) for (int k = 0; k < K; ++k) { float* m = part + o * ps + k * V; stu(m, ldu(m) + acc[o][k]); }
}

template <int K>
static std::vector<at::Tensor> convs2_backward_weight_k(const at::Tensor& dy, const at::Tensor& x, bool bias) {
  constexpr int P = K / 2;
  // accumulators in registers: OB × K of them (16 vector registers with AVX2, 32 with AVX-512)
  constexpr int OB = V == 16 ? (K == 7 ? 3 : K == 5 ? 4 : 6) : (K == 7 ? 2 : K == 5 ? 2 : 3);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), O = dy.size(1), Ho = dy.size(2), Wo = dy.size(3);
  const int64_t Wv = round_up(Wo, V), LD = PADL + Wv + V, RB = std::min<int64_t>(Ho, std::max<int64_t>(4, 512 / Wv));
  const int64_t nblk = Ho ? (Ho + RB - 1) / RB : 0, ps = C * K * K * V;
  const float* xp = x.data_ptr<float>(); const float* gp = dy.data_ptr<float>();
  return weight_grad_tasks(N * nblk, {O, C, K, K}, bias, x.options(), [&](float* part, int64_t s, int64_t e) {
    const int64_t XR = 2 * RB + K - 2;   // input rows a block of RB output rows reads
    std::vector<float> xb(XR * 2 * C * LD), gb(O * RB * LD), tmp(std::max(W, Wo) * std::max(C, O));
    for (int64_t t = s; t < e; ++t) {
      const int64_t n = t / nblk, h0 = (t % nblk) * RB, h1 = std::min(Ho, h0 + RB), RR = h1 - h0, R = 2 * RR + K - 2;
      for (int64_t i = 0; i < R; ++i) load_phase_row(xp + n * H * W * C, H, W, C, 2 * h0 - P + i, xb.data() + i * 2 * C * LD, LD, tmp.data());
      for (int64_t i = 0; i < RR; ++i) load_row(gp + n * Ho * Wo * O, Ho, Wo, O, h0 + i, gb.data() + i * LD, RR * LD, LD);
      for (int64_t c = 0; c < C; ++c)
        for (int kh = 0; kh < K; ++kh) {
          const float* xr = xb.data() + (kh * 2 * C + 2 * c) * LD + PADL;
          float* pc = part + (c * K + kh) * K * V;
          int64_t o = 0;
          for (; o + OB <= O; o += OB) wgrad2_tile<K, OB>(xr, 2 * C * LD, LD, gb.data() + o * RR * LD + PADL, RR * LD, RR, Wv, pc + o * ps, ps);
          for (; o < O; ++o) wgrad2_tile<K, 1>(xr, 2 * C * LD, LD, gb.data() + o * RR * LD + PADL, RR * LD, RR, Wv, pc + o * ps, ps);
        }
      if (bias) bias_part(gb.data(), O, RR, LD, Wv, part + O * ps);
    }
  });
}

// dy (N, O, ⌈H/2⌉, ⌈W/2⌉) and x (N, C, H, W), both channels-last; K the kernel size: the weight gradient (O, C, K, K)
// and, when `bias`, the bias gradient (O), float32 (summed in float vectors per thread, then in double).
std::vector<at::Tensor> convs2_backward_weight(const at::Tensor& dy, const at::Tensor& x, int64_t K, bool bias) {
  check_conv_s2(x, at::empty({1, 1, K, K}, x.options()), K, "the input");
  check_conv_s2(dy, at::empty({1, 1, K, K}, x.options()), K, "the output gradient");
  TORCH_CHECK(dy.size(0) == x.size(0) && dy.size(2) == (x.size(2) - 1) / 2 + 1 && dy.size(3) == (x.size(3) - 1) / 2 + 1,
              "moonfast conv_s2: output gradient of shape ", dy.sizes(), " for an input of shape ", x.sizes());
  return K == 3 ? convs2_backward_weight_k<3>(dy, x, bias) : K == 5 ? convs2_backward_weight_k<5>(dy, x, bias)
                : convs2_backward_weight_k<7>(dy, x, bias);
}
