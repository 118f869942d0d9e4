// Stride-1 max pool of a channels-last tensor: forward keeps each maximum's window position (one byte), backward
// scatters the gradient to it. NaN wins, ties go to the first position in the window, as in PyTorch.
#include "common.h"
#include "ops.h"
#include <type_traits>

constexpr uint8_t UNSET = 255;   // window positions are stored in a byte: at most 254 of them

// Positions are worked on in an integer type as wide as the values (P), not in bytes: a loop that mixes byte and float
// lanes is vectorized 64 values at a time, which the few channels of a pixel (18, 36, …) never fill, so such loops ran
// scalar (the stride-1 pool's forward took 7× a copy of its input; the strided one's was 5× slower than PyTorch's).
// Bytes are only what is stored between the passes.
template <typename V> struct PosOf { using P = int32_t; };
template <> struct PosOf<double> { using P = int64_t; };
template <> struct PosOf<uint16_t> { using P = int16_t; };

// The rule of every running maximum m and its window position io: v takes over where it beats m or is NaN, so ties
// keep the first position and the last NaN wins, as in PyTorch.
template <typename A, typename P>
static inline void take(A v, A& m, P& io, P pos) {
  const bool t = (v > m) | (v != v);
  m = t ? v : m; io = t ? pos : io;
}

// m, io over a run of values: the first tap of a value sets them (FIRST), a later one follows `take`
template <typename E, bool FIRST>
static void __attribute__((noinline)) tap_max(const typename E::S* __restrict__ x, typename E::A* __restrict__ m,
                                              typename PosOf<typename E::A>::P* __restrict__ io, int64_t lo, int64_t hi,
                                              int pos) {
  using P = typename PosOf<typename E::A>::P;
  for (int64_t j = lo; j < hi; ++j) {
    typename E::A v = E::ld(x[j]);
    if (FIRST) { m[j] = v; io[j] = P(pos); continue; }
    take(v, m[j], io[j], P(pos));
  }
}
// the same over the maxima hm of one input row (positions hk within the row), for window row `base / k`
template <typename A, bool FIRST>
static void __attribute__((noinline)) row_max(const A* __restrict__ hm, const typename PosOf<A>::P* __restrict__ hk,
                                              A* __restrict__ m, typename PosOf<A>::P* __restrict__ io, int64_t n, int base) {
  using P = typename PosOf<A>::P;
  for (int64_t j = 0; j < n; ++j) {
    A v = hm[j];
    if (FIRST) { m[j] = v; io[j] = P(base + hk[j]); continue; }
    take(v, m[j], io[j], P(base + hk[j]));
  }
}
// h where q == k, else +0, as a bit mask of the same width (no branch, no select between different widths): loops of it
// vectorise with AVX2 too, where a select of floats on an integer comparison did not (it needs AVX-512's mask registers)
template <typename A, typename P>
static inline A pick(P q, P k, A h) {
  static_assert(sizeof(A) == sizeof(P), "positions as wide as the values");
  using U = typename std::conditional<sizeof(A) == 8, uint64_t, uint32_t>::type;
  U b; std::memcpy(&b, &h, sizeof b);
  b &= U(0) - U(q == k);
  A r; std::memcpy(&r, &b, sizeof r); return r;
}

// acc += the output gradients whose window maximum sits at position `pos` of their window
template <typename E>
static void __attribute__((noinline)) tap_grad(const typename E::S* __restrict__ g,
                                               const typename PosOf<typename E::A>::P* __restrict__ io,
                                               typename E::A* __restrict__ acc, int64_t lo, int64_t hi, int pos) {
  using P = typename PosOf<typename E::A>::P;
  for (int64_t j = lo; j < hi; ++j) acc[j] += pick(io[j], P(pos), E::ld(g[j]));
}

