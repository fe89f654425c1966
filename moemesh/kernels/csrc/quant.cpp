// Decode matmuls that multiply quantized weights as they are stored, for a few bf16 tokens:
//   FP8 e4m3 with one fp32 scale per 128x128 block (the official DeepSeek-V3 format), and
//   MLX affine int4 / int8 (uint32 words, first value in the lowest bits; bf16 scale and bias per group).
// Nothing is dequantized to memory: each 64-byte chunk of a weight row becomes values in registers. At the
// avx512 level (this file) they are bf16 and go through VDPBF16PS with the activations; the conversions are exact:
//   e4m3 -> bf16: two byte-table lookups of the 7-bit magnitude (VPERMI2B) and the sign (fp8_to_bf16);
//     subnormals stay normal numbers in bf16, so VDPBF16PS's flushing of bf16 denormals never touches them.
//   int4/int8: a nibble q or'ed into 0x4300 is the bf16 number 128 + q, exactly. So one VDPBF16PS gives
//     sum (128 + q) x, and the group's 128 * sum(x) is taken off afterwards with the bias term:
//     y = sum_g s_g (D_g - 128 X_g) + b_g X_g, D_g the dot product, X_g the group's sum of x.
//     int8 splits each byte into two nibbles (the high one against 16 x): one code path for both.
//     The kernel reads them in the lane-major layout (quant.h, docs/formats.md), which the torch backend
//     holds them in.
// At the avx2 level (quant_avx2.h) e4m3 values become fp32 values for FMAs, and int4/int8 values 16-bit integers
// that VPMADDWD multiplies by 16-bit activations, in the same layout.
// Elsewhere (the scalar level, or affine weights in MLX's own byte order) rows are dequantized one at a time
// and multiplied in plain loops: correct, slow; the torch backend does not send quantized weights there
// (docs/quantization.md, "Dispatch").
#include "quant.h"

namespace moemesh {

QLinear qlinear(const QArgs& args, const char* what) {
  const auto& [w, scales, biases, kind, group] = args;
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.device().is_cpu(), what, ": weight must be a contiguous 2-D CPU tensor");
  QLinear q{kind, w.size(0), 0, group, static_cast<const uint8_t*>(w.data_ptr()), nullptr, 0, nullptr, nullptr};
  if (kind == KIND_BF16) {
    check_bf16(w, what);
    q.K = w.size(1);
  } else if (kind == KIND_FP8) {
    TORCH_CHECK(w.element_size() == 1 && scales.scalar_type() == at::kFloat && scales.is_contiguous(), what, ": fp8 weight and fp32 block scales");
    q.K = w.size(1);
    q.block_cols = (q.K + FP8_BLOCK - 1) / FP8_BLOCK;
    TORCH_CHECK(scales.size(0) == (q.N + FP8_BLOCK - 1) / FP8_BLOCK && scales.size(1) == q.block_cols, what, ": block scales shape ", scales.sizes());
    q.block_scales = scales.data_ptr<float>();
  } else {
    TORCH_CHECK(kind >= KIND_INT4 && kind <= KIND_INT8_LANES, what, ": unknown weight kind ", kind);
    q.lanes = kind >= KIND_INT4_LANES;
    q.kind = q.lanes ? kind - (KIND_INT4_LANES - KIND_INT4) : kind;
    TORCH_CHECK(w.element_size() == 4, what, ": affine weights are 32-bit words");
    q.K = w.size(1) * (q.kind == KIND_INT4 ? 8 : 4);
    TORCH_CHECK(group == 32 || group == 64 || group == 128, what, ": group size ", group);
    TORCH_CHECK(q.K % group == 0, what, ": ", q.K, " inputs are not whole groups of ", group);
    check_bf16(scales, what);
    check_bf16(biases, what);
    TORCH_CHECK(scales.size(0) == q.N && scales.size(1) == q.K / group && biases.sizes() == scales.sizes(), what, ": scales shape ", scales.sizes());
    q.scales = scales.data_ptr<at::BFloat16>();
    q.biases = biases.data_ptr<at::BFloat16>();
    TORCH_CHECK(!q.lanes || q.N * q.groups() % 16 == 0, what, ": a lane-major weight holds whole spans of 16 groups");
  }
  return q;
}

QLinear row_slice(const QLinear& w, int64_t begin, int64_t count) {
  TORCH_CHECK(0 <= begin && begin + count <= w.N, "row_slice: rows ", begin, "..", begin + count, " of ", w.N);
  QLinear s = w;
  s.N = count;
  s.w = w.w + begin * w.row_bytes();
  if (w.kind == KIND_FP8) {
    TORCH_CHECK(begin % FP8_BLOCK == 0, "row_slice: FP8 weights are sliced at 128-row block boundaries");
    s.block_scales = w.block_scales + (begin / FP8_BLOCK) * w.block_cols;
  } else if (w.kind != KIND_BF16) {
    TORCH_CHECK(!w.lanes || begin * w.groups() % 16 == 0, "row_slice: lane-major weights are sliced at span boundaries");
    s.scales = w.scales + begin * w.groups();
    s.biases = w.biases + begin * w.groups();
  }
  return s;
}

inline float bf(const at::BFloat16& v) { return static_cast<float>(v); }

