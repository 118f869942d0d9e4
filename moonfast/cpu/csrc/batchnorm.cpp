// ---- batch norm (+ ReLU) over a channels-last tensor: N·H rows of L = W·C values; column j is channel j % C ----
#include "common.h"
#include "ops.h"


template <typename E>
static void __attribute__((noinline)) acc_moments(const typename E::S* __restrict__ x, const float* __restrict__ shift,
                                                  typename E::A* __restrict__ s, typename E::A* __restrict__ q, int64_t L) {
  for (int64_t j = 0; j < L; ++j) { typename E::A v = E::ld(x[j]) - shift[j]; s[j] += v; q[j] += v * v; }
}
template <typename E, bool RELU>
static void __attribute__((noinline)) affine_row(const typename E::S* __restrict__ x, typename E::S* __restrict__ y,
                                                 const typename E::A* __restrict__ a, const typename E::A* __restrict__ b, int64_t L) {
  for (int64_t j = 0; j < L; ++j) {
    typename E::A z = std::fma(E::ld(x[j]), a[j], b[j]);
    if (RELU) z = z < 0 ? typename E::A(0) : z;     // NaN stays NaN, as in torch.relu
    y[j] = E::st(z);
  }
}
// the ReLU's gradient mask is recomputed from x with the same fma as the forward pass, so it is the same decision
template <typename E, bool RELU>
static void __attribute__((noinline)) acc_grad(const typename E::S* __restrict__ dy, const typename E::S* __restrict__ x,
                                               const typename E::A* __restrict__ a, const typename E::A* __restrict__ b,
                                               const typename E::A* __restrict__ mu, typename E::A* __restrict__ sg,
                                               typename E::A* __restrict__ sgx, int64_t L) {
  for (int64_t j = 0; j < L; ++j) {
    typename E::A xv = E::ld(x[j]), g = E::ld(dy[j]);
    if (RELU) g = std::fma(xv, a[j], b[j]) > 0 ? g : typename E::A(0);
    sg[j] += g; sgx[j] += g * (xv - mu[j]);
  }
}
template <typename E, bool RELU>
static void __attribute__((noinline)) grad_row(const typename E::S* __restrict__ dy, const typename E::S* __restrict__ x,
                                               typename E::S* __restrict__ dx, const typename E::A* __restrict__ a,
                                               const typename E::A* __restrict__ b, const typename E::A* __restrict__ ga,
                                               const typename E::A* __restrict__ gb, const typename E::A* __restrict__ gc, int64_t L) {
  for (int64_t j = 0; j < L; ++j) {
    typename E::A xv = E::ld(x[j]), g = E::ld(dy[j]);
    if (RELU) g = std::fma(xv, a[j], b[j]) > 0 ? g : typename E::A(0);
    dx[j] = E::st(std::fma(ga[j], g, std::fma(gb[j], xv, gc[j])));
  }
}

// Biased mean and variance per channel (float64), from sums shifted by the first pixel's values.
std::vector<at::Tensor> bn_stats(const at::Tensor& x) {
  check_cl(x, "the input");
  const auto N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), L = W * C, R = N * H;
  TORCH_CHECK(R * W > 0, "moonfast batch norm: empty input");
  auto opt = x.options().dtype(at::kDouble);
  auto mean = at::empty({C}, opt), var = at::empty({C}, opt);
  auto shift = x.index({0, at::indexing::Slice(), 0, 0}).to(at::kFloat).repeat({W}).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "moonfast_bn_stats", [&] {
    using E = Elt<scalar_t>; using A = typename E::A;
    const typename E::S* xp = ptr<scalar_t>(x);
    const float* sh = shift.data_ptr<float>();
    column_sums<A>(R, L, C, mean.data_ptr<double>(), var.data_ptr<double>(),
                   [&](int64_t r, A* s, A* q) { acc_moments<E>(xp + r * L, sh, s, q, L); });
  });
  const double M = double(R * W);
  auto d = mean / M;
  var = (var / M - d * d).clamp_min(0);
  mean = d + shift.index({at::indexing::Slice(0, C)}).to(at::kDouble);
  return {mean, var};
}