// The 3×3 pool (the course ResNet's stem) in one pass each way over its interior, where every window position is
// inside the input: the three taps of a row (or the three row maxima of a window) are compared in registers, and the
// forward writes y and the byte positions directly; the backward gathers its nine taps into each input gradient. The
// border rows and columns take the general path (tap by tap), which defines the semantics both share.
template <typename E>
static void __attribute__((noinline)) hmax3(const typename E::S* __restrict__ x, typename E::A* __restrict__ hm,
                                            typename PosOf<typename E::A>::P* __restrict__ hk, int64_t lo, int64_t hi,
                                            int64_t C, int64_t p) {   // output values [lo, hi) of input row x
  using A = typename E::A; using P = typename PosOf<A>::P;
  for (int64_t j = lo; j < hi; ++j) {
    A m = E::ld(x[j - p * C]); P io = 0;
    take(E::ld(x[j + (1 - p) * C]), m, io, P(1));
    take(E::ld(x[j + (2 - p) * C]), m, io, P(2));
    hm[j] = m; hk[j] = io;
  }
}
template <typename E>
static void __attribute__((noinline)) vmax3(const typename E::A* __restrict__ h0, const typename E::A* __restrict__ h1,
                                            const typename E::A* __restrict__ h2,
                                            const typename PosOf<typename E::A>::P* __restrict__ k0,
                                            const typename PosOf<typename E::A>::P* __restrict__ k1,
                                            const typename PosOf<typename E::A>::P* __restrict__ k2,
                                            typename E::S* __restrict__ y, uint8_t* __restrict__ ix, int64_t n) {
  using A = typename E::A; using P = typename PosOf<A>::P;
  for (int64_t j = 0; j < n; ++j) {
    A m = h0[j]; P io = k0[j];
    take(h1[j], m, io, P(3 + k1[j]));
    take(h2[j], m, io, P(6 + k2[j]));
    y[j] = E::st_exact(m); ix[j] = uint8_t(io);
  }
}
// input gradients [lo, hi) of a row whose three window rows are all inside the output: g0..g2 and q0..q2 are the
// output gradient and positions of its windows' rows with kh = 0, 1, 2; taps summed in window order, as tap_grad does
template <typename E>
static void __attribute__((noinline)) grad3(const typename E::S* __restrict__ g0, const typename E::S* __restrict__ g1,
                                            const typename E::S* __restrict__ g2,
                                            const typename PosOf<typename E::A>::P* __restrict__ q0,
                                            const typename PosOf<typename E::A>::P* __restrict__ q1,
                                            const typename PosOf<typename E::A>::P* __restrict__ q2,
                                            typename E::A* __restrict__ acc, int64_t lo, int64_t hi, int64_t C, int64_t p) {
  using A = typename E::A; using P = typename PosOf<A>::P;
  for (int64_t j = lo; j < hi; ++j) {
    const int64_t o0 = j + p * C, o1 = j + (p - 1) * C, o2 = j + (p - 2) * C;   // the output column of tap kw = 0, 1, 2
    A a = 0;
    a += pick(q0[o0], P(0), E::ld(g0[o0])); a += pick(q0[o1], P(1), E::ld(g0[o1])); a += pick(q0[o2], P(2), E::ld(g0[o2]));
    a += pick(q1[o0], P(3), E::ld(g1[o0])); a += pick(q1[o1], P(4), E::ld(g1[o1])); a += pick(q1[o2], P(5), E::ld(g1[o2]));
    a += pick(q2[o0], P(6), E::ld(g2[o0])); a += pick(q2[o1], P(7), E::ld(g2[o1])); a += pick(q2[o2], P(8), E::ld(g2[o2]));
    acc[j] = a;
  }
}