// fp32 -> bf16 bits, rounded to nearest even (finite values; as at::BFloat16(float)) in integer steps that
// compilers vectorize.
inline uint16_t bf16_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return static_cast<uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}
inline void put(float* out, int64_t i, float v) { out[i] = v; }
inline void put(uint16_t* out, int64_t i, float v) { out[i] = bf16_bits(v); }

// q * s + b for the bytes of one group (int4: two values per byte, the low nibble first), into out.
template <int BITS, typename Out>
inline void dequant_group(const uint8_t* bytes, int64_t group, float s, float b, Out* out) {
  if constexpr (BITS == 4) {
    for (int64_t j = 0; j < group / 2; ++j) {
      put(out, 2 * j, static_cast<float>(bytes[j] & 15) * s + b);
      put(out, 2 * j + 1, static_cast<float>(bytes[j] >> 4) * s + b);
    }
  } else {
    for (int64_t j = 0; j < group; ++j) put(out, j, static_cast<float>(bytes[j]) * s + b);
  }
}

// e4m3 byte -> float by integer steps that compilers vectorize (a table lookup per byte does not): s eeee mmm moved
// to bits 31 and 26-20 is the fp32 number of its value * 2^-120 (subnormals as fp32 subnormals), times 2^120.
inline float fp8_value(uint8_t b) {
  const uint32_t u = (static_cast<uint32_t>(b & 0x80) << 24) | (static_cast<uint32_t>(b & 0x7F) << 20);
  float f;
  std::memcpy(&f, &u, 4);
  return f * 0x1p120f;
}

// One weight row as fp32 or bf16 bits: plain loops over whole groups and blocks, no per-value index arithmetic,
// so that they vectorize at any level (prefill's tiles, the scalar fallback's bands). The row PREFETCH_ROWS on is
// prefetched into L2 as it goes: the hardware prefetchers alone leave the loop waiting on memory (3.6x slower).
template <typename Out>
void dequant_row(const QLinear& w, int64_t row, Out* out) {
  const uint8_t* p = w.w + row * w.row_bytes();
  const uint8_t* ahead = row + PREFETCH_ROWS < w.N ? p + PREFETCH_ROWS * w.row_bytes() : p;
  for (int64_t b = 0; b < w.row_bytes(); b += 64) __builtin_prefetch(ahead + b, 0, 2);
  if (w.kind == KIND_BF16) {
    for (int64_t i = 0; i < w.K; ++i) put(out, i, bf16_to_float(reinterpret_cast<const uint16_t*>(p)[i]));
    return;
  }
  if (w.kind == KIND_FP8) {
    const float* s = w.block_scales + (row / FP8_BLOCK) * w.block_cols;
    for (int64_t i0 = 0; i0 < w.K; i0 += FP8_BLOCK) {
      const float scale = s[i0 / FP8_BLOCK];
      for (int64_t i = i0; i < std::min(w.K, i0 + FP8_BLOCK); ++i) put(out, i, fp8_value(p[i]) * scale);
    }
    return;
  }
  // Affine: group g's bytes follow each other in MLX order; lane-major, word j of the group with index `at` in the
  // weight sits at word (at / 16) 16 wpg + 16 j + at % 16 (lanes_offset in quant.h): gathered first.
  const int64_t G = w.groups(), gb = w.group_bytes(), wpg = gb / 4;
  const auto* words = reinterpret_cast<const uint32_t*>(w.w);
  uint32_t gathered[32];  // a group's words: at most 128 int8 values
  for (int64_t g = 0; g < G; ++g) {
    const int64_t at = row * G + g;
    const uint8_t* bytes = p + g * gb;
    if (w.lanes) {
      const uint32_t* first = words + at / 16 * 16 * wpg + at % 16;
      for (int64_t j = 0; j < wpg; ++j) gathered[j] = first[16 * j];
      bytes = reinterpret_cast<const uint8_t*>(gathered);
    }
    const float s = bf(w.scales[at]), b = bf(w.biases[at]);
    if (w.kind == KIND_INT4)
      dequant_group<4>(bytes, w.group, s, b, out + g * w.group);
    else
      dequant_group<8>(bytes, w.group, s, b, out + g * w.group);
  }
}

#if defined(MOEMESH_AVX512) || defined(MOEMESH_AVX2)
// Lane-major activations' group sums: for each token and pattern p, lane l = the sum of x over group (16 p + l) % G,
// the group that lane multiplies (QLinear::patterns).
void group_sums_by_lane(const QLinear& w, const uint16_t* x, int64_t M, Acts& acts) {
  const int64_t G = w.groups(), P = w.patterns();
  std::vector<float> sums(G);
  acts.sums.resize(M * P * 16);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < G; ++g) {  // the group, a multiple of 16 values
      Vec16 acc = zero16();
      for (int64_t i = g * w.group; i < (g + 1) * w.group; i += 16) acc = acc + load_bf16x16(x + m * w.K + i);
      sums[g] = sum16(acc);
    }
    for (int64_t i = 0; i < P * 16; ++i) acts.sums[m * P * 16 + i] = sums[i % G];
  }
}

// Bytes ahead of the loads that are prefetched into L2 in the span kernels: the weights stream through once, too
// fast for the hardware prefetchers to ramp up on an expert's few hundred KB.
#ifndef SPAN_PREFETCH
#define SPAN_PREFETCH 4096
#endif
#endif

