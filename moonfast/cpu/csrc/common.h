// moonfast CPU kernels: what every kernel file shares (element access in an accumulation type, pointers, checks).
#pragma once
// ATen's own headers, not <torch/extension.h>: that one (pybind11, the C++ frontend, autograd) takes about 50 s to parse
// on a 2-core machine, once per file. These take about 5; bindings.cpp, the one file that talks to Python, includes
// <torch/python.h> (pybind11 and its tensor casters).
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/TensorIndexing.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/util/accumulate.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <mutex>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

// Element access through an accumulation type A: float for bf16 (read as its bit pattern) and float, double for double.
template <typename T> struct Elt {
  using A = T; using S = T;
  static inline A ld(S v) { return v; }
  static inline S st(A v) { return v; }
  static inline S st_exact(A v) { return v; }
};
template <> struct Elt<c10::BFloat16> {
  using A = float; using S = uint16_t;
  static inline float ld(uint16_t b) { uint32_t u = uint32_t(b) << 16; float f; std::memcpy(&f, &u, 4); return f; }
  static inline uint16_t st_exact(float f) { uint32_t u; std::memcpy(&u, &f, 4); return uint16_t(u >> 16); }  // f is a bf16 value
  static inline uint16_t st(float f) {  // round to nearest even; a NaN stays a NaN
    uint32_t u; std::memcpy(&u, &f, 4);
    uint16_t r = uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    return f != f ? uint16_t(0x7FC0) : r;
  }
};
template <typename T> static typename Elt<T>::S* ptr(const at::Tensor& t) {
  return reinterpret_cast<typename Elt<T>::S*>(t.data_ptr());
}

// a rounded up to a multiple of m
static inline int64_t round_up(int64_t a, int64_t m) { return (a + m - 1) / m * m; }

// Per-column sums in A over blocks of rows, flushed into double, so long reductions keep their digits.
constexpr int64_t FLUSH = 64;

// Sum over the rows of per-column accumulators made by `step(row, s, q)`, reduced per channel into double (C each).
template <typename A, typename F>
static void column_sums(int64_t R, int64_t L, int64_t C, double* out1, double* out2, F step) {
  std::mutex mu;
  std::fill(out1, out1 + C, 0.0); std::fill(out2, out2 + C, 0.0);
  at::parallel_for(0, R, 16, [&](int64_t b, int64_t e) {
    std::vector<A> s(L), q(L);
    std::vector<double> ds(L, 0.0), dq(L, 0.0);
    for (int64_t r0 = b; r0 < e; r0 += FLUSH) {
      std::fill(s.begin(), s.end(), A(0)); std::fill(q.begin(), q.end(), A(0));
      for (int64_t r = r0; r < std::min(e, r0 + FLUSH); ++r) step(r, s.data(), q.data());
      for (int64_t j = 0; j < L; ++j) { ds[j] += s[j]; dq[j] += q[j]; }
    }
    std::vector<double> c1(C, 0.0), c2(C, 0.0);
    for (int64_t j = 0; j < L; ++j) { c1[j % C] += ds[j]; c2[j % C] += dq[j]; }
    std::lock_guard<std::mutex> lock(mu);
    for (int64_t c = 0; c < C; ++c) { out1[c] += c1[c]; out2[c] += c2[c]; }
  });
}

static void check_cl(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "moonfast kernels: expected ", what, " to be a 4-d channels-last CPU tensor");
}
template <typename T> static const typename Elt<T>::A* row_ptr(const at::Tensor& t) {
  return reinterpret_cast<const typename Elt<T>::A*>(t.data_ptr());
}
template <typename T> static void check_rows(std::initializer_list<at::Tensor> ts, int64_t L) {
  for (const auto& t : ts)
    TORCH_CHECK(t.numel() == L && t.is_contiguous() && t.scalar_type() == c10::CppTypeToScalarType<typename Elt<T>::A>::value,
                "moonfast kernels: expected per-column constants of ", L, " values in the accumulation type");
}

static void check_same(const at::Tensor& x, const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.sizes() == x.sizes() && t.scalar_type() == x.scalar_type() && t.is_contiguous(at::MemoryFormat::ChannelsLast),
              "moonfast kernels: expected ", what, " shaped, typed and laid out (channels-last) as the input");
}

#if defined(__AVX512F__)
// A 16×16 block of 32-bit values in 16 AVX-512 registers (r[i]: row i) → its transpose, in place (conv3.cpp's fp32
// planes, conv3_bf16.cpp's bf16 pairs as dwords)
__attribute__((always_inline)) static inline void transpose16x16(__m512 r[16]) {
  __m512 t[16], u[16];
  for (int k = 0; k < 8; ++k) { t[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]); t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]); }
  for (int k = 0; k < 4; ++k) {
    const __m512d a = _mm512_castps_pd(t[4 * k]), b = _mm512_castps_pd(t[4 * k + 2]);
    const __m512d c = _mm512_castps_pd(t[4 * k + 1]), d = _mm512_castps_pd(t[4 * k + 3]);
    u[4 * k] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b)); u[4 * k + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    u[4 * k + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d)); u[4 * k + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
  }
  for (int e = 0; e < 4; ++e) {
    const __m512 ablo = _mm512_shuffle_f32x4(u[e], u[4 + e], 0x44), abhi = _mm512_shuffle_f32x4(u[e], u[4 + e], 0xEE);
    const __m512 cdlo = _mm512_shuffle_f32x4(u[8 + e], u[12 + e], 0x44), cdhi = _mm512_shuffle_f32x4(u[8 + e], u[12 + e], 0xEE);
    r[e] = _mm512_shuffle_f32x4(ablo, cdlo, 0x88); r[4 + e] = _mm512_shuffle_f32x4(ablo, cdlo, 0xDD);
    r[8 + e] = _mm512_shuffle_f32x4(abhi, cdhi, 0x88); r[12 + e] = _mm512_shuffle_f32x4(abhi, cdhi, 0xDD);
  }
}
#endif