template <typename T>
static void pool_forward(const typename Elt<T>::S* x, typename Elt<T>::S* y, uint8_t* ix, int64_t N, int64_t H,
                         int64_t W, int64_t C, int64_t OH, int64_t OW, int64_t k, int64_t p) {
  using E = Elt<T>; using A = typename E::A; using S = typename E::S; using P = typename PosOf<A>::P;
  const int64_t L = OW * C;
  // output columns [c0, c1) have their whole window inside the input: the 3×3 pool's fused pass; the rest tap by tap
  const int64_t c0 = std::min<int64_t>(p, OW), c1 = k == 3 ? std::max<int64_t>(c0, std::min<int64_t>(OW, W - 2 + p)) : c0;
  // row maxima of input row xr over output columns [a, b), tap by tap: window column kw covers output columns
  // [max(0, p - kw), min(OW, W + p - kw)); kw = 0 comes first for all but the first p, where kw = p - ow is first
  auto taps = [&](const S* xr, A* hm, P* hk, int64_t a, int64_t b) {
    for (int64_t kw = 0; kw < k; ++kw) {
      const int64_t d = kw - p, lo = std::max<int64_t>(std::max<int64_t>(0, -d), a) * C,
                    hi = std::min<int64_t>(std::min<int64_t>(OW, W - d), b) * C;
      if (lo >= hi) continue;
      if (kw == 0) tap_max<E, true>(xr + d * C, hm, hk, lo, hi, 0);
      else if (kw <= p && -d >= a) {
        tap_max<E, true>(xr + d * C, hm, hk, lo, lo + C, int(kw)); tap_max<E, false>(xr + d * C, hm, hk, lo + C, hi, int(kw));
      } else tap_max<E, false>(xr + d * C, hm, hk, lo, hi, int(kw));
    }
  };
  at::parallel_for(0, N * OH, 8, [&](int64_t b, int64_t e) {
    std::vector<A> hbuf(k * L), mbuf(L);          // ring of the row maxima of the last k input rows
    std::vector<P> kbuf(k * L), pbuf(L);
    std::vector<int64_t> tag(k, -1);
    A* m = mbuf.data(); P* io = pbuf.data();
    for (int64_t r = b; r < e; ++r) {
      const int64_t n = r / OH, oh = r % OH;
      for (int64_t kh = 0; kh < k; ++kh) {         // the row maxima of the window's rows inside the input
        const int64_t ih = oh - p + kh, slot = ih % k;
        if (ih < 0 || ih >= H || tag[slot] == n * H + ih) continue;
        tag[slot] = n * H + ih;
        const S* xr = x + (n * H + ih) * W * C;
        A* hm = hbuf.data() + slot * L; P* hk = kbuf.data() + slot * L;
        if (c1 > c0) hmax3<E>(xr, hm, hk, c0 * C, c1 * C, C, p);
        taps(xr, hm, hk, 0, c0); taps(xr, hm, hk, c1, OW);
      }
      S* yr = y + r * L; uint8_t* ir = ix + r * L;
      if (k == 3 && oh - p >= 0 && oh - p + 2 < H) {
        const int64_t s0 = (oh - p) % 3, s1 = (oh - p + 1) % 3, s2 = (oh - p + 2) % 3;
        vmax3<E>(hbuf.data() + s0 * L, hbuf.data() + s1 * L, hbuf.data() + s2 * L,
                 kbuf.data() + s0 * L, kbuf.data() + s1 * L, kbuf.data() + s2 * L, yr, ir, L);
        continue;
      }
      bool first = true;                            // the first window row inside the input sets m and io
      for (int64_t kh = 0; kh < k; ++kh) {
        const int64_t ih = oh - p + kh, slot = ih % k;
        if (ih < 0 || ih >= H) continue;
        if (first) row_max<A, true>(hbuf.data() + slot * L, kbuf.data() + slot * L, m, io, L, int(kh * k));
        else row_max<A, false>(hbuf.data() + slot * L, kbuf.data() + slot * L, m, io, L, int(kh * k));
        first = false;
      }
      for (int64_t j = 0; j < L; ++j) yr[j] = E::st_exact(m[j]);
      for (int64_t j = 0; j < L; ++j) ir[j] = uint8_t(io[j]);
    }
  });
}