#if defined(MOEMESH_AVX512)
// ROWS rows from r0 of an affine weight: packed bytes, scales, biases. Rows past the weight's end (fewer than
// ROWS left) repeat row r0; their results are dropped.
struct AffineRows {
  const uint8_t* w[ROWS];
  const uint16_t *s[ROWS], *b[ROWS];
  AffineRows(const QLinear& q, int64_t r0, int rows) {
    for (int r = 0; r < ROWS; ++r) {
      const int64_t row = r0 + (r < rows ? r : 0);
      w[r] = q.w + row * q.row_bytes();
      s[r] = reinterpret_cast<const uint16_t*>(q.scales) + row * q.groups();
      b[r] = reinterpret_cast<const uint16_t*>(q.biases) + row * q.groups();
    }
  }
};

inline __m512 bf16x16_to_f32(__m256i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16)); }

// 32 values of x from i on, zeros past K.
inline __m512i load32(const uint16_t* x, int64_t i, int64_t K) {
  const int64_t left = K - i;
  return _mm512_maskz_loadu_epi16(left >= 32 ? ~__mmask32(0) : left <= 0 ? 0 : (__mmask32(1) << left) - 1, x + i);
}

// Lane j of the result: the value at index idx[j] of the 64 values in a, b (permutes stay in registers).
inline __m512i pick(__m512i a, __m512i b, const uint16_t* idx) {
  return _mm512_permutex2var_epi16(a, _mm512_loadu_si512(idx), b);
}

// One token's FP8 streams: each chunk's lanes gathered from the 64 x values it multiplies.
void arrange_fp8(const QLinear& w, const uint16_t* x, uint16_t* const* s) {
  static const auto idx = [] {  // [half][lane]: lane j of the first half is byte 16 (j / 8) + j % 8, of the second + 8
    std::array<std::array<uint16_t, 32>, 2> out{};
    for (int j = 0; j < 32; ++j) {
      out[0][j] = static_cast<uint16_t>(16 * (j / 8) + j % 8);
      out[1][j] = static_cast<uint16_t>(16 * (j / 8) + 8 + j % 8);
    }
    return out;
  }();
  for (int64_t c = 0, i = 0; c < w.chunks(); ++c, i += 64) {
    const __m512i a0 = load32(x, i, w.K), a1 = load32(x, i + 32, w.K);
    _mm512_storeu_si512(s[0] + 32 * c, pick(a0, a1, idx[0].data()));
    _mm512_storeu_si512(s[1] + 32 * c, pick(a0, a1, idx[1].data()));
  }
}

// One token's lane-major streams (see lanes_offset in quant.h), one span of chunks per pattern p: lane l multiplies
// group (16 p + l) % G of the row, whose value i lies in chunk i / 8 of the span, u16 lane 2l + e, as nibble t
// (int4: i = 8 (chunk) + 4e + t) or as byte h (int8: i = 4 (chunk) + 2e + h, its low nibble in stream 2h against
// x, its high one in stream 2h + 1 against 16 x).
void arrange_lanes(const QLinear& w, const uint16_t* x, uint16_t* const* s) {
  const int64_t G = w.groups(), span_chunks = w.span_chunks();
  for (int64_t p = 0; p < w.patterns(); ++p)
    for (int64_t l = 0; l < 16; ++l) {
      const uint16_t* xg = x + (16 * p + l) % G * w.group;
      for (int64_t c = 0; c < span_chunks; ++c) {
        const int64_t at = 32 * (p * span_chunks + c) + 2 * l;
        if (w.kind == KIND_INT4) {  // values 8c + 4e + t: stream t, lane at + e
          const uint16_t* v = xg + 8 * c;
          for (int t = 0; t < 4; ++t) {
            s[t][at] = v[t];
            s[t][at + 1] = v[4 + t];
          }
        } else {  // values 4c + 2e + h: streams 2h (x) and 2h + 1 (16 x), lane at + e
          const uint16_t* v = xg + 4 * c;
          for (int e = 0; e < 2; ++e)
            for (int h = 0; h < 2; ++h) {
              s[2 * h][at + e] = v[2 * e + h];
              s[2 * h + 1][at + e] = at::BFloat16(16.0f * bf16_to_float(v[2 * e + h])).x;
            }
        }
      }
    }
}

Acts prepare(const QLinear& w, const at::BFloat16* x, int64_t M) {
  Acts acts;
  acts.M = M;
  acts.raw = x;
  if (w.kind == KIND_BF16 || (w.kind != KIND_FP8 && !w.lanes)) return acts;  // affine in MLX's order: scalar path
  acts.streams = w.kind == KIND_FP8 ? 2 : 4;
  acts.width = (w.kind == KIND_FP8 ? w.chunks() : w.patterns() * w.span_chunks()) * 32;
  acts.x.resize(M * acts.streams * acts.width);
  const auto* xb = reinterpret_cast<const uint16_t*>(x);
  for (int64_t m = 0; m < M; ++m) {
    uint16_t* s[4] = {};
    for (int t = 0; t < acts.streams; ++t) s[t] = acts.x.data() + (m * acts.streams + t) * acts.width;
    if (w.kind == KIND_FP8)
      arrange_fp8(w, xb + m * w.K, s);
    else
      arrange_lanes(w, xb + m * w.K, s);
  }
  if (w.kind != KIND_FP8) group_sums_by_lane(w, xb, M, acts);
  return acts;
}
#endif

