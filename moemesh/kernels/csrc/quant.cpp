// Decode matmuls that multiply quantized weights as they are stored, for a few bf16 tokens:
//   FP8 e4m3 with one fp32 scale per 128x128 block (the official DeepSeek-V3 format), and
//   MLX affine int4 / int8 (uint32 words, first value in the lowest bits; bf16 scale and bias per group).
// Nothing is dequantized to memory: each 64-byte chunk of a weight row becomes bf16 values in registers
// and goes through VDPBF16PS with the activations. The conversions are exact:
//   e4m3 -> bf16: for normal numbers the bf16 is sign | (e + 120) << 7 | m << 4, built with one vpshufb
//     (fp8_normals_to_bf16); blocks holding a zero or a subnormal (m * 2^-9) take an exact path that adds
//     120 to the exponent and looks the subnormals up in an 8-entry table (bf16 keeps them normal numbers,
//     so VDPBF16PS's flushing of bf16 denormals never touches them).
//   int4/int8: a nibble q or'ed into 0x4300 is the bf16 number 128 + q, exactly. So one VDPBF16PS gives
//     sum (128 + q) x, and the group's 128 * sum(x) is taken off afterwards with the bias term:
//     y = sum_g s_g (D_g - 128 X_g) + b_g X_g, D_g the dot product, X_g the group's sum of x.
//     int8 splits each byte into two nibbles (the high one against 16 x): one code path for both.
// Elsewhere (no AVX512-BF16) rows are dequantized to fp32 one at a time: correct, slower.
#include "common.h"

namespace moemesh {

enum Kind : int64_t { KIND_BF16 = 0, KIND_FP8 = 1, KIND_INT4 = 2, KIND_INT8 = 3 };
constexpr int64_t FP8_BLOCK = 128;
constexpr int64_t CHUNK_BYTES = 64;  // weight bytes per inner step (one zmm): 128 int4, 64 int8 or 64 fp8 values

// A linear weight as Python passes it: (weight, scales, biases, kind, group_size); see ../quant_ops.py.
using QArgs = std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, int64_t, int64_t>;

struct QLinear {
  int64_t kind, N, K, group;
  const uint8_t* w;                 // rows of K bf16 / K fp8 bytes / K/2 int4 bytes / K int8 bytes
  const float* block_scales;        // fp8: [ceil(N/128), ceil(K/128)]
  int64_t block_cols;
  const at::BFloat16* scales;       // affine: [N, K/group]
  const at::BFloat16* biases;

  int64_t row_bytes() const { return kind == KIND_INT4 ? K / 2 : (kind == KIND_BF16 ? 2 * K : K); }
  int64_t groups() const { return K / group; }
  // Elements per chunk; activations are laid out per chunk (see `prepare`).
  int64_t chunk() const { return kind == KIND_INT4 ? 128 : 64; }
  int64_t chunks() const { return (K + chunk() - 1) / chunk(); }
};

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
    TORCH_CHECK(kind == KIND_INT4 || kind == KIND_INT8, what, ": unknown weight kind ", kind);
    TORCH_CHECK(w.element_size() == 4, what, ": affine weights are 32-bit words");
    q.K = w.size(1) * (kind == KIND_INT4 ? 8 : 4);
    TORCH_CHECK(group == 32 || group == 64 || group == 128, what, ": group size ", group);
    check_bf16(scales, what);
    check_bf16(biases, what);
    TORCH_CHECK(scales.size(0) == q.N && scales.size(1) == q.K / group && biases.sizes() == scales.sizes(), what, ": scales shape ", scales.sizes());
    q.scales = scales.data_ptr<at::BFloat16>();
    q.biases = biases.data_ptr<at::BFloat16>();
  }
  return q;
}

// e4m3 byte -> float, exactly (the scalar paths' table).
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

inline float bf(const at::BFloat16& v) { return static_cast<float>(v); }

