#include "common.h"
#include "ops.h"

// ---- 2×2 stride-2 transposed conv: its products z (N, H, W, 2, 2, Co) placed on the doubled grid, + bias, next to a skip ----
// Output pixel (2h+a, 2w+b) of image n takes z[n, h, w, a, b] + bias, then the skip's Cs channels; channels-last.
template <typename E>
static void __attribute__((noinline)) upcat_row(const typename E::S* __restrict__ z, const typename E::A* __restrict__ bias,
                                                const typename E::S* __restrict__ s, typename E::S* __restrict__ o,
                                                int64_t W, int64_t Co, int64_t Cs) {
  const int64_t P = Co + Cs;
  for (int64_t q = 0; q < 2 * W; ++q) {          // output pixel q = 2w + b reads z at w·4Co + b·Co
    const typename E::S* zp = z + (q >> 1) * 4 * Co + (q & 1) * Co;
    typename E::S* op = o + q * P;
    for (int64_t c = 0; c < Co; ++c) op[c] = E::st(E::ld(zp[c]) + bias[c]);
    if (Cs) std::memcpy(op + Co, s + q * Cs, Cs * sizeof(typename E::S));
  }
}
template <typename E>
static void __attribute__((noinline)) upcat_grad_row(const typename E::S* __restrict__ g, typename E::S* __restrict__ dz,
                                                     typename E::S* __restrict__ ds, typename E::A* __restrict__ sb,
                                                     int64_t W, int64_t Co, int64_t Cs) {
  const int64_t P = Co + Cs;
  for (int64_t q = 0; q < 2 * W; ++q) {
    const typename E::S* gp = g + q * P;
    typename E::S* zp = dz + (q >> 1) * 4 * Co + (q & 1) * Co;
    for (int64_t c = 0; c < Co; ++c) { zp[c] = gp[c]; sb[c] += E::ld(gp[c]); }
    if (Cs) std::memcpy(ds + q * Cs, gp + Co, Cs * sizeof(typename E::S));
  }
}

// z: (N, H, W, 4·Co) contiguous; bias: Co values in the accumulation type; skip: (N, Cs, 2H, 2W) channels-last or an empty tensor.
at::Tensor upcat_forward(const at::Tensor& z, const at::Tensor& bias, const at::Tensor& skip) {
  TORCH_CHECK(z.device().is_cpu() && z.dim() == 4 && z.is_contiguous() && z.size(3) % 4 == 0,
              "moonfast up_cat: expected (N, H, W, 4·C) contiguous CPU products");
  const int64_t N = z.size(0), H = z.size(1), W = z.size(2), Co = z.size(3) / 4;
  const bool has_skip = skip.numel() > 0;
  const int64_t Cs = has_skip ? skip.size(1) : 0;
  if (has_skip)
    TORCH_CHECK(skip.dim() == 4 && skip.size(0) == N && skip.size(2) == 2 * H && skip.size(3) == 2 * W &&
                skip.is_contiguous(at::MemoryFormat::ChannelsLast) && skip.scalar_type() == z.scalar_type(),
                "moonfast up_cat: expected a channels-last skip of shape (", N, ", C, ", 2 * H, ", ", 2 * W, ") and dtype ",
                z.scalar_type());
  auto out = at::empty({N, Co + Cs, 2 * H, 2 * W}, z.options().memory_format(at::MemoryFormat::ChannelsLast));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, z.scalar_type(), "moonfast_upcat_forward", [&] {
    using E = Elt<scalar_t>;
    check_rows<scalar_t>({bias}, Co);
    const typename E::S* zp = ptr<scalar_t>(z); typename E::S* op = ptr<scalar_t>(out);
    const typename E::S* sp = has_skip ? ptr<scalar_t>(skip) : nullptr;
    const auto* bp = row_ptr<scalar_t>(bias);
    at::parallel_for(0, N * 2 * H, 8, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {          // output row r = (n, 2h + a)
        const int64_t nh = r >> 1, a = r & 1;
        upcat_row<E>(zp + nh * W * 4 * Co + a * 2 * Co, bp, sp ? sp + r * 2 * W * Cs : nullptr, op + r * 2 * W * (Co + Cs),
                     W, Co, Cs);
      }
    });
  });
  return out;
}

// g: gradient of upcat_forward's output (channels-last). Returns dz (N, H, W, 4·Co), the bias gradient (Co, float64) and
// the skip's gradient (channels-last, dense; empty where Cs is 0).
std::vector<at::Tensor> upcat_backward(const at::Tensor& g_, int64_t Co) {
  auto g = g_.contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(g.device().is_cpu() && g.dim() == 4 && g.size(1) >= Co && g.size(2) % 2 == 0 && g.size(3) % 2 == 0,
              "moonfast up_cat: unexpected gradient shape");
  const int64_t N = g.size(0), Cs = g.size(1) - Co, H = g.size(2) / 2, W = g.size(3) / 2;
  auto dz = at::empty({N, H, W, 4 * Co}, g.options());
  auto ds = Cs ? at::empty({N, Cs, 2 * H, 2 * W}, g.options().memory_format(at::MemoryFormat::ChannelsLast))
               : at::empty({0}, g.options());
  auto db = at::empty({Co}, g.options().dtype(at::kDouble)), dummy = at::empty({Co}, g.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, g.scalar_type(), "moonfast_upcat_backward", [&] {
    using E = Elt<scalar_t>; using A = typename E::A;
    const typename E::S* gp = ptr<scalar_t>(g); typename E::S* zp = ptr<scalar_t>(dz);
    typename E::S* sp = Cs ? ptr<scalar_t>(ds) : nullptr;
    column_sums<A>(N * 2 * H, Co, Co, db.data_ptr<double>(), dummy.data_ptr<double>(), [&](int64_t r, A* s, A*) {
      const int64_t nh = r >> 1, a = r & 1;
      upcat_grad_row<E>(gp + r * 2 * W * (Co + Cs), zp + nh * W * 4 * Co + a * 2 * Co, sp ? sp + r * 2 * W * Cs : nullptr,
                        s, W, Co, Cs);
    });
  });
  return {dz, db, ds};
}