// Scalar path: rows [r0, r0+rows) for tokens m0..m0+M, via one fp32 row at a time.
template <int M>
void rows_dequant(const QLinear& w, const Acts& xs, int64_t m0, int64_t r0, int rows, float* out) {
  std::vector<float> row(w.K);
  for (int r = 0; r < rows; ++r) {
    dequant_row<float>(w, r0 + r, row.data());
    for (int m = 0; m < M; ++m) {
      const at::BFloat16* x = xs.raw + (m0 + m) * w.K;
      float total = 0;
      for (int64_t i = 0; i < w.K; ++i) total += row[i] * bf(x[i]);
      out[m * ROWS + r] = total;
    }
  }
}

#if defined(MOEMESH_AVX512)
inline __mmask64 tail_mask(int64_t left) { return left >= 64 ? ~__mmask64(0) : (__mmask64(1) << left) - 1; }

// The four nibbles of each u16 lane of v, each as the bf16 number 128 + q: (v >> 4t) & 15 | 0x4300.
inline void unpack_nibbles(__m512i v, __m512bh* n) {
  const __m512i low4 = _mm512_set1_epi16(0x000F), magic = _mm512_set1_epi16(0x4300);
  n[0] = (__m512bh)_mm512_ternarylogic_epi32(v, low4, magic, 0xEA);  // A & B | C
  n[1] = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 4), low4, magic, 0xEA);
  n[2] = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 8), low4, magic, 0xEA);
  n[3] = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(v, 12), magic);
}

// What the group sums carry besides the bias (see the top of the file): 128 per nibble, int8's high one x16.
inline __m512 affine_offset(const QLinear& w) {
  return _mm512_set1_ps(w.kind == KIND_INT4 ? 128.0f : 128.0f + 16.0f * 128.0f);
}

// ROWS rows of a lane-major weight whose rows are whole spans: fp32 lane l of every chunk of a span belongs to
// group l, so the products accumulate over the whole span and its 16 scales apply once, at its end. The rows share
// each chunk's activations. One token keeps two chains per row
// (n0, n1 and n2, n3) so that more chunks are in flight; more tokens keep one each (registers).
template <int M>
void rows_affine_lanes(const QLinear& w, const Acts& xs, int64_t m0, int64_t r0, int rows, float* out) {
  const int64_t rb = w.row_bytes(), G = w.groups(), span_chunks = w.span_bytes() / CHUNK_BYTES;
  const __m512 offset = affine_offset(w);
  constexpr bool two_chains = M == 1;
  const AffineRows rs(w, r0, rows);
  const uint8_t* const* wr = rs.w;
  const uint16_t *const *sr = rs.s, *const *br = rs.b;
  __m512 acc[M][ROWS];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < ROWS; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t g0 = 0, c0 = 0; g0 < G; g0 += 16, c0 += span_chunks) {
    __m512 da[M][ROWS], db[M][ROWS];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < ROWS; ++r) da[m][r] = db[m][r] = _mm512_setzero_ps();
    for (int64_t c = c0; c < c0 + span_chunks; ++c) {
      __m512bh xt[M][4];
      for (int m = 0; m < M; ++m)
        for (int t = 0; t < 4; ++t) xt[m][t] = (__m512bh)_mm512_loadu_si512(xs.stream(m0 + m, t) + c * 32);
#pragma GCC unroll 4
      for (int r = 0; r < ROWS; ++r) {
        _mm_prefetch(reinterpret_cast<const char*>(wr[r] + c * CHUNK_BYTES + PREFETCH_ROWS * rb), _MM_HINT_T1);
        __m512i v = _mm512_loadu_si512(wr[r] + c * CHUNK_BYTES);
        __asm__("" : "+v"(v));  // one load: folded into each shift, it would be four
        __m512bh n[4];
        unpack_nibbles(v, n);
        for (int m = 0; m < M; ++m) {
          da[m][r] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(da[m][r], n[0], xt[m][0]), n[1], xt[m][1]);
          __m512& second = two_chains ? db[m][r] : da[m][r];
          second = _mm512_dpbf16_ps(_mm512_dpbf16_ps(second, n[2], xt[m][2]), n[3], xt[m][3]);
        }
      }
    }
    for (int r = 0; r < ROWS; ++r) {  // y += sum_g s_g (D_g - offset X_g) + b_g X_g over the span's groups
      const __m512 sv = bf16x16_to_f32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sr[r] + g0)));
      const __m512 shift = _mm512_fnmadd_ps(
          sv, offset, bf16x16_to_f32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(br[r] + g0))));
      for (int m = 0; m < M; ++m) {
        const __m512 d = two_chains ? _mm512_add_ps(da[m][r], db[m][r]) : da[m][r];
        acc[m][r] = _mm512_fmadd_ps(d, sv, _mm512_fmadd_ps(shift, _mm512_loadu_ps(xs.sums.data() + (m0 + m) * G + g0),
                                                            acc[m][r]));
      }
    }
  }
  for (int m = 0; m < M; ++m) reduce4(acc[m][0], acc[m][1], acc[m][2], acc[m][3], out + m * ROWS);
}

// Spans in flight at once in spans_affine: their chains overlap, and their loads make one stream.
constexpr int SPANS = 4;