// y = relu?(x·a + b) with a, b given per column (L values)
at::Tensor bn_apply(const at::Tensor& x, const at::Tensor& a, const at::Tensor& b, bool relu) {
  check_cl(x, "the input");
  const auto N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), L = W * C, R = N * H;
  auto y = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "moonfast_bn_apply", [&] {
    using E = Elt<scalar_t>;
    check_rows<scalar_t>({a, b}, L);
    const typename E::S* xp = ptr<scalar_t>(x); typename E::S* yp = ptr<scalar_t>(y);
    const auto *ap = row_ptr<scalar_t>(a), *bp = row_ptr<scalar_t>(b);
    at::parallel_for(0, R, 16, [&](int64_t s, int64_t e) {
      for (int64_t r = s; r < e; ++r) {
        if (relu) affine_row<E, true>(xp + r * L, yp + r * L, ap, bp, L);
        else affine_row<E, false>(xp + r * L, yp + r * L, ap, bp, L);
      }
    });
  });
  return y;
}

// Per channel (float64): Σg and Σg·(x − mean), g = dy masked by the ReLU when relu
std::vector<at::Tensor> bn_grad_sums(const at::Tensor& dy_, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
                                     const at::Tensor& mu, bool relu) {
  check_cl(x, "the input");
  auto dy = dy_.contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(), "moonfast batch norm: gradient and input differ");
  const auto N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), L = W * C, R = N * H;
  auto opt = x.options().dtype(at::kDouble);
  auto sg = at::empty({C}, opt), sgx = at::empty({C}, opt);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "moonfast_bn_grad_sums", [&] {
    using E = Elt<scalar_t>; using A = typename E::A;
    const typename E::S *xp = ptr<scalar_t>(x), *gp = ptr<scalar_t>(dy);
    check_rows<scalar_t>({a, b, mu}, L);
    const auto *ap = row_ptr<scalar_t>(a), *bp = row_ptr<scalar_t>(b), *mp = row_ptr<scalar_t>(mu);
    column_sums<A>(R, L, C, sg.data_ptr<double>(), sgx.data_ptr<double>(), [&](int64_t r, A* s, A* q) {
      if (relu) acc_grad<E, true>(gp + r * L, xp + r * L, ap, bp, mp, s, q, L);
      else acc_grad<E, false>(gp + r * L, xp + r * L, ap, bp, mp, s, q, L);
    });
  });
  return {sg, sgx};
}

// dx = ga·g + gb·x + gc with g as in bn_grad_sums; all constants per column
at::Tensor bn_grad_input(const at::Tensor& dy_, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
                         const at::Tensor& ga, const at::Tensor& gb, const at::Tensor& gc, bool relu) {
  check_cl(x, "the input");
  auto dy = dy_.contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(), "moonfast batch norm: gradient and input differ");
  const auto N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), L = W * C, R = N * H;
  auto dx = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "moonfast_bn_grad_input", [&] {
    using E = Elt<scalar_t>;
    const typename E::S *xp = ptr<scalar_t>(x), *gp = ptr<scalar_t>(dy);
    typename E::S* dp = ptr<scalar_t>(dx);
    check_rows<scalar_t>({a, b, ga, gb, gc}, L);
    const auto *ap = row_ptr<scalar_t>(a), *bp = row_ptr<scalar_t>(b), *p1 = row_ptr<scalar_t>(ga),
               *p2 = row_ptr<scalar_t>(gb), *p3 = row_ptr<scalar_t>(gc);
    at::parallel_for(0, R, 16, [&](int64_t s, int64_t e) {
      for (int64_t r = s; r < e; ++r) {
        if (relu) grad_row<E, true>(gp + r * L, xp + r * L, dp + r * L, ap, bp, p1, p2, p3, L);
        else grad_row<E, false>(gp + r * L, xp + r * L, dp + r * L, ap, bp, p1, p2, p3, L);
      }
    });
  });
  return dx;
}