template <typename T>
static void pool_backward(const typename Elt<T>::S* gy, const uint8_t* ix, typename Elt<T>::S* gx, int64_t N, int64_t H,
                          int64_t W, int64_t C, int64_t OH, int64_t OW, int64_t k, int64_t p) {
  using E = Elt<T>; using A = typename E::A; using S = typename E::S; using P = typename PosOf<A>::P;
  const int64_t L = OW * C;
  // input columns [c0, c1) are in three windows of every row: the 3×3 pool's fused gather; the rest tap by tap
  const int64_t c0 = std::min<int64_t>(std::max<int64_t>(0, 2 - p), W), c1 = k == 3 ? std::max<int64_t>(c0, std::min<int64_t>(W, OW - p)) : c0;
  at::parallel_for(0, N * H, 8, [&](int64_t b, int64_t e) {
    std::vector<A> buf(W * C);
    std::vector<P> pbuf(k * L);                   // ring of the window positions of the last k output rows, widened
    std::vector<int64_t> tag(k, -1);
    A* acc = buf.data();
    for (int64_t r = b; r < e; ++r) {
      const int64_t n = r / H, ih = r % H;
      const bool inner = k == 3 && ih + p - 2 >= 0 && ih + p < OH;   // all three window rows inside the output
      const int64_t a0 = inner ? c0 : 0, a1 = inner ? c1 : 0;        // columns the fused gather writes
      for (int64_t j = 0; j < a0 * C; ++j) acc[j] = 0;
      for (int64_t j = a1 * C; j < W * C; ++j) acc[j] = 0;
      const S* gr[3]; const P* qr[3];
      for (int64_t kh = 0; kh < k; ++kh) {
        const int64_t oh = ih + p - kh;
        if (oh < 0 || oh >= OH) continue;
        const int64_t orow = n * OH + oh, slot = oh % k;
        P* pr = pbuf.data() + slot * L;
        if (tag[slot] != orow) {
          tag[slot] = orow;
          const uint8_t* ir = ix + orow * L;
          for (int64_t j = 0; j < L; ++j) pr[j] = P(ir[j]);
        }
        const S* g = gy + orow * L;
        if (inner) { gr[kh] = g; qr[kh] = pr; }
        for (int64_t kw = 0; kw < k; ++kw) {       // the columns outside [a0, a1), tap by tap
          const int64_t d = p - kw, lo = std::max<int64_t>(0, -d) * C, hi = std::min<int64_t>(W, OW - d) * C;
          tap_grad<E>(g + d * C, pr + d * C, acc, lo, std::min(hi, a0 * C), int(kh * k + kw));
          tap_grad<E>(g + d * C, pr + d * C, acc, std::max(lo, a1 * C), hi, int(kh * k + kw));
        }
      }
      if (a1 > a0) grad3<E>(gr[0], gr[1], gr[2], qr[0], qr[1], qr[2], acc, a0 * C, a1 * C, C, p);
      S* gw = gx + r * W * C;
      for (int64_t j = 0; j < W * C; ++j) gw[j] = E::st(acc[j]);
    }
  });
}

std::vector<at::Tensor> maxpool_forward(const at::Tensor& x, int64_t k, int64_t p) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "moonfast maxpool: expected a 4-d channels-last CPU tensor");
  TORCH_CHECK(k >= 1 && k * k < UNSET && p >= 0 && 2 * p <= k,   // PyTorch's rule: padding at most half the window
              "moonfast maxpool: unsupported kernel size / padding");
  const auto N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const auto OH = H + 2 * p - k + 1, OW = W + 2 * p - k + 1;
  TORCH_CHECK(OH >= 1 && OW >= 1, "moonfast maxpool: input smaller than the window");
  auto y = at::empty({N, C, OH, OW}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  auto ix = at::empty({N, C, OH, OW}, x.options().dtype(at::kByte).memory_format(at::MemoryFormat::ChannelsLast));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "moonfast_maxpool_forward", [&] {
    pool_forward<scalar_t>(ptr<scalar_t>(x), ptr<scalar_t>(y), ix.data_ptr<uint8_t>(), N, H, W, C, OH, OW, k, p);
  });
  return {y, ix};
}