// One weight row as fp32.
void dequant_row(const QLinear& w, int64_t row, float* out) {
  const uint8_t* p = w.w + row * w.row_bytes();
  switch (w.kind) {
    case KIND_BF16:
      for (int64_t i = 0; i < w.K; ++i) out[i] = bf(reinterpret_cast<const at::BFloat16*>(p)[i]);
      break;
    case KIND_FP8: {
      const float* s = w.block_scales + (row / FP8_BLOCK) * w.block_cols;
      for (int64_t i = 0; i < w.K; ++i) out[i] = fp8_table.value[p[i]] * s[i / FP8_BLOCK];
      break;
    }
    default: {
      const at::BFloat16* s = w.scales + row * w.groups();
      const at::BFloat16* b = w.biases + row * w.groups();
      for (int64_t i = 0; i < w.K; ++i) {
        const int q = w.kind == KIND_INT4 ? (p[i / 2] >> (4 * (i & 1))) & 15 : p[i];
        out[i] = q * bf(s[i / w.group]) + bf(b[i / w.group]);
      }
    }
  }
}

// The few tokens' activations, arranged for one weight format. A chunk of weights is one 64-byte load, seen
// as 32 u16 lanes; lane j holds int4 values 4j..4j+3 (a nibble each), int8 values 2j, 2j+1 or fp8 values 2j,
// 2j+1. The kernels turn each nibble (int) or byte (fp8) position t of the lanes into one bf16 vector, so
// the activations come as one stream per position: stream t, lane j = the x that multiplies it.
struct Acts {
  int64_t M = 0, width = 0;    // width: one stream of one token, 32 lanes per chunk
  std::vector<float> xf;       // [M, K] fp32 (scalar paths)
  std::vector<uint16_t> x;     // bf16 [M, streams, width]
  std::vector<float> sums;     // affine: [M, K/group] sum of x per group
  std::vector<int32_t> lane_group;  // affine: [chunks per 16 groups, 16] group of each fp32 lane (see below)
  int streams = 0;
  const uint16_t* stream(int64_t m, int t) const { return x.data() + (m * streams + t) * width; }
};

Acts prepare(const QLinear& w, const at::BFloat16* x, int64_t M) {
  Acts acts;
  acts.M = M;
  acts.xf.resize(M * w.K);
  for (int64_t i = 0; i < M * w.K; ++i) acts.xf[i] = bf(x[i]);
  if (w.kind == KIND_BF16) return acts;
  acts.streams = w.kind == KIND_FP8 ? 2 : 4;
  acts.width = w.chunks() * 32;
  acts.x.assign(M * acts.streams * acts.width, 0);  // zeros past K: the padded weights add nothing
  const auto* xb = reinterpret_cast<const uint16_t*>(x);
  for (int64_t m = 0; m < M; ++m) {
    const uint16_t* xm = xb + m * w.K;
    uint16_t* s[4];
    for (int t = 0; t < acts.streams; ++t) s[t] = acts.x.data() + (m * acts.streams + t) * acts.width;
    if (w.kind == KIND_INT4) {  // lane j of chunk c: values 128c + 4j + t
      for (int64_t i = 0; i < w.K; ++i) s[i % 4][i / 4] = xm[i];
    } else if (w.kind == KIND_FP8) {  // lane j of chunk c: values 64c + 2j + t
      for (int64_t i = 0; i < w.K; ++i) s[i % 2][i / 2] = xm[i];
    } else {  // int8: low nibble against x, high nibble against 16 x (exact in bf16: the exponent moves by 4)
      for (int64_t i = 0; i < w.K; ++i) {
        const at::BFloat16 x16(16.0f * acts.xf[m * w.K + i]);
        s[2 * (i % 2)][i / 2] = xm[i];
        s[2 * (i % 2) + 1][i / 2] = reinterpret_cast<const uint16_t&>(x16);
      }
    }
  }
  if (w.kind == KIND_INT4 || w.kind == KIND_INT8) {
    const int64_t G = w.groups(), per_lane = w.kind == KIND_INT4 ? 8 : 4;
    acts.sums.assign(M * G, 0.0f);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t i = 0; i < w.K; ++i) acts.sums[m * G + i / w.group] += acts.xf[m * w.K + i];
    // fp32 lane l of chunk c's dot products covers `per_lane` values from c * chunk + l * per_lane on; its
    // group within the chunk's 16-group span, per chunk position in the span
    const int64_t span = 16 * w.group / w.chunk();
    acts.lane_group.resize(span * 16);
    for (int64_t pos = 0; pos < span; ++pos)
      for (int l = 0; l < 16; ++l) acts.lane_group[pos * 16 + l] = static_cast<int32_t>((pos * w.chunk() + l * per_lane) / w.group);
  }
  return acts;
}