// Output rows [row_begin, row_end) of a lane-major weight (both on span boundaries) for tokens m0..m0+M, into
// y [tokens, N]. Each span's products end as one fp32 vector over its 16 groups, y_l = s_l (D_l - offset X_l) +
// b_l X_l (see the top of the file), whose lanes are then added to their rows: a row's terms gather in `row_acc`
// until its last group, then go to y as one bf16 value per token. One token keeps two chains per span (nibbles
// 0, 1 and 2, 3) so that more chunks are in flight; more tokens keep one each (registers).
// SHARED_X: one pattern (G divides 16), so the spans in flight share each chunk's activations.
template <int M, bool SHARED_X>
void spans_affine(const QLinear& w, const Acts& xs, int64_t m0, at::BFloat16* y, int64_t row_begin, int64_t row_end) {
  constexpr bool two_chains = M == 1;
  const int64_t G = w.groups(), P = w.patterns(), span_chunks = w.span_chunks(), span_bytes = w.span_bytes();
  const int64_t first = row_begin * G / 16, last = row_end * G / 16;  // spans [first, last)
  const __m512 offset = affine_offset(w);
  const auto* scales = reinterpret_cast<const uint16_t*>(w.scales);
  const auto* biases = reinterpret_cast<const uint16_t*>(w.biases);
  __m512 row_acc[M];
  for (int m = 0; m < M; ++m) row_acc[m] = _mm512_setzero_ps();
  // Walked without divisions (one per span would cost as much as the span's arithmetic): the current row, its
  // groups not yet added, and the pattern of span s0.
  int64_t row = row_begin, left = G, p0 = first % P;
  const bool whole_rows = 16 % G == 0;  // spans of 16 / G rows each
  const __m512i lane_ids = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  __mmask16 row_lanes = 0;  // whole_rows: each row's first lane
  for (int64_t l = 0; whole_rows && l < 16; l += G) row_lanes |= static_cast<__mmask16>(1u << l);
  for (int64_t s0 = first; s0 < last; s0 += SPANS) {
    const int64_t live = std::min<int64_t>(SPANS, last - s0);
    const uint8_t* ws[SPANS];  // spans past `last` re-read span s0; their results are dropped
    int64_t pattern[SPANS];
    const uint16_t* xs_at[SPANS][M];
    for (int j = 0; j < SPANS; ++j) {
      pattern[j] = j == 0 ? p0 : (pattern[j - 1] + 1 == P ? 0 : pattern[j - 1] + 1);
      const int64_t at = j < live ? j : 0;
      ws[j] = w.w + (s0 + at) * span_bytes;
      for (int m = 0; m < M; ++m) xs_at[j][m] = xs.stream(m0 + m, 0) + pattern[at] * span_chunks * 32;
    }
    p0 = pattern[SPANS - 1] + 1 == P ? 0 : pattern[SPANS - 1] + 1;
    __m512 da[SPANS][M], db[SPANS][M];
    for (int j = 0; j < SPANS; ++j)
      for (int m = 0; m < M; ++m) da[j][m] = db[j][m] = _mm512_setzero_ps();
    for (int64_t c = 0; c < span_chunks; ++c) {
      __m512bh shared[SHARED_X ? M : 1][4];
      if constexpr (SHARED_X)
        for (int m = 0; m < M; ++m)
          for (int t = 0; t < 4; ++t) shared[m][t] = (__m512bh)_mm512_loadu_si512(xs_at[0][m] + c * 32 + t * xs.width);
#pragma GCC unroll 4
      for (int j = 0; j < SPANS; ++j) {
        _mm_prefetch(reinterpret_cast<const char*>(ws[j] + c * CHUNK_BYTES + SPAN_PREFETCH), _MM_HINT_T1);
        __m512i v = _mm512_loadu_si512(ws[j] + c * CHUNK_BYTES);
        __asm__("" : "+v"(v));  // one load: folded into each shift, it would be four
        __m512bh n[4];
        unpack_nibbles(v, n);
        for (int m = 0; m < M; ++m) {
          auto xt = [&](int t) {
            if constexpr (SHARED_X) return shared[m][t];
            return (__m512bh)_mm512_loadu_si512(xs_at[j][m] + c * 32 + t * xs.width);
          };
          da[j][m] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(da[j][m], n[0], xt(0)), n[1], xt(1));
          __m512& second = two_chains ? db[j][m] : da[j][m];
          second = _mm512_dpbf16_ps(_mm512_dpbf16_ps(second, n[2], xt(2)), n[3], xt(3));
        }
      }
    }
    for (int j = 0; j < live; ++j) {
      const int64_t s = s0 + j;
      const __m512 sv = bf16x16_to_f32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales + 16 * s)));
      const __m512 shift = _mm512_fnmadd_ps(
          sv, offset, bf16x16_to_f32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(biases + 16 * s))));
      __m512 terms[M];
      for (int m = 0; m < M; ++m) {
        const __m512 d = two_chains ? _mm512_add_ps(da[j][m], db[j][m]) : da[j][m];
        terms[m] = _mm512_fmadd_ps(d, sv, _mm512_mul_ps(shift, _mm512_loadu_ps(xs.sums.data() + ((m0 + m) * P + pattern[j]) * 16)));
      }
      if (whole_rows) {  // 16 / G rows: lanes add in pairs, then fours... (XOR butterfly); every G-th lane is a row
        for (int m = 0; m < M; ++m) {
          __m512 v = terms[m];
          for (int step = 1; step < G; step *= 2)
            v = _mm512_add_ps(v, _mm512_permutexvar_ps(_mm512_xor_si512(lane_ids, _mm512_set1_epi32(step)), v));
          _mm256_mask_storeu_epi16(y + (m0 + m) * w.N + row, static_cast<__mmask16>((1u << (16 / G)) - 1),
                                   (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_compress_ps(row_lanes, v)));
        }
        row += 16 / G;
        continue;
      }
      int64_t lo = 0;  // lanes [lo, lo + left) finish the current row, if it ends in this span
      for (; lo + left <= 16; lo += left, left = G, ++row) {
        const __mmask16 lanes = static_cast<__mmask16>(((1u << (lo + left)) - 1) & ~((1u << lo) - 1));
        for (int m = 0; m < M; ++m) {
          y[(m0 + m) * w.N + row] = at::BFloat16(_mm512_reduce_add_ps(_mm512_mask_add_ps(row_acc[m], lanes, row_acc[m], terms[m])));
          row_acc[m] = _mm512_setzero_ps();
        }
      }
      if (lo < 16) {
        for (int m = 0; m < M; ++m) row_acc[m] = _mm512_mask_add_ps(row_acc[m], static_cast<__mmask16>(0xFFFF << lo), row_acc[m], terms[m]);
        left -= 16 - lo;
      }
    }
  }
}