at::Tensor maxpool_backward(const at::Tensor& gy_, const at::Tensor& ix, int64_t H, int64_t W, int64_t k, int64_t p) {
  auto gy = gy_.contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(gy.sizes() == ix.sizes(), "moonfast maxpool: gradient and positions differ in shape");
  const auto N = gy.size(0), C = gy.size(1), OH = gy.size(2), OW = gy.size(3);
  auto gx = at::empty({N, C, H, W}, gy.options().memory_format(at::MemoryFormat::ChannelsLast));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, gy.scalar_type(), "moonfast_maxpool_backward", [&] {
    pool_backward<scalar_t>(ptr<scalar_t>(gy), ix.data_ptr<uint8_t>(), ptr<scalar_t>(gx), N, H, W, C, OH, OW, k, p);
  });
  return gx;
}

// ---- k×k max pool with stride k and no padding (the U-Net's 2×2 pools): windows do not overlap, so the forward keeps
// each maximum's position in its window (one byte) and the backward writes every input gradient once, no scatter ----


// one window position (pos) over an output row: blocks of C values `xstep` apart in x, C apart in m and io
template <typename E, bool FIRST>
static void __attribute__((noinline)) strided_tap(const typename E::S* __restrict__ x, typename E::A* __restrict__ m,
                                                  typename PosOf<typename E::A>::P* __restrict__ io, int64_t OW, int64_t C,
                                                  int64_t xstep, int pos) {
  using P = typename PosOf<typename E::A>::P;
  for (int64_t ow = 0; ow < OW; ++ow)
    for (int64_t c = 0; c < C; ++c) {
      const typename E::A v = E::ld(x[ow * xstep + c]);
      if (FIRST) { m[ow * C + c] = v; io[ow * C + c] = P(pos); continue; }
      take(v, m[ow * C + c], io[ow * C + c], P(pos));
    }
}
// the input gradient of one window position over an input row: g where the window's maximum sat there, else 0
template <typename S>
static void __attribute__((noinline)) strided_grad(const S* __restrict__ g, const typename PosOf<S>::P* __restrict__ io,
                                                   S* __restrict__ gx, int64_t OW, int64_t C, int64_t xstep, int pos) {
  using P = typename PosOf<S>::P;
  for (int64_t ow = 0; ow < OW; ++ow)
    for (int64_t c = 0; c < C; ++c) gx[ow * xstep + c] = io[ow * C + c] == P(pos) ? g[ow * C + c] : S(0);
}

template <typename T>
static void strided_forward(const typename Elt<T>::S* x, typename Elt<T>::S* y, uint8_t* ix, int64_t N, int64_t H,
                            int64_t W, int64_t C, int64_t OH, int64_t OW, int64_t k) {
  using E = Elt<T>; using A = typename E::A; using S = typename E::S; using P = typename PosOf<A>::P;
  const int64_t L = OW * C;
  at::parallel_for(0, N * OH, 4, [&](int64_t b, int64_t e) {
    std::vector<A> mbuf(L); std::vector<P> pbuf(L);
    for (int64_t r = b; r < e; ++r) {
      const int64_t n = r / OH, oh = r % OH;
      for (int64_t t = 0; t < k * k; ++t) {           // window positions in PyTorch's order: row by row
        const S* xs = x + ((n * H + oh * k + t / k) * W + t % k) * C;
        if (t == 0) strided_tap<E, true>(xs, mbuf.data(), pbuf.data(), OW, C, k * C, 0);
        else strided_tap<E, false>(xs, mbuf.data(), pbuf.data(), OW, C, k * C, int(t));
      }
      S* yr = y + r * L; uint8_t* io = ix + r * L;
      for (int64_t j = 0; j < L; ++j) yr[j] = E::st_exact(mbuf[j]);
      for (int64_t j = 0; j < L; ++j) io[j] = uint8_t(pbuf[j]);
    }
  });
}