// Scalar path: rows [r0, r0+rows) for tokens m0..m0+M, via one fp32 row at a time.
template <int M>
void rows_dequant(const QLinear& w, const Acts& xs, int64_t m0, int64_t r0, int rows, float* out) {
  std::vector<float> row(w.K);
  for (int r = 0; r < rows; ++r) {
    dequant_row(w, r0 + r, row.data());
    for (int m = 0; m < M; ++m) {
      const float* x = xs.xf.data() + (m0 + m) * w.K;
      float total = 0;
      for (int64_t i = 0; i < w.K; ++i) total += row[i] * x[i];
      out[m * ROWS + r] = total;
    }
  }
}

#if defined(__AVX512BF16__)
inline __m512 bcast(const at::BFloat16& v) { return _mm512_set1_ps(bf(v)); }

// sum_g (b_g - offset * s_g) X_g: the bias term, less the 128 (+ 16 * 128) the magic numbers added; 16 groups
// per step.
inline float bias_term_avx512(const QLinear& w, int64_t row, const float* sums, float offset) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(w.scales + row * w.groups());
  const uint16_t* b = reinterpret_cast<const uint16_t*>(w.biases + row * w.groups());
  __m512 acc = _mm512_setzero_ps();
  const __m512 off = _mm512_set1_ps(offset);
  for (int64_t g = 0; g < w.groups(); g += 16) {
    const __mmask16 mask = w.groups() - g >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (w.groups() - g)) - 1);
    const __m512 sv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, s + g)), 16));
    const __m512 bv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, b + g)), 16));
    acc = _mm512_fmadd_ps(_mm512_fnmadd_ps(sv, off, bv), _mm512_maskz_loadu_ps(mask, sums + g), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

inline __mmask64 tail_mask(int64_t left) { return left >= 64 ? ~__mmask64(0) : (__mmask64(1) << left) - 1; }

inline __m512 bf16x16_to_f32(__m256i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16)); }

template <int M>
void rows_affine(const QLinear& w, const Acts& xs, int64_t m0, int64_t r0, int rows, float* out) {
  const bool int4 = w.kind == KIND_INT4;
  const int64_t rb = w.row_bytes(), G = w.groups(), chunk = w.chunk();
  const int64_t span = 16 * w.group / chunk;  // chunks per 16 groups: their scales are one fp32 vector
  const __m512i low4 = _mm512_set1_epi16(0x000F), magic = _mm512_set1_epi16(0x4300);  // bf16(128 + q) = 0x4300 | q
  const uint8_t* wr[ROWS];
  const uint16_t* sr[ROWS];
  for (int r = 0; r < ROWS; ++r) {  // rows past the end repeat row 0; their results are dropped
    wr[r] = w.w + (r0 + (r < rows ? r : 0)) * rb;
    sr[r] = reinterpret_cast<const uint16_t*>(w.scales) + (r0 + (r < rows ? r : 0)) * G;
  }
  __m512 acc[M][ROWS];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < ROWS; ++r) acc[m][r] = _mm512_setzero_ps();
  __m512 sv[ROWS];
  for (int64_t c = 0; c < w.chunks(); ++c) {
    const int64_t pos = c % span;
    if (pos == 0) {
      const int64_t g = c * chunk / w.group;
      const __mmask16 smask = G - g >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (G - g)) - 1);
      for (int r = 0; r < ROWS; ++r) sv[r] = bf16x16_to_f32(_mm256_maskz_loadu_epi16(smask, sr[r] + g));
    }
    const __m512i lane_group = _mm512_loadu_si512(xs.lane_group.data() + pos * 16);
    const __mmask64 mask = tail_mask(rb - c * CHUNK_BYTES);
    __m512bh xt[M][4];
    for (int m = 0; m < M; ++m)
      for (int t = 0; t < 4; ++t) xt[m][t] = (__m512bh)_mm512_loadu_si512(xs.stream(m0 + m, t) + c * 32);
    for (int r = 0; r < ROWS; ++r) {
      const __m512i v = _mm512_maskz_loadu_epi8(mask, wr[r] + c * CHUNK_BYTES);
      // the four nibbles of each u16 lane, each or'ed into magic: (v >> 4t) & 15 | magic
      const __m512bh n0 = (__m512bh)_mm512_ternarylogic_epi32(v, low4, magic, 0xEA);
      const __m512bh n1 = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 4), low4, magic, 0xEA);
      const __m512bh n2 = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 8), low4, magic, 0xEA);
      const __m512bh n3 = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(v, 12), magic);
      const __m512 s = _mm512_permutexvar_ps(lane_group, sv[r]);
      for (int m = 0; m < M; ++m) {  // two short chains: VDPBF16PS's latency, not its throughput, would bind
        const __m512 d0 = _mm512_dpbf16_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), n0, xt[m][0]), n1, xt[m][1]);
        const __m512 d1 = _mm512_dpbf16_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), n2, xt[m][2]), n3, xt[m][3]);
        acc[m][r] = _mm512_fmadd_ps(_mm512_add_ps(d0, d1), s, acc[m][r]);
      }
    }
  }
  const float offset = int4 ? 128.0f : 128.0f + 16.0f * 128.0f;
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < rows; ++r)
      out[m * ROWS + r] = _mm512_reduce_add_ps(acc[m][r]) + bias_term_avx512(w, r0 + r, xs.sums.data() + (m0 + m) * G, offset);
}