// e4m3 byte -> float, exactly: the source of Fp8Tables' bytes.
struct Fp8Table {
  float value[256];
  Fp8Table() {
    for (int b = 0; b < 256; ++b) {
      const int e = (b >> 3) & 15, m = b & 7;
      const float v = e == 0 ? std::ldexp(static_cast<float>(m), -9) : std::ldexp(1.0f + m / 8.0f, e - 7);
      value[b] = (b & 0x80) ? -v : v;
    }
  }
};
const Fp8Table fp8_table;

// e4m3 -> bf16 for 64 bytes at once, exactly: the bf16's low and high bytes are functions of the 7-bit
// magnitude (two 128-entry byte tables, one VPERMI2B each; subnormals m * 2^-9 become normal bf16 numbers),
// the sign is or'ed back into the high byte, and unpacking interleaves the two bytes into u16 lanes. Lane j of
// `first` is byte 16 (j / 8) + j % 8 of the 64, of `second` byte 16 (j / 8) + 8 + j % 8 (see `prepare`).
struct Fp8Tables {
  __m512i lo0, lo1, hi0, hi1;
  Fp8Tables() {
    alignas(64) uint8_t lo[128], hi[128];
    for (int b = 0; b < 128; ++b) {
      const float v = fp8_table.value[b];
      uint32_t u;
      std::memcpy(&u, &v, 4);
      lo[b] = static_cast<uint8_t>(u >> 16);
      hi[b] = static_cast<uint8_t>(u >> 24);
    }
    lo0 = _mm512_load_si512(lo), lo1 = _mm512_load_si512(lo + 64);
    hi0 = _mm512_load_si512(hi), hi1 = _mm512_load_si512(hi + 64);
  }
};

inline void fp8_to_bf16(const Fp8Tables& t, __m512i v, __m512i& first, __m512i& second) {
  const __m512i lo = _mm512_permutex2var_epi8(t.lo0, v, t.lo1);  // index bit 6 picks the table, bit 7 is ignored
  const __m512i hi = _mm512_ternarylogic_epi32(_mm512_permutex2var_epi8(t.hi0, v, t.hi1), v,
                                               _mm512_set1_epi8(static_cast<char>(0x80)), 0xF8);  // A | (B & C)
  first = _mm512_unpacklo_epi8(lo, hi);
  second = _mm512_unpackhi_epi8(lo, hi);
}

template <int M>
void rows_fp8(const QLinear& w, const Acts& xs, int64_t m0, int64_t r0, int rows, float* out) {
  static const Fp8Tables tables;
  const uint8_t* wr[ROWS];
  for (int r = 0; r < ROWS; ++r) wr[r] = w.w + (r0 + (r < rows ? r : 0)) * w.K;
  const float* scales = w.block_scales + (r0 / FP8_BLOCK) * w.block_cols;  // 4 rows never straddle a block
  __m512 acc[M][ROWS];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < ROWS; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t kb = 0; kb < w.block_cols; ++kb) {
    __m512 d[M][ROWS];  // the block's products, one chain per row: the four rows' chains overlap
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < ROWS; ++r) d[m][r] = _mm512_setzero_ps();
    for (int64_t i = kb * FP8_BLOCK; i < std::min<int64_t>(w.K, (kb + 1) * FP8_BLOCK); i += CHUNK_BYTES) {
      const __mmask64 mask = tail_mask(w.K - i);
      __m512bh x0[M], x1[M];
      for (int m = 0; m < M; ++m) {
        x0[m] = (__m512bh)_mm512_loadu_si512(xs.stream(m0 + m, 0) + i / 2);
        x1[m] = (__m512bh)_mm512_loadu_si512(xs.stream(m0 + m, 1) + i / 2);
      }
      for (int r = 0; r < ROWS; ++r) {
        _mm_prefetch(reinterpret_cast<const char*>(wr[r] + i + PREFETCH_ROWS * w.K), _MM_HINT_T1);
        __m512i first, second;
        fp8_to_bf16(tables, _mm512_maskz_loadu_epi8(mask, wr[r] + i), first, second);
        for (int m = 0; m < M; ++m) {
          d[m][r] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(d[m][r], (__m512bh)first, x0[m]), (__m512bh)second, x1[m]);
        }
      }
    }
    const __m512 s = _mm512_set1_ps(scales[kb]);
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < ROWS; ++r) acc[m][r] = _mm512_fmadd_ps(d[m][r], s, acc[m][r]);
  }
  for (int m = 0; m < M; ++m) reduce4(acc[m][0], acc[m][1], acc[m][2], acc[m][3], out + m * ROWS);
}
#elif defined(MOEMESH_AVX2)
#include "quant_avx2.h"
#else
Acts prepare(const QLinear&, const at::BFloat16* x, int64_t M) { return Acts{M, 0, x}; }
#endif