// ---- batch norm + residual + ReLU: y = relu(a·x + b + r); the ReLU's mask is read from y (as torch.relu's backward does) ----
template <typename E>
static void __attribute__((noinline)) add_relu_row(const typename E::S* __restrict__ x, const typename E::S* __restrict__ r,
                                                   typename E::S* __restrict__ y, const typename E::A* __restrict__ a,
                                                   const typename E::A* __restrict__ b, int64_t L) {
  for (int64_t j = 0; j < L; ++j) {
    typename E::A z = std::fma(E::ld(x[j]), a[j], b[j]) + E::ld(r[j]);
    y[j] = E::st(z < 0 ? typename E::A(0) : z);
  }
}
template <typename E>
static void __attribute__((noinline)) acc_grad_y(const typename E::S* __restrict__ dy, const typename E::S* __restrict__ x,
                                                 const typename E::S* __restrict__ y, const typename E::A* __restrict__ mu,
                                                 typename E::A* __restrict__ sg, typename E::A* __restrict__ sgx, int64_t L) {
  for (int64_t j = 0; j < L; ++j) {
    typename E::A g = E::ld(y[j]) > 0 ? E::ld(dy[j]) : typename E::A(0);
    sg[j] += g; sgx[j] += g * (E::ld(x[j]) - mu[j]);
  }
}
template <typename E>
static void __attribute__((noinline)) grad_row_y(const typename E::S* __restrict__ dy, const typename E::S* __restrict__ x,
                                                 const typename E::S* __restrict__ y, typename E::S* __restrict__ dx,
                                                 typename E::S* __restrict__ dr, const typename E::A* __restrict__ ga,
                                                 const typename E::A* __restrict__ gb, const typename E::A* __restrict__ gc, int64_t L) {
  for (int64_t j = 0; j < L; ++j) {
    typename E::A g = E::ld(y[j]) > 0 ? E::ld(dy[j]) : typename E::A(0);
    dx[j] = E::st(std::fma(ga[j], g, std::fma(gb[j], E::ld(x[j]), gc[j])));
    dr[j] = E::st(g);
  }
}

at::Tensor bn_add_relu_apply(const at::Tensor& x, const at::Tensor& r, const at::Tensor& a, const at::Tensor& b) {
  check_cl(x, "the input"); check_same(x, r, "the residual");
  const auto N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), L = W * C, R = N * H;
  auto y = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "moonfast_bn_add_relu_apply", [&] {
    using E = Elt<scalar_t>;
    check_rows<scalar_t>({a, b}, L);
    const typename E::S *xp = ptr<scalar_t>(x), *rp = ptr<scalar_t>(r);
    typename E::S* yp = ptr<scalar_t>(y);
    const auto *ap = row_ptr<scalar_t>(a), *bp = row_ptr<scalar_t>(b);
    at::parallel_for(0, R, 16, [&](int64_t s, int64_t e) {
      for (int64_t i = s; i < e; ++i) add_relu_row<E>(xp + i * L, rp + i * L, yp + i * L, ap, bp, L);
    });
  });
  return y;
}

std::vector<at::Tensor> bn_add_relu_grad_sums(const at::Tensor& dy_, const at::Tensor& x, const at::Tensor& y, const at::Tensor& mu) {
  check_cl(x, "the input"); check_same(x, y, "the output");
  auto dy = dy_.contiguous(at::MemoryFormat::ChannelsLast); check_same(x, dy, "the gradient");
  const auto N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), L = W * C, R = N * H;
  auto opt = x.options().dtype(at::kDouble);
  auto sg = at::empty({C}, opt), sgx = at::empty({C}, opt);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "moonfast_bn_add_relu_grad_sums", [&] {
    using E = Elt<scalar_t>; using A = typename E::A;
    check_rows<scalar_t>({mu}, L);
    const typename E::S *xp = ptr<scalar_t>(x), *gp = ptr<scalar_t>(dy), *yp = ptr<scalar_t>(y);
    const auto* mp = row_ptr<scalar_t>(mu);
    column_sums<A>(R, L, C, sg.data_ptr<double>(), sgx.data_ptr<double>(), [&](int64_t i, A* s, A* q) {
      acc_grad_y<E>(gp + i * L, xp + i * L, yp + i * L, mp, s, q, L);
    });
  });
  return {sg, sgx};
}