// e4m3 bytes (one per u16 lane, in bits 0-7) -> bf16, exactly; `sign` is the lane with the sign at bit 15.
inline __m512i fp8_to_bf16(__m512i byte, __m512i sign, __m512i subnormals) {
  const __m512i mag = _mm512_and_si512(byte, _mm512_set1_epi16(0x7F));
  __m512i h = _mm512_add_epi16(_mm512_slli_epi16(mag, 4), _mm512_set1_epi16(120 << 7));  // exponent + 120
  h = _mm512_mask_permutexvar_epi16(h, _mm512_cmplt_epu16_mask(mag, _mm512_set1_epi16(8)), mag, subnormals);
  return _mm512_ternarylogic_epi32(sign, _mm512_set1_epi16(-0x8000), h, 0xEA);  // (sign & 0x8000) | h
}

// The same for bytes with a nonzero exponent (no zero, no subnormal): almost all of a real checkpoint. A
// bf16's high byte is then sign | (e + 120) >> 1, a function of the e4m3 byte's high nibble (one vpshufb),
// and its low byte (e & 1) << 7 | m << 4, the e4m3 byte's low nibble moved up. `lo` and `hi` take the low
// and the high byte of each u16 lane.
inline void fp8_normals_to_bf16(__m512i v, __m512i& lo, __m512i& hi) {
  const __m512i table = _mm512_broadcast_i32x4(_mm_setr_epi8(60, 61, 62, 63, 64, 65, 66, 67, -68, -67, -66, -65,
                                                             -64, -63, -62, -61));  // (s << 7) | (60 + e >> 1)
  const __m512i t = _mm512_shuffle_epi8(table, _mm512_and_si512(_mm512_srli_epi16(v, 4), _mm512_set1_epi8(0x0F)));
  const __m512i u = _mm512_and_si512(_mm512_slli_epi16(v, 4), _mm512_set1_epi8(static_cast<char>(0xF0)));
  lo = _mm512_ternarylogic_epi32(_mm512_slli_epi16(t, 8), u, _mm512_set1_epi16(0x00FF), 0xF8);  // A | (B & C)
  hi = _mm512_ternarylogic_epi32(t, _mm512_set1_epi16(static_cast<short>(0xFF00)), _mm512_srli_epi16(u, 8), 0xEA);
}

// One 128-column block of 4 rows: d, e += the low / high bytes' products (two chains: VDPBF16PS's latency).
template <int M, bool exact>
inline void fp8_block(const uint8_t* const* wr, int64_t begin, int64_t end, int64_t K, const Acts& xs, int64_t m0,
                      __m512i subnormals, __m512 (&d)[M][ROWS], __m512 (&e)[M][ROWS]) {
  for (int64_t i = begin; i < end; i += CHUNK_BYTES) {
    const __mmask64 mask = tail_mask(K - i);
    __m512bh x0[M], x1[M];
    for (int m = 0; m < M; ++m) {
      x0[m] = (__m512bh)_mm512_loadu_si512(xs.stream(m0 + m, 0) + i / 2);
      x1[m] = (__m512bh)_mm512_loadu_si512(xs.stream(m0 + m, 1) + i / 2);
    }
    for (int r = 0; r < ROWS; ++r) {
      const __m512i v = _mm512_maskz_loadu_epi8(mask, wr[r] + i);
      __m512i lo, hi;
      if (exact) {
        lo = fp8_to_bf16(_mm512_and_si512(v, _mm512_set1_epi16(0xFF)), _mm512_slli_epi16(v, 8), subnormals);
        hi = fp8_to_bf16(_mm512_srli_epi16(v, 8), v, subnormals);
      } else {
        fp8_normals_to_bf16(v, lo, hi);
      }
      for (int m = 0; m < M; ++m) {
        d[m][r] = _mm512_dpbf16_ps(d[m][r], (__m512bh)lo, x0[m]);
        e[m][r] = _mm512_dpbf16_ps(e[m][r], (__m512bh)hi, x1[m]);
      }
    }
  }
}