template <int M>
void rows_q(const QLinear& w, const Acts& xs, int64_t m0, int64_t r0, int rows, float* out) {
  if (w.kind == KIND_BF16) {
    rows_bf16<M>(reinterpret_cast<const uint16_t*>(xs.raw) + m0 * w.K, reinterpret_cast<const uint16_t*>(w.w) + r0 * w.K,
                 w.K, rows, out);
    return;
  }
#if defined(MOEMESH_AVX512) || defined(MOEMESH_AVX2)
  if (w.kind == KIND_FP8) return rows_fp8<M>(w, xs, m0, r0, rows, out);
  if (w.lanes) return rows_affine_lanes<M>(w, xs, m0, r0, rows, out);
#endif
  rows_dequant<M>(w, xs, m0, r0, rows, out);
}

// y[m, r] for every token and output rows [row_begin, row_end), 4 tokens per pass over the rows.
void linear_rows_q(const QLinear& w, const Acts& xs, at::BFloat16* y, int64_t row_begin, int64_t row_end) {
  float out[4 * ROWS];
  for (int64_t m = 0; m < xs.M; m += 4) {
    const int take = static_cast<int>(std::min<int64_t>(4, xs.M - m));
#if defined(MOEMESH_AVX512)
    if (w.lanes && w.groups() % 16 != 0) {  // spans across rows
      const bool one = w.patterns() == 1;
      switch (take) {
        case 4: (one ? spans_affine<4, true> : spans_affine<4, false>)(w, xs, m, y, row_begin, row_end); break;
        case 3: (one ? spans_affine<3, true> : spans_affine<3, false>)(w, xs, m, y, row_begin, row_end); break;
        case 2: (one ? spans_affine<2, true> : spans_affine<2, false>)(w, xs, m, y, row_begin, row_end); break;
        default: (one ? spans_affine<1, true> : spans_affine<1, false>)(w, xs, m, y, row_begin, row_end);
      }
      continue;
    }
#elif defined(MOEMESH_AVX2)
    if (w.lanes && w.groups() % 16 != 0) {  // spans across rows
      const bool int4 = w.kind == KIND_INT4;
      switch (take) {
        case 4: (int4 ? spans_affine<4, 8> : spans_affine<4, 4>)(w, xs, m, y, row_begin, row_end); break;
        case 3: (int4 ? spans_affine<3, 8> : spans_affine<3, 4>)(w, xs, m, y, row_begin, row_end); break;
        case 2: (int4 ? spans_affine<2, 8> : spans_affine<2, 4>)(w, xs, m, y, row_begin, row_end); break;
        default: (int4 ? spans_affine<1, 8> : spans_affine<1, 4>)(w, xs, m, y, row_begin, row_end);
      }
      continue;
    }
#endif
    for (int64_t r = row_begin; r < row_end; r += ROWS) {
      const int rows = static_cast<int>(std::min<int64_t>(ROWS, row_end - r));
      switch (take) {
        case 4: rows_q<4>(w, xs, m, r, rows, out); break;
        case 3: rows_q<3>(w, xs, m, r, rows, out); break;
        case 2: rows_q<2>(w, xs, m, r, rows, out); break;
        default: rows_q<1>(w, xs, m, r, rows, out);
      }
      for (int t = 0; t < take; ++t)
        for (int i = 0; i < rows; ++i) y[(m + t) * w.N + r + i] = at::BFloat16(out[t * ROWS + i]);
    }
  }
}

void linear_q_into(const QLinear& w, const at::BFloat16* x, int64_t M, at::BFloat16* y) {
  const Acts xs = prepare(w, x, M);
  at::parallel_for(0, (w.N + ROW_GRAIN - 1) / ROW_GRAIN, 1, [&](int64_t begin, int64_t end) {
    linear_rows_q(w, xs, y, begin * ROW_GRAIN, std::min(w.N, end * ROW_GRAIN));
  });
}

void linear_q_pair_into(const QLinear& a, const QLinear& b, const at::BFloat16* x, int64_t M, at::BFloat16* ya,
                        at::BFloat16* yb) {
  const Acts xa = prepare(a, x, M);
  const bool shared = a.kind == b.kind && a.K == b.K && a.group == b.group && a.lanes == b.lanes;
  const Acts xb = shared ? Acts{} : prepare(b, x, M);
  const int64_t items_a = (a.N + ROW_GRAIN - 1) / ROW_GRAIN, items = items_a + (b.N + ROW_GRAIN - 1) / ROW_GRAIN;
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {  // a's row items, then b's
    if (begin < items_a) linear_rows_q(a, xa, ya, begin * ROW_GRAIN, std::min(a.N, std::min(end, items_a) * ROW_GRAIN));
    if (end > items_a) {
      const int64_t from = std::max(begin, items_a) - items_a, to = end - items_a;
      linear_rows_q(b, shared ? xa : xb, yb, from * ROW_GRAIN, std::min(b.N, to * ROW_GRAIN));
    }
  });
}