std::vector<at::Tensor> bn_add_relu_grad_input(const at::Tensor& dy_, const at::Tensor& x, const at::Tensor& y,
                                               const at::Tensor& ga, const at::Tensor& gb, const at::Tensor& gc) {
  check_cl(x, "the input"); check_same(x, y, "the output");
  auto dy = dy_.contiguous(at::MemoryFormat::ChannelsLast); check_same(x, dy, "the gradient");
  const auto N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), L = W * C, R = N * H;
  auto dx = at::empty_like(x, at::MemoryFormat::ChannelsLast), dr = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "moonfast_bn_add_relu_grad_input", [&] {
    using E = Elt<scalar_t>;
    check_rows<scalar_t>({ga, gb, gc}, L);
    const typename E::S *xp = ptr<scalar_t>(x), *gp = ptr<scalar_t>(dy), *yp = ptr<scalar_t>(y);
    typename E::S *dp = ptr<scalar_t>(dx), *rp = ptr<scalar_t>(dr);
    const auto *p1 = row_ptr<scalar_t>(ga), *p2 = row_ptr<scalar_t>(gb), *p3 = row_ptr<scalar_t>(gc);
    at::parallel_for(0, R, 16, [&](int64_t s, int64_t e) {
      for (int64_t i = s; i < e; ++i) grad_row_y<E>(gp + i * L, xp + i * L, yp + i * L, dp + i * L, rp + i * L, p1, p2, p3, L);
    });
  });
  return {dx, dr};
}

// ---- one call per pass: the per-channel arithmetic of a training step done here, not as dozens of small tensor ops ----
// Rows of L = W·C per-column constants in the accumulation type A, from per-channel doubles (column j is channel j % C).
static at::Tensor rows_of(const std::vector<double>& v, int64_t W, at::ScalarType acc) {
  const int64_t C = int64_t(v.size());
  auto t = at::empty({W * C}, at::TensorOptions().dtype(acc));
  if (acc == at::kDouble) { double* p = t.data_ptr<double>(); for (int64_t j = 0; j < W * C; ++j) p[j] = v[j % C]; }
  else { float* p = t.data_ptr<float>(); for (int64_t j = 0; j < W * C; ++j) p[j] = float(v[j % C]); }
  return t;
}
static std::vector<double> doubles(const c10::optional<at::Tensor>& t, int64_t C, double fill) {
  if (!t.has_value() || !t->defined()) return std::vector<double>(C, fill);
  TORCH_CHECK(t->numel() == C, "moonfast batch norm: expected ", C, " per-channel values, got ", t->numel());
  auto d = t->detach().to(at::kDouble).contiguous();
  return std::vector<double>(d.data_ptr<double>(), d.data_ptr<double>() + C);
}
static at::ScalarType acc_type(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }
// The fused passes' per-channel affine map y = a·x + c, from weight w, bias b, mean m and 1/std i (the same in both passes)
static void affine_consts(const std::vector<double>& w, const std::vector<double>& b, const double* m, const double* i,
                          std::vector<double>& a, std::vector<double>& c) {
  const size_t C = w.size(); a.resize(C); c.resize(C);
  for (size_t k = 0; k < C; ++k) { a[k] = w[k] * i[k]; c[k] = b[k] - m[k] * w[k] * i[k]; }
}