template <int M>
void rows_fp8(const QLinear& w, const Acts& xs, int64_t m0, int64_t r0, int rows, float* out) {
  alignas(64) uint16_t table[32] = {};  // bf16 of the subnormals m * 2^-9 at index m (0..7)
  for (int m = 0; m < 8; ++m) {
    const float v = std::ldexp(static_cast<float>(m), -9);
    uint32_t u;
    std::memcpy(&u, &v, 4);
    table[m] = static_cast<uint16_t>(u >> 16);
  }
  const __m512i subnormals = _mm512_load_si512(table), exponent = _mm512_set1_epi8(0x78);
  const uint8_t* wr[ROWS];
  for (int r = 0; r < ROWS; ++r) wr[r] = w.w + (r0 + (r < rows ? r : 0)) * w.K;
  const float* scales = w.block_scales + (r0 / FP8_BLOCK) * w.block_cols;  // 4 rows never straddle a block
  __m512 acc[M][ROWS];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < ROWS; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t kb = 0; kb < w.block_cols; ++kb) {
    __m512 d[M][ROWS], e[M][ROWS];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < ROWS; ++r) d[m][r] = e[m][r] = _mm512_setzero_ps();
    const int64_t begin = kb * FP8_BLOCK, end = std::min<int64_t>(w.K, begin + FP8_BLOCK);
    __mmask64 special = 0;  // a zero or subnormal byte in this block of the 4 rows (1 in ~20 blocks of a real
    for (int64_t i = begin; i < end; i += CHUNK_BYTES) {  // checkpoint) takes the exact conversion
      const __mmask64 mask = tail_mask(w.K - i);
      for (int r = 0; r < ROWS; ++r)
        special |= _mm512_mask_testn_epi8_mask(mask, _mm512_maskz_loadu_epi8(mask, wr[r] + i), exponent);
    }
    if (special)
      fp8_block<M, true>(wr, begin, end, w.K, xs, m0, subnormals, d, e);
    else
      fp8_block<M, false>(wr, begin, end, w.K, xs, m0, subnormals, d, e);
    const __m512 s = _mm512_set1_ps(scales[kb]);
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < ROWS; ++r) acc[m][r] = _mm512_fmadd_ps(_mm512_add_ps(d[m][r], e[m][r]), s, acc[m][r]);
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < rows; ++r) out[m * ROWS + r] = _mm512_reduce_add_ps(acc[m][r]);
}
#endif

template <int M>
void rows_q(const QLinear& w, const Acts& xs, const at::BFloat16* x, int64_t m0, int64_t r0, int rows, float* out) {
  if (w.kind == KIND_BF16) {
    rows_bf16<M>(reinterpret_cast<const uint16_t*>(x) + m0 * w.K, reinterpret_cast<const uint16_t*>(w.w) + r0 * w.K,
                 w.K, rows, out);
    return;
  }
#if defined(__AVX512BF16__)
  if (w.kind == KIND_FP8) return rows_fp8<M>(w, xs, m0, r0, rows, out);
  return rows_affine<M>(w, xs, m0, r0, rows, out);
#else
  rows_dequant<M>(w, xs, m0, r0, rows, out);
#endif
}