void linear_heads_into(const QLinear& w, int64_t H, const at::BFloat16* x, int64_t n, at::BFloat16* y) {
  TORCH_CHECK(w.N % H == 0, "linear_heads: ", w.N, " weight rows are not ", H, " heads");
  const int64_t N = w.N / H;
  TORCH_CHECK(!w.lanes || N * w.groups() % 16 == 0, "linear_heads: a lane-major head holds whole spans of 16 groups");
  // Each thread takes a run of consecutive heads (each arranging its own activations): a head's weights are
  // too few (~40 KB at int4) for the prefetchers to get going if each thread's next head lies elsewhere.
  at::parallel_for(0, H, 1, [&](int64_t h0, int64_t h1) {
    for (int64_t h = h0; h < h1; ++h) {
      const QLinear head = row_slice(w, h * N, N);
      linear_rows_q(head, prepare(head, x + h * n * w.K, n), y + h * n * N, 0, N);
    }
  });
}

// MLA's absorbed per-head products: y[:, h] = x[:, h] @ w_h^T for x [n, H, K], w [H*N, K] (the heads stacked).
torch::Tensor linear_heads_q(torch::Tensor x, QArgs weight) {
  const QLinear w = qlinear(weight, "linear_heads_q");
  TORCH_CHECK(x.dim() == 3 && x.size(2) == w.K, "linear_heads_q: x ", x.sizes(), " for a weight of ", w.K, " inputs");
  const int64_t H = x.size(1), n = x.size(0);
  x = x.transpose(0, 1).contiguous();  // [H, n, K]: each head's tokens back to back
  check_bf16(x, "linear_heads_q x");
  auto y = torch::empty({H, n, w.N / H}, x.options());
  linear_heads_into(w, H, x.data_ptr<at::BFloat16>(), n, y.data_ptr<at::BFloat16>());
  return y.transpose(0, 1);
}

torch::Tensor linear_q(torch::Tensor x, QArgs weight) {
  x = x.contiguous();
  check_bf16(x, "linear_q x");
  const QLinear w = qlinear(weight, "linear_q");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == w.K, "linear_q: x ", x.sizes(), " for a weight of ", w.K, " inputs");
  auto y = torch::empty({x.size(0), w.N}, x.options());
  linear_q_into(w, x.data_ptr<at::BFloat16>(), x.size(0), y.data_ptr<at::BFloat16>());
  return y;
}

// out = the lane-major copy of packed words [rows, K * bits / 32] (see lanes_offset in quant.h): each span's
// words transposed, [16 groups][words per group] -> [words per group][16]. What a load costs: a copy.
void to_lanes_q(torch::Tensor words, int64_t bits, int64_t group, torch::Tensor out) {
  TORCH_CHECK(words.dim() == 2 && words.is_contiguous() && words.element_size() == 4 && words.device().is_cpu(),
              "to_lanes_q: contiguous 2-D CPU words of 32 bits");
  TORCH_CHECK(out.sizes() == words.sizes() && out.is_contiguous() && out.element_size() == 4 && out.device().is_cpu(),
              "to_lanes_q: out must be a contiguous CPU tensor of the words' shape");
  const int64_t per_group = group * bits / 32, span = 16 * per_group;
  TORCH_CHECK((bits == 4 || bits == 8) && per_group > 0 && words.numel() % span == 0,
              "to_lanes_q: ", words.numel(), " words are not whole spans of 16 groups of ", group);
  const auto* in = static_cast<const uint32_t*>(words.data_ptr());
  auto* o = static_cast<uint32_t*>(out.data_ptr());
  at::parallel_for(0, words.numel() / span, 64, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin * span; s < end * span; s += span)
      for (int64_t w = 0; w < per_group; ++w)
        for (int64_t g = 0; g < 16; ++g) o[s + 16 * w + g] = in[s + per_group * g + w];
  });
}

// Rows [row_begin, row_end) of the weight as bf16 (w * scale in fp32, rounded once) or fp32, into `out` where given
// (a buffer the caller reuses; its dtype chooses): prefill's tiles, the bands torch multiplies where the decode
// kernels do not.
torch::Tensor dequantize_q(QArgs weight, int64_t row_begin, int64_t row_end, std::optional<torch::Tensor> out) {
  const QLinear w = qlinear(weight, "dequantize_q");
  TORCH_CHECK(0 <= row_begin && row_begin <= row_end && row_end <= w.N, "dequantize_q: rows ", row_begin, "..", row_end);
  torch::Tensor y = out ? *out : torch::empty({row_end - row_begin, w.K}, torch::dtype(at::kBFloat16));
  const bool fp32 = y.scalar_type() == at::kFloat;
  TORCH_CHECK((fp32 || y.scalar_type() == at::kBFloat16) && y.is_contiguous() && y.device().is_cpu(),
              "dequantize_q out: expected a contiguous bf16 or float32 CPU tensor");
  TORCH_CHECK(y.dim() == 2 && y.size(0) == row_end - row_begin && y.size(1) == w.K, "dequantize_q: out ", y.sizes());
  at::parallel_for(row_begin, row_end, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (fp32)
        dequant_row<float>(w, r, y.data_ptr<float>() + (r - row_begin) * w.K);
      else
        dequant_row<uint16_t>(w, r, reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()) + (r - row_begin) * w.K);
    }
  });
  return y;
}

}  // namespace moemesh