// Forward: statistics, running-statistics update (as nn.BatchNorm2d: lerp by momentum, unbiased variance), then
// y = bn(x), relu(bn(x)) or relu(bn(x) + r) in one pass. Returns {y, mean, invstd} (float64, C values).
std::vector<at::Tensor> bn_forward(const at::Tensor& x, const c10::optional<at::Tensor>& r, const c10::optional<at::Tensor>& weight,
                                   const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
                                   const c10::optional<at::Tensor>& running_var, double momentum, double eps, bool relu) {
  check_cl(x, "the input");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), M = N * H * W;
  auto st = bn_stats(x);
  auto mean = st[0], var = st[1];
  if (running_mean.has_value() && running_mean->defined()) {
    at::NoGradGuard ng;
    running_mean->lerp_(mean.to(running_mean->scalar_type()), momentum);
    running_var.value().lerp_((var * (double(M) / double(std::max<int64_t>(M - 1, 1)))).to(running_var->scalar_type()), momentum);
  }
  auto invstd = (var + eps).rsqrt();
  const double *mp = mean.data_ptr<double>(), *ip = invstd.data_ptr<double>();
  auto w = doubles(weight, C, 1.0), b = doubles(bias, C, 0.0);
  std::vector<double> a, c;
  affine_consts(w, b, mp, ip, a, c);
  const auto acc = acc_type(x);
  auto ar = rows_of(a, W, acc), cr = rows_of(c, W, acc);
  at::Tensor y;
  if (r.has_value() && r->defined()) {
    auto rc = r->contiguous(at::MemoryFormat::ChannelsLast);
    y = bn_add_relu_apply(x, rc, ar, cr);
  } else y = bn_apply(x, ar, cr, relu);
  return {y, mean, invstd};
}

// Backward of bn_forward: {dx, dr, dweight, dbias} (undefined where not asked, or where there is no residual / weight).
// `y` is the forward's output when it had a residual (the ReLU's mask is read from it), else undefined: the mask is then
// recomputed from x with the forward's own constants, so it is the same decision.
std::vector<at::Tensor> bn_backward(const at::Tensor& dy_, const at::Tensor& x, const c10::optional<at::Tensor>& y,
                                    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                                    const at::Tensor& mean, const at::Tensor& invstd, bool relu,
                                    bool need_dx, bool need_dw, bool need_db) {
  check_cl(x, "the input");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const double M = double(N * H * W);
  auto dy = dy_.to(x.scalar_type()).contiguous(at::MemoryFormat::ChannelsLast);
  const bool residual = y.has_value() && y->defined();
  auto mv = doubles(mean, C, 0.0), iv = doubles(invstd, C, 0.0), w = doubles(weight, C, 1.0), b = doubles(bias, C, 0.0);
  const auto acc = acc_type(x);
  auto mu = rows_of(mv, W, acc);
  std::vector<double> a, c;                         // ga below is a: the input gradient's scale is the forward's
  affine_consts(w, b, mv.data(), iv.data(), a, c);
  std::vector<at::Tensor> sums;
  at::Tensor ar, cr;
  if (residual) sums = bn_add_relu_grad_sums(dy, x, *y, mu);
  else {
    ar = rows_of(a, W, acc); cr = rows_of(c, W, acc);
    sums = bn_grad_sums(dy, x, ar, cr, mu, relu);
  }
  const double *sg = sums[0].data_ptr<double>(), *sgx = sums[1].data_ptr<double>();
  at::Tensor dx, dr, dw, db;
  if (need_dx || residual) {
    std::vector<double> gb(C), gc(C);
    for (int64_t k = 0; k < C; ++k) {
      gb[k] = -a[k] * iv[k] * iv[k] * sgx[k] / M;
      gc[k] = -a[k] * sg[k] / M - gb[k] * mv[k];
    }
    auto p1 = rows_of(a, W, acc), p2 = rows_of(gb, W, acc), p3 = rows_of(gc, W, acc);
    if (residual) { auto o = bn_add_relu_grad_input(dy, x, *y, p1, p2, p3); dx = o[0]; dr = o[1]; }
    else dx = bn_grad_input(dy, x, ar, cr, p1, p2, p3, relu);
  }
  if (weight.has_value() && weight->defined()) {
    if (need_dw) dw = (sums[1] * invstd).to(weight->scalar_type());
    if (need_db) db = sums[0].to(weight->scalar_type());
  }
  return {dx, dr, dw, db};
}