// y[m, r] for every token and output rows [row_begin, row_end), 4 tokens per pass over the rows.
void linear_rows_q(const QLinear& w, const Acts& xs, const at::BFloat16* x, at::BFloat16* y, int64_t row_begin,
                   int64_t row_end) {
  float out[4 * ROWS];
  for (int64_t m = 0; m < xs.M; m += 4) {
    const int take = static_cast<int>(std::min<int64_t>(4, xs.M - m));
    for (int64_t r = row_begin; r < row_end; r += ROWS) {
      const int rows = static_cast<int>(std::min<int64_t>(ROWS, row_end - r));
      switch (take) {
        case 4: rows_q<4>(w, xs, x, m, r, rows, out); break;
        case 3: rows_q<3>(w, xs, x, m, r, rows, out); break;
        case 2: rows_q<2>(w, xs, x, m, r, rows, out); break;
        default: rows_q<1>(w, xs, x, m, r, rows, out);
      }
      for (int t = 0; t < take; ++t)
        for (int i = 0; i < rows; ++i) y[(m + t) * w.N + r + i] = at::BFloat16(out[t * ROWS + i]);
    }
  }
}

void linear_q_into(const QLinear& w, const at::BFloat16* x, int64_t M, at::BFloat16* y) {
  const Acts xs = prepare(w, x, M);
  at::parallel_for(0, (w.N + ROW_GRAIN - 1) / ROW_GRAIN, 1, [&](int64_t begin, int64_t end) {
    linear_rows_q(w, xs, x, y, begin * ROW_GRAIN, std::min(w.N, end * ROW_GRAIN));
  });
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

// down(silu(gate(x)) * up(x)) with the reference's bf16 rounding points (as mlp_bf16); gate and up rows
// are read in one parallel pass.
void mlp_q_into(const at::BFloat16* x, int64_t M, const QLinear& gate, const QLinear& up, const QLinear& down,
                at::BFloat16* y) {
  const int64_t I = gate.N;
  std::vector<at::BFloat16> g(M * I), u(M * I);
  const Acts xg = prepare(gate, x, M), xu = prepare(up, x, M);
  const int64_t items = (I + ROW_GRAIN - 1) / ROW_GRAIN;
  at::parallel_for(0, 2 * items, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const bool is_up = item >= items;
      const int64_t r = (item % items) * ROW_GRAIN;
      linear_rows_q(is_up ? up : gate, is_up ? xu : xg, x, (is_up ? u : g).data(), r, std::min(I, r + ROW_GRAIN));
    }
  });
  swiglu_bf16(g.data(), u.data(), M * I);
  linear_q_into(down, g.data(), M, y);
}

void check_mlp_q(const QLinear& gate, const QLinear& up, const QLinear& down, int64_t D) {
  TORCH_CHECK(gate.K == D && up.K == D && up.N == gate.N && down.N == D && down.K == gate.N,
              "mlp_q: weight shapes do not make a SwiGLU MLP of hidden size ", D);
}

torch::Tensor mlp_q(torch::Tensor x, QArgs gate, QArgs up, QArgs down) {
  x = x.contiguous();
  check_bf16(x, "mlp_q x");
  const QLinear g = qlinear(gate, "mlp_q gate"), u = qlinear(up, "mlp_q up"), d = qlinear(down, "mlp_q down");
  check_mlp_q(g, u, d, x.size(1));
  auto y = torch::empty_like(x);
  mlp_q_into(x.data_ptr<at::BFloat16>(), x.size(0), g, u, d, y.data_ptr<at::BFloat16>());
  return y;
}

// Routed experts for a few tokens, summed as experts_bf16 sums them (ascending expert order, each addition
// rounded to bf16), for weights in any of the formats above. Decode touches a few small experts, so all of
// them share two parallel passes (gate and up rows, then down rows) instead of two each.
struct ExpertWork {
  QLinear gate, up, down;
  std::vector<std::pair<int64_t, float>> rows;  // (token, routing weight)
  std::vector<at::BFloat16> x, g, u, y;         // the expert's tokens, its gate/up outputs, its output
  Acts xg, xu, xd;
};

