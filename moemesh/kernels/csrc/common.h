// Shared pieces of the CPU kernels: bf16 <-> float, and the few-token matmul y[M, N] = x[M, K] @ W[N, K]^T
// that reads each weight row once per pass of up to 4 tokens. Decoding is bound by the bytes of weight
// read, so these loops are built to stream the weights at the machine's read bandwidth, which torch's bf16
// matrix-vector product falls short of. Compiled once per instruction-set level at first use (vec.h, ../cpu_ext.py).
#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include "vec.h"
#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

namespace moemesh {


inline float bf16_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

constexpr int ROWS = 4;  // weight rows per inner pass: 4 streams keep the prefetchers busy
// Software prefetch this many rows ahead, into L2: an expert's rows are too short for the hardware
// prefetchers to ramp up within a row, and prefetches into L1 would tie up its few miss buffers.
constexpr int64_t PREFETCH_ROWS = 8;

#if defined(MOEMESH_AVX512)
// out[0..3] = the horizontal sums of four fp32 vectors.
inline void reduce4(__m512 a, __m512 b, __m512 c, __m512 d, float* out) {
  auto half = [](__m512 v) { return _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1)); };
  const __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(half(a), half(b)), _mm256_hadd_ps(half(c), half(d)));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1)));
}

// acc[m][r] += x[m, i:i+32] . w[r, i:i+32] with VDPBF16PS (pairs of bf16 products into fp32 lanes).
template <int M>
void rows_bf16(const uint16_t* x, const uint16_t* w, int64_t K, int rows, float* out /*[M][ROWS]*/) {
  __m512 acc[M][ROWS];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < ROWS; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t i = 0; i < K; i += 32) {
    const __mmask32 mask = K - i >= 32 ? ~__mmask32(0) : (__mmask32(1) << (K - i)) - 1;
    __m512i wv[ROWS];
    for (int r = 0; r < ROWS; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(w + (r + PREFETCH_ROWS) * K + i), _MM_HINT_T1);
      wv[r] = r < rows ? _mm512_maskz_loadu_epi16(mask, w + r * K + i) : _mm512_setzero_si512();
    }
    for (int m = 0; m < M; ++m) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + m * K + i);
      for (int r = 0; r < ROWS; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], (__m512bh)wv[r], xv);
    }
  }
  static_assert(ROWS == 4);
  for (int m = 0; m < M; ++m) reduce4(acc[m][0], acc[m][1], acc[m][2], acc[m][3], out + m * ROWS);
}
#elif defined(MOEMESH_AVX2)
// The 16 bf16 of a 32-byte load as two fp32 vectors: even elements (the low half of each 32-bit lane) shifted
// up into place, odd ones (the high half, already in place) with the low half cleared. A dot product needs no
// other order, so the activations split the same way.
inline __m256 bf16_even(__m256i v) { return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)); }
inline __m256 bf16_odd(__m256i v) { return _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(0xFFFF0000))); }

// R rows of acc[m][r] += x[m, i:i+32] . w[r, i:i+32]: each token's 32 values are split once and serve the R rows.
// One token keeps an even and an odd chain per row (8 chains in flight); more tokens one chain per row, and fewer
// rows per pass, so that the accumulators stay within AVX2's 16 registers. The tail past the last whole 32 is
// run once more on zero-padded copies.
template <int M, int R>
void rows_bf16_pass(const uint16_t* x, const uint16_t* w, int64_t K, int rows, float* out /*[M][ROWS]*/) {
  constexpr bool two_chains = M == 1;
  __m256 even[M][R], odd[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) even[m][r] = odd[m][r] = _mm256_setzero_ps();
  const uint16_t* wr[R];
  for (int r = 0; r < R; ++r) wr[r] = w + (r < rows ? r : 0) * K;  // rows past `rows` repeat row 0, dropped
  auto step = [&](const uint16_t* const* wp, const uint16_t* const* xp, int64_t ahead) {
    for (int h = 0; h < 32; h += 16) {
      __m256 xe[M], xo[M];
      for (int m = 0; m < M; ++m) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp[m] + h));
        xe[m] = bf16_even(v);
        xo[m] = bf16_odd(v);
      }
      for (int r = 0; r < R; ++r) {
        if (h == 0) _mm_prefetch(reinterpret_cast<const char*>(wp[r] + ahead), _MM_HINT_T1);
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp[r] + h));
        const __m256 we = bf16_even(v), wo = bf16_odd(v);
        for (int m = 0; m < M; ++m) {
          even[m][r] = _mm256_fmadd_ps(we, xe[m], even[m][r]);
          __m256& second = two_chains ? odd[m][r] : even[m][r];
          second = _mm256_fmadd_ps(wo, xo[m], second);
        }
      }
    }
  };
  int64_t i = 0;
  for (; i + 32 <= K; i += 32) {
    const uint16_t *wp[R], *xp[M];
    for (int r = 0; r < R; ++r) wp[r] = wr[r] + i;
    for (int m = 0; m < M; ++m) xp[m] = x + m * K + i;
    step(wp, xp, PREFETCH_ROWS * K);
  }
  if (i < K) {
    alignas(32) uint16_t wt[R][32] = {}, xt[M][32] = {};
    const uint16_t *wp[R], *xp[M];
    for (int r = 0; r < R; ++r) {
      std::memcpy(wt[r], wr[r] + i, (K - i) * 2);
      wp[r] = wt[r];
    }
    for (int m = 0; m < M; ++m) {
      std::memcpy(xt[m], x + m * K + i, (K - i) * 2);
      xp[m] = xt[m];
    }
    step(wp, xp, 0);
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R && r < rows; ++r) out[m * ROWS + r] = sum8(_mm256_add_ps(even[m][r], odd[m][r]));
}

