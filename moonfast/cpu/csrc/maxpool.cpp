// Stride-1 max pool of a channels-last tensor: forward keeps each maximum's window position (one byte), backward
// scatters the gradient to it. NaN wins, ties go to the first position in the window, as in PyTorch.
#include "common.h"
#include "ops.h"

constexpr uint8_t UNSET = 255;

// m, io: running maximum and its window position; take x where it beats m, is NaN, or m is unset.
template <typename E>
static void __attribute__((noinline)) tap_max(const typename E::S* __restrict__ x, typename E::A* __restrict__ m,
                                              uint8_t* __restrict__ io, int64_t lo, int64_t hi, uint8_t pos) {
  for (int64_t j = lo; j < hi; ++j) {
    typename E::A v = E::ld(x[j]);
    bool t = (v > m[j]) | (v != v) | (io[j] == UNSET);
    m[j] = t ? v : m[j];
    io[j] = t ? pos : io[j];
  }
}
// the same over the maxima hm of one input row (positions hk within the row), for window row `base / k`
template <typename A>
static void __attribute__((noinline)) row_max(const A* __restrict__ hm, const uint8_t* __restrict__ hk, A* __restrict__ m,
                                              uint8_t* __restrict__ io, int64_t n, uint8_t base) {
  for (int64_t j = 0; j < n; ++j) {
    A v = hm[j];
    bool t = ((v > m[j]) | (v != v) | (io[j] == UNSET)) & (hk[j] != UNSET);
    m[j] = t ? v : m[j];
    io[j] = t ? uint8_t(base + hk[j]) : io[j];
  }
}
// acc += the output gradients whose window maximum sits at position `pos` of their window
template <typename E>
static void __attribute__((noinline)) tap_grad(const typename E::S* __restrict__ g, const uint8_t* __restrict__ io,
                                               typename E::A* __restrict__ acc, int64_t lo, int64_t hi, uint8_t pos) {
  for (int64_t j = lo; j < hi; ++j) acc[j] += io[j] == pos ? E::ld(g[j]) : typename E::A(0);
}

template <typename T>
static void pool_forward(const typename Elt<T>::S* x, typename Elt<T>::S* y, uint8_t* ix, int64_t N, int64_t H,
                         int64_t W, int64_t C, int64_t OH, int64_t OW, int64_t k, int64_t p) {
  using E = Elt<T>; using A = typename E::A; using S = typename E::S;
  const int64_t L = OW * C;
  at::parallel_for(0, N * OH, 8, [&](int64_t b, int64_t e) {
    std::vector<A> hbuf(k * L), mbuf(L);          // ring of the row maxima of the last k input rows
    std::vector<uint8_t> kbuf(k * L);
    std::vector<int64_t> tag(k, -1);
    A* m = mbuf.data();
    for (int64_t r = b; r < e; ++r) {
      const int64_t n = r / OH, oh = r % OH;
      uint8_t* io = ix + r * L;
      for (int64_t j = 0; j < L; ++j) { m[j] = -INFINITY; io[j] = UNSET; }
      for (int64_t kh = 0; kh < k; ++kh) {
        const int64_t ih = oh - p + kh;
        if (ih < 0 || ih >= H) continue;
        const int64_t slot = ih % k;
        A* hm = hbuf.data() + slot * L;
        uint8_t* hk = kbuf.data() + slot * L;
        if (tag[slot] != n * H + ih) {
          tag[slot] = n * H + ih;
          const S* xr = x + (n * H + ih) * W * C;
          for (int64_t j = 0; j < L; ++j) { hm[j] = -INFINITY; hk[j] = UNSET; }
          for (int64_t kw = 0; kw < k; ++kw) {
            const int64_t d = kw - p, lo = std::max<int64_t>(0, -d) * C, hi = std::min<int64_t>(OW, W - d) * C;
            tap_max<E>(xr + d * C, hm, hk, lo, hi, uint8_t(kw));
          }
        }
        row_max<A>(hm, hk, m, io, L, uint8_t(kh * k));
      }
      S* yr = y + r * L;
      for (int64_t j = 0; j < L; ++j) yr[j] = E::st_exact(m[j]);
    }
  });
}

template <typename T>
static void pool_backward(const typename Elt<T>::S* gy, const uint8_t* ix, typename Elt<T>::S* gx, int64_t N, int64_t H,
                          int64_t W, int64_t C, int64_t OH, int64_t OW, int64_t k, int64_t p) {
  using E = Elt<T>; using A = typename E::A; using S = typename E::S;
  at::parallel_for(0, N * H, 8, [&](int64_t b, int64_t e) {
    std::vector<A> buf(W * C);
    A* acc = buf.data();
    for (int64_t r = b; r < e; ++r) {
      const int64_t n = r / H, ih = r % H;
      for (int64_t j = 0; j < W * C; ++j) acc[j] = 0;
      for (int64_t kh = 0; kh < k; ++kh) {
        const int64_t oh = ih + p - kh;
        if (oh < 0 || oh >= OH) continue;
        const S* gr = gy + (n * OH + oh) * OW * C;
        const uint8_t* ir = ix + (n * OH + oh) * OW * C;
        for (int64_t kw = 0; kw < k; ++kw) {
          const int64_t d = p - kw, lo = std::max<int64_t>(0, -d) * C, hi = std::min<int64_t>(W, OW - d) * C;
          tap_grad<E>(gr + d * C, ir + d * C, acc, lo, hi, uint8_t(kh * k + kw));
        }
      }
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

// Positions are worked on in an integer type as wide as the values (P), not in bytes: a loop that mixes byte and float
// lanes is vectorized 64 values at a time, which the few channels of a pixel (18, 36, …) never fill, so the per-pixel
// loops below ran scalar (5× slower than PyTorch's pool). Bytes are only what is stored between the passes.
template <typename V> struct PosOf { using P = int32_t; };
template <> struct PosOf<double> { using P = int64_t; };
template <> struct PosOf<uint16_t> { using P = int16_t; };

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
      const bool u = (v > m[ow * C + c]) | (v != v);           // NaN wins (the last one), ties keep the first, as in PyTorch
      m[ow * C + c] = u ? v : m[ow * C + c];
      io[ow * C + c] = u ? P(pos) : io[ow * C + c];
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