torch::Tensor experts_q(torch::Tensor x, torch::Tensor ids, torch::Tensor weights, std::vector<int64_t> expert_ids,
                        std::vector<QArgs> gates, std::vector<QArgs> ups, std::vector<QArgs> downs) {
  x = x.contiguous();
  ids = ids.contiguous();
  weights = weights.contiguous();
  check_bf16(x, "experts_q x");
  TORCH_CHECK(ids.scalar_type() == at::kLong && weights.scalar_type() == at::kFloat && ids.sizes() == weights.sizes(),
              "experts_q: ids int64 and weights fp32 of one shape");
  const int64_t n = x.size(0), D = x.size(1), k = ids.size(1);
  const int64_t* ip = ids.data_ptr<int64_t>();
  const float* wp = weights.data_ptr<float>();
  const at::BFloat16* xp = x.data_ptr<at::BFloat16>();
  std::vector<ExpertWork> work;
  for (size_t e = 0; e < expert_ids.size(); ++e) {
    ExpertWork w{qlinear(gates[e], "experts_q gate"), qlinear(ups[e], "experts_q up"), qlinear(downs[e], "experts_q down")};
    for (int64_t t = 0; t < n; ++t)
      for (int64_t j = 0; j < k; ++j)
        if (ip[t * k + j] == expert_ids[e]) w.rows.emplace_back(t, wp[t * k + j]);
    if (w.rows.empty()) continue;
    check_mlp_q(w.gate, w.up, w.down, D);
    const int64_t m = static_cast<int64_t>(w.rows.size()), I = w.gate.N;
    w.x.resize(m * D);
    for (int64_t r = 0; r < m; ++r) std::memcpy(w.x.data() + r * D, xp + w.rows[r].first * D, D * sizeof(at::BFloat16));
    w.g.resize(m * I);
    w.u.resize(m * I);
    w.y.resize(m * D);
    w.xg = prepare(w.gate, w.x.data(), m);
    w.xu = prepare(w.up, w.x.data(), m);
    work.push_back(std::move(w));
  }
  // items: (expert, which matrix, first row); gate and up first, then down
  std::vector<std::tuple<size_t, int, int64_t>> items;
  for (size_t e = 0; e < work.size(); ++e)
    for (int which = 0; which < 2; ++which)
      for (int64_t r = 0; r < work[e].gate.N; r += ROW_GRAIN) items.emplace_back(e, which, r);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      auto [e, which, r] = items[i];
      ExpertWork& w = work[e];
      const QLinear& lin = which == 0 ? w.gate : w.up;
      linear_rows_q(lin, which == 0 ? w.xg : w.xu, w.x.data(), (which == 0 ? w.g : w.u).data(), r,
                    std::min(lin.N, r + ROW_GRAIN));
    }
  });
  items.clear();
  for (size_t e = 0; e < work.size(); ++e) {
    ExpertWork& w = work[e];
    swiglu_bf16(w.g.data(), w.u.data(), static_cast<int64_t>(w.g.size()));
    w.xd = prepare(w.down, w.g.data(), static_cast<int64_t>(w.rows.size()));
    for (int64_t r = 0; r < D; r += ROW_GRAIN) items.emplace_back(e, 2, r);
  }
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      auto [e, which, r] = items[i];
      ExpertWork& w = work[e];
      linear_rows_q(w.down, w.xd, w.g.data(), w.y.data(), r, std::min(D, r + ROW_GRAIN));
    }
  });
  auto out = torch::zeros_like(x);
  auto op = out.data_ptr<at::BFloat16>();
  for (const ExpertWork& w : work)  // ascending expert order
    for (size_t r = 0; r < w.rows.size(); ++r) {
      at::BFloat16* dst = op + w.rows[r].first * D;
      for (int64_t i = 0; i < D; ++i)
        dst[i] = at::BFloat16(bf(dst[i]) + bf(at::BFloat16(bf(w.y[r * D + i]) * w.rows[r].second)));
    }
  return out;
}

// Rows [row_begin, row_end) of the weight as bf16 (w * scale in fp32, rounded once): prefill's tiles.
torch::Tensor dequantize_q(QArgs weight, int64_t row_begin, int64_t row_end) {
  const QLinear w = qlinear(weight, "dequantize_q");
  TORCH_CHECK(0 <= row_begin && row_begin <= row_end && row_end <= w.N, "dequantize_q: rows ", row_begin, "..", row_end);
  auto y = torch::empty({row_end - row_begin, w.K}, torch::dtype(at::kBFloat16));
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  at::parallel_for(row_begin, row_end, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> row(w.K);
    for (int64_t r = begin; r < end; ++r) {
      dequant_row(w, r, row.data());
      for (int64_t i = 0; i < w.K; ++i) yp[(r - row_begin) * w.K + i] = at::BFloat16(row[i]);
    }
  });
  return y;
}

}  // namespace moemesh