template <int M>
void rows_bf16(const uint16_t* x, const uint16_t* w, int64_t K, int rows, float* out /*[M][ROWS]*/) {
  if constexpr (M <= 2) {
    rows_bf16_pass<M, ROWS>(x, w, K, rows, out);
  } else {
    rows_bf16_pass<M, 2>(x, w, K, std::min(rows, 2), out);
    if (rows > 2) rows_bf16_pass<M, 2>(x, w + 2 * K, K, rows - 2, out + 2);
  }
}
#else
template <int M>
void rows_bf16(const uint16_t* x, const uint16_t* w, int64_t K, int rows, float* out) {
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < ROWS; ++r) {
      float total = 0;
      for (int64_t j = 0; j < K && r < rows; ++j) total += bf16_to_float(w[r * K + j]) * bf16_to_float(x[m * K + j]);
      out[m * ROWS + r] = total;
    }
}
#endif

// Output rows [row_begin, row_end) of y[M, N] = x[M, K] @ w[N, K]^T, on the calling thread.
template <int M>
inline void rows_range_bf16(const uint16_t* x, const uint16_t* w, int64_t N, int64_t K, at::BFloat16* y,
                            int64_t row_begin, int64_t row_end) {
  float out[M * ROWS];
  for (int64_t o = row_begin; o < row_end; o += ROWS) {
    const int rows = static_cast<int>(std::min<int64_t>(ROWS, row_end - o));
    rows_bf16<M>(x, w + o * K, K, rows, out);
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < rows; ++r) y[m * N + o + r] = at::BFloat16(out[m * ROWS + r]);
  }
}

// All M tokens for output rows [row_begin, row_end), 4 tokens per pass over the weight rows.
inline void linear_rows(const at::BFloat16* x, const at::BFloat16* w, int64_t M, int64_t N, int64_t K,
                        at::BFloat16* y, int64_t row_begin, int64_t row_end) {
  auto xp = reinterpret_cast<const uint16_t*>(x);
  auto wp = reinterpret_cast<const uint16_t*>(w);
  for (int64_t m = 0; m < M;) {
    const int64_t take = std::min<int64_t>(4, M - m);
    switch (take) {
      case 4: rows_range_bf16<4>(xp + m * K, wp, N, K, y + m * N, row_begin, row_end); break;
      case 3: rows_range_bf16<3>(xp + m * K, wp, N, K, y + m * N, row_begin, row_end); break;
      case 2: rows_range_bf16<2>(xp + m * K, wp, N, K, y + m * N, row_begin, row_end); break;
      default: rows_range_bf16<1>(xp + m * K, wp, N, K, y + m * N, row_begin, row_end);
    }
    m += take;
  }
}

constexpr int64_t ROW_GRAIN = 64;  // output rows per parallel work item

// f(0..n-1) on torch's threads, each taking the next item when done: items of uneven cost (weights still in
// memory or already in cache) leave no thread waiting at the end.
template <typename F>
void for_each_item(int64_t n, const F& f) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(n, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    for (int64_t i = next++; i < n; i = next++) f(i);
  });
}

// y[M, N] = x[M, K] @ w[N, K]^T, bf16 in and out, fp32 accumulation; threads split the output rows.
inline void linear_into(const at::BFloat16* x, const at::BFloat16* w, int64_t M, int64_t N, int64_t K, at::BFloat16* y) {
  const int64_t items = (N + ROW_GRAIN - 1) / ROW_GRAIN;
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    linear_rows(x, w, M, N, K, y, begin * ROW_GRAIN, std::min(N, end * ROW_GRAIN));
  });
}

// g[i] = bf16(bf16(silu(g[i])) * u[i]): SwiGLU with the reference's rounding points (silu output, product).
inline void swiglu_bf16(at::BFloat16* g, const at::BFloat16* u, int64_t count) {
  int64_t i = 0;
#if defined(MOEMESH_AVX512) || defined(MOEMESH_AVX2)
  for (; i + 16 <= count; i += 16) {
    const Vec16 v = load_bf16x16(g + i);
    const Vec16 silu = v / (set16(1.0f) + exp16(zero16() - v));
    store_bf16x16(g + i, round_bf16x16(silu) * load_bf16x16(u + i));
  }
#endif
  for (; i < count; ++i) {
    const float v = static_cast<float>(g[i]);
    const at::BFloat16 act(v / (1.0f + std::exp(-v)));
    g[i] = at::BFloat16(static_cast<float>(act) * static_cast<float>(u[i]));
  }
}

// sum a[i] * b[i] in 16 partial sums: one sequential fp32 chain costs an FMA latency per element.
inline float dot(const float* a, const float* b, int64_t n) {
  float part[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) part[j] += a[i + j] * b[i + j];
  float total = 0;
  for (int j = 0; j < 16; ++j) total += part[j];
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

// y = weight * bf16(x * rsqrt(mean(x^2) + eps)) for rows [rows, D], statistics in fp32, as the reference
// computes it; y may be x (dense_bf16.cpp).
void rms_norm_rows(const at::BFloat16* x, const at::BFloat16* weight, int64_t rows, int64_t D, double eps, at::BFloat16* y);

inline void check_bf16(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 && t.is_contiguous() && t.device().is_cpu(),
              what, ": expected a contiguous bf16 CPU tensor");
}


}  // namespace moemesh