template <typename T>
static void strided_backward(const typename Elt<T>::S* gy, const uint8_t* ix, typename Elt<T>::S* gx, int64_t N, int64_t H,
                             int64_t W, int64_t C, int64_t OH, int64_t OW, int64_t k) {
  using S = typename Elt<T>::S; using P = typename PosOf<S>::P;
  at::parallel_for(0, N * H, 8, [&](int64_t b, int64_t e) {
    std::vector<P> pbuf(OW * C);
    int64_t have = -1;                               // the output row whose positions pbuf holds
    for (int64_t r = b; r < e; ++r) {               // input row r: each pixel's gradient from the one window it is in
      const int64_t n = r / H, ih = r % H, oh = ih / k, kh = ih % k;
      S* gr = gx + r * W * C;
      if (oh >= OH) { std::fill(gr, gr + W * C, S(0)); continue; }   // rows past the last window get no gradient
      const int64_t orow = n * OH + oh, o = orow * OW * C;
      if (have != orow) { for (int64_t j = 0; j < OW * C; ++j) pbuf[j] = P(ix[o + j]); have = orow; }
      for (int64_t kw = 0; kw < k; ++kw) strided_grad<S>(gy + o, pbuf.data(), gr + kw * C, OW, C, k * C, int(kh * k + kw));
      std::fill(gr + OW * k * C, gr + W * C, S(0));                    // and columns past it
    }
  });
}

std::vector<at::Tensor> maxpool_strided_forward(const at::Tensor& x, int64_t k) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "moonfast maxpool: expected a 4-d channels-last CPU tensor");
  TORCH_CHECK(k >= 1 && k * k < UNSET, "moonfast maxpool: unsupported kernel size");
  const auto N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), OH = H / k, OW = W / k;
  TORCH_CHECK(OH >= 1 && OW >= 1, "moonfast maxpool: input smaller than the window");
  auto y = at::empty({N, C, OH, OW}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  auto ix = at::empty({N, C, OH, OW}, x.options().dtype(at::kByte).memory_format(at::MemoryFormat::ChannelsLast));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "moonfast_maxpool_strided_forward", [&] {
    strided_forward<scalar_t>(ptr<scalar_t>(x), ptr<scalar_t>(y), ix.data_ptr<uint8_t>(), N, H, W, C, OH, OW, k);
  });
  return {y, ix};
}

at::Tensor maxpool_strided_backward(const at::Tensor& gy_, const at::Tensor& ix, int64_t H, int64_t W, int64_t k) {
  auto gy = gy_.contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(gy.sizes() == ix.sizes(), "moonfast maxpool: gradient and positions differ in shape");
  TORCH_CHECK(ix.is_contiguous(at::MemoryFormat::ChannelsLast), "moonfast maxpool: expected channels-last positions");
  const auto N = gy.size(0), C = gy.size(1), OH = gy.size(2), OW = gy.size(3);
  TORCH_CHECK(OH == H / k && OW == W / k, "moonfast maxpool: gradient shape does not match the input size");
  auto gx = at::empty({N, C, H, W}, gy.options().memory_format(at::MemoryFormat::ChannelsLast));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, gy.scalar_type(), "moonfast_maxpool_strided_backward", [&] {
    strided_backward<scalar_t>(ptr<scalar_t>(gy), ix.data_ptr<uint8_t>(), ptr<scalar_t>(gx), N, H, W, C, OH, OW, k);
  });
  return gx;
}
