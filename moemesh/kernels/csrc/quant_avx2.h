// The avx2 level's decode matmuls for quantized weights (included by quant.cpp; the avx512 level's are there).
// AVX2 has no bf16 dot product. The activations are arranged once per call (`prepare`) in the order the weights
// unpack into:
//   int4 / int8, lane-major (the same layout as avx512): 32-bit lane l of every 64-byte chunk of a span is a word
//     of the span's group l, T = 8 nibbles or 4 bytes, T / 2 in each 16-bit half. Each step isolates one value of
//     every 16-bit lane (a shift and an AND), and VPMADDWD multiplies them by the activations as 16-bit integers
//     (each group's x times a power of two, rounded) and adds each pair of products into its group's 32-bit
//     lane: 16 values per instruction, exact integer sums. A span ends as on avx512, the integer sums D_g back in
//     fp32 times the x's step: y += s_g D_g + b_g X_g, 16 groups in the 16 lanes of a Vec16.
//   FP8 e4m3, as value * 2^-120, the token's x times 2^e (e: the most, up to 126, that keeps its largest |x| below
//     2^126; the 2^(120 - e) applies to the token's results): chunks without zero or subnormal bytes (all of a
//     trained model's but a few) take integer steps alone: a normal s eeee mmm moved to bits 31 and 26-20 of a
//     32-bit lane is the fp32 number of its value * 2^-120, the least of them FLT_MIN. Other chunks go through
//     fp16, whose bits are the byte moved to bits 15 and 13-7 of a 16-bit lane (value * 2^-8: fp16 has one more
//     exponent bit, bias 15 for 7, and e4m3's subnormals land on fp16's), converted exactly by F16C's VCVTPH2PS,
//     against x times 2^(e - 112). So no operand is ever subnormal, where FMAs take microcode assists on Intel
//     CPUs.
// FP8: registers bound the tokens x rows of a pass: 8 accumulators in all, 16 registers.

// Included inside namespace moemesh.

// ---- activations

// FP8: per 64-byte chunk, its 64 values in the order each conversion gives them (zero past K), the orders one after
// the other: chunks * 64 floats for fp8_normal_to_f32 (per 32-byte half: bytes 4j, then 4j + 1, 4j + 2, 4j + 3),
// x 2^e, then chunks * 64 for fp8_to_f32 (per half: its even bytes, the first 8 then the last 8, then its odd
// bytes), x 2^(e - 112). Returns 2^(120 - e), the factor of the token's results (see the top of the file).
float arrange_fp8(const QLinear& w, const uint16_t* x, float* out) {
  float largest = 0;
  for (int64_t i = 0; i < w.K; ++i) largest = std::max(largest, std::abs(bf16_to_float(x[i])));
  const int e = largest > 0 ? std::min(125 - std::ilogb(largest), 126) : 120;  // 2^e a float
  const __m256 first = _mm256_set1_ps(std::ldexp(1.0f, e)), second = _mm256_set1_ps(std::ldexp(1.0f, e - 112));
  const int64_t n = w.chunks() * 64;
  for (int64_t i = 0; i < n; i += 32)
    for (int t = 0; t < 4; ++t)
      for (int j = 0; j < 8; ++j) out[i + 8 * t + j] = i + 4 * j + t < w.K ? bf16_to_float(x[i + 4 * j + t]) : 0.0f;
  for (int64_t i = 0; i < n; i += 8) _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_loadu_ps(out + i), first));
  out += n;
  for (int64_t i = 0; i < n; i += 32) {  // the even bf16 of 16 become fp32 by a shift, the odd ones by a mask
    alignas(32) uint16_t tail[32] = {};
    const uint16_t* src = x + i;
    if (w.K - i < 32) {
      std::memcpy(tail, src, std::max<int64_t>(0, w.K - i) * 2);
      src = tail;
    }
    for (int k = 0; k < 2; ++k) {  // values i + 16 k ...: out k (even), out 2 + k (odd)
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 16 * k));
      _mm256_storeu_ps(out + i + 8 * k, _mm256_mul_ps(bf16_even(v), second));
      _mm256_storeu_ps(out + i + 16 + 8 * k, _mm256_mul_ps(bf16_odd(v), second));
    }
  }
  return std::ldexp(1.0f, 120 - e);
}

// Lane-major: per token, each group's x as 16-bit integers x 2^e_g, e_g the largest exponent that keeps the group's
// largest |x| below 2^15 (so x values within 2^8 of it convert exactly; the others' error is at most 2^-16 of it),
// and in each lane of `steps` the 2^-e_g of the group that lane multiplies. Laid out per pattern p
// (QLinear::patterns), chunk c of a span and unpack step k < T/2 (see unpack): two runs of 16 for the chunk's
// two 32-byte halves h (the span's groups 8h..8h+7), lane 2j + e of run h = value T c + e T/2 + k of group
// (16 p + 8 h + j) % G, the values that meet the weights' 16-bit lanes unpacked at step k.
void arrange_lanes(const QLinear& w, const uint16_t* x, int16_t* out, float* steps) {
  const int T = w.kind == KIND_INT4 ? 8 : 4, half = T / 2;
  const int64_t G = w.groups(), span_chunks = w.span_chunks();
  std::vector<float> scale(G), step(G);
  for (int64_t g = 0; g < G; ++g) {
    float largest = 0;
    for (int64_t i = g * w.group; i < (g + 1) * w.group; ++i) largest = std::max(largest, std::abs(bf16_to_float(x[i])));
    const int e = largest > 0 ? std::clamp(14 - std::ilogb(largest), -126, 126) : 0;
    scale[g] = std::ldexp(1.0f, e);
    step[g] = std::ldexp(1.0f, -e);
  }
  for (int64_t p = 0; p < w.patterns(); ++p)
    for (int64_t l = 0; l < 16; ++l) {
      const int64_t g = (16 * p + l) % G;
      const uint16_t* xg = x + g * w.group;
      steps[16 * p + l] = step[g];
      for (int64_t c = 0; c < span_chunks; ++c)
        for (int k = 0; k < half; ++k)
          for (int e = 0; e < 2; ++e) {
            const int64_t at = (((p * span_chunks + c) * half + k) * 2 + l / 8) * 16 + 2 * (l % 8) + e;
            out[at] = static_cast<int16_t>(std::lrint(bf16_to_float(xg[T * c + e * half + k]) * scale[g]));
          }
    }
}

Acts prepare(const QLinear& w, const at::BFloat16* x, int64_t M) {
  Acts acts;
  acts.M = M;
  acts.raw = x;
  if (w.kind == KIND_BF16 || (w.kind != KIND_FP8 && !w.lanes)) return acts;  // affine in MLX's order: scalar path
  const auto* xb = reinterpret_cast<const uint16_t*>(x);
  if (w.kind == KIND_FP8) {
    acts.width = 2 * w.chunks() * 64;
    acts.xf.resize(M * acts.width);
    acts.steps.resize(M);
    for (int64_t m = 0; m < M; ++m) acts.steps[m] = arrange_fp8(w, xb + m * w.K, acts.xf.data() + m * acts.width);
    return acts;
  }
  const int64_t P = w.patterns();
  acts.width = P * w.span_chunks() * (w.kind == KIND_INT4 ? 8 : 4) * 16;
  acts.xq.resize(M * acts.width);
  acts.steps.resize(M * P * 16);
  for (int64_t m = 0; m < M; ++m)
    arrange_lanes(w, xb + m * w.K, acts.xq.data() + m * acts.width, acts.steps.data() + m * P * 16);
  group_sums_by_lane(w, xb, M, acts);
  return acts;
}

// ---- int4 / int8, lane-major

struct Int16x {  // 16 int32 sums: lanes 0-7, 8-15 (a span's groups)
  __m256i lo, hi;
};

// Step k of T/2 of a chunk half's 16-bit lanes: value k of each (a nibble or a byte), as a 16-bit integer.
template <int T>
inline __m256i unpack(__m256i v, int k) {
  constexpr int bits = 32 / T;
  const __m256i q = k == 0 ? v : _mm256_srli_epi16(v, bits * k);
  return k == T / 2 - 1 ? q : _mm256_and_si256(q, _mm256_set1_epi16((1 << bits) - 1));
}

// d[m] += the chunk at wp (16 lanes of T values) times token m's activations at xp[m], lane by lane: each 16-bit
// lane of the weights, unpacked at step k, times its integer x by VPMADDWD, whose pairs of products add into the
// 32-bit lane of their group. Exact: a group's sum stays below 2^31 (at most 128 values of 255 times 2^15). One
// row (or span) at a time: two side by side took 8% longer (registers).
template <int M, int T>
inline void chunk_madd(const uint8_t* wp, const int16_t* const* xp, Int16x (&d)[M]) {
  __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp));
  __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + 32));
  __asm__("" : "+x"(lo), "+x"(hi));  // one load each: folded into each step, it would be T / 2
#pragma GCC unroll 4
  for (int k = 0; k < T / 2; ++k) {
    const __m256i ql = unpack<T>(lo, k), qh = unpack<T>(hi, k);
    for (int m = 0; m < M; ++m) {
      const auto* x = reinterpret_cast<const __m256i*>(xp[m] + 32 * k);
      d[m].lo = _mm256_add_epi32(d[m].lo, _mm256_madd_epi16(ql, _mm256_loadu_si256(x)));
      d[m].hi = _mm256_add_epi32(d[m].hi, _mm256_madd_epi16(qh, _mm256_loadu_si256(x + 1)));
    }
  }
}

// A span's terms s_g D_g + b_g X_g for its 16 groups, from the integer sums (times the x scales' steps).
inline Vec16 span_terms(const Int16x& d, const Vec16& steps, const Vec16& s, const Vec16& b, const Vec16& sums) {
  const Vec16 D = Vec16{_mm256_cvtepi32_ps(d.lo), _mm256_cvtepi32_ps(d.hi)} * steps;
  return fma(D, s, b * sums);
}

// Row r of a lane-major weight whose rows are whole spans, for tokens m0..m0+M: per span, the products accumulate
// per lane (= group) and the span's 16 scales and bias terms apply at its end.
template <int M, int T>
void affine_row(const QLinear& w, const Acts& xs, int64_t m0, int64_t r, float* out /*[M][ROWS]*/) {
  const int64_t rb = w.row_bytes(), G = w.groups(), span_chunks = w.span_chunks();
  const uint8_t* wr = w.w + r * rb;
  const auto* sr = reinterpret_cast<const uint16_t*>(w.scales) + r * G;
  const auto* br = reinterpret_cast<const uint16_t*>(w.biases) + r * G;
  float acc[M] = {};
  for (int64_t g0 = 0, c0 = 0; g0 < G; g0 += 16, c0 += span_chunks) {
    Int16x d[M];
    for (int m = 0; m < M; ++m) d[m].lo = d[m].hi = _mm256_setzero_si256();
    for (int64_t c = c0; c < c0 + span_chunks; ++c) {
      _mm_prefetch(reinterpret_cast<const char*>(wr + c * CHUNK_BYTES + PREFETCH_ROWS * rb), _MM_HINT_T1);
      const int16_t* xp[M];
      for (int m = 0; m < M; ++m) xp[m] = xs.token_q(m0 + m) + c * T * 16;
      chunk_madd<M, T>(wr + c * CHUNK_BYTES, xp, d);
    }
    const Vec16 s = load_bf16x16(sr + g0), b = load_bf16x16(br + g0);
    for (int m = 0; m < M; ++m) {  // y += sum_g s_g D_g + b_g X_g over the span's groups
      const int64_t at = (m0 + m) * G + g0;  // whole-row spans: pattern g0 / 16
      acc[m] += sum16(span_terms(d[m], load16(xs.steps.data() + at), s, b, load16(xs.sums.data() + at)));
    }
  }
  for (int m = 0; m < M; ++m) out[m * ROWS] = acc[m];
}

template <int M>
void rows_affine_lanes(const QLinear& w, const Acts& xs, int64_t m0, int64_t r0, int rows, float* out) {
  for (int r = 0; r < rows; ++r) {
    if (w.kind == KIND_INT4)
      affine_row<M, 8>(w, xs, m0, r0 + r, out + r);
    else
      affine_row<M, 4>(w, xs, m0, r0 + r, out + r);
  }
}

// v with the lanes outside [lo, hi) zeroed.
inline Vec16 keep_lanes(Vec16 v, int64_t lo, int64_t hi) {
  const __m256i ids = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), eight = _mm256_set1_epi32(8);
  const __m256i l = _mm256_set1_epi32(static_cast<int>(lo) - 1), h = _mm256_set1_epi32(static_cast<int>(hi));
  auto in = [&](__m256i i) { return _mm256_castsi256_ps(_mm256_and_si256(_mm256_cmpgt_epi32(i, l), _mm256_cmpgt_epi32(h, i))); };
  return {_mm256_and_ps(v.lo, in(ids)), _mm256_and_ps(v.hi, in(_mm256_add_epi32(ids, eight)))};
}

// v's lanes summed in blocks of G (1, 2, 4 or 8), each block's sum in every lane of it: an XOR butterfly.
inline Vec16 block_sums(Vec16 v, int64_t G) {
  if (G >= 2) v = v + Vec16{_mm256_permute_ps(v.lo, 0xB1), _mm256_permute_ps(v.hi, 0xB1)};  // lane ^ 1
  if (G >= 4) v = v + Vec16{_mm256_permute_ps(v.lo, 0x4E), _mm256_permute_ps(v.hi, 0x4E)};  // lane ^ 2
  if (G >= 8) v = v + Vec16{_mm256_permute2f128_ps(v.lo, v.lo, 1), _mm256_permute2f128_ps(v.hi, v.hi, 1)};  // ^ 4
  return v;
}

// Output rows [row_begin, row_end) of a lane-major weight (both on span boundaries) for tokens m0..m0+M, into
// y [tokens, N], span by span across rows (avx512's spans_affine, which says more): each span's products end as
// one Vec16 of its 16 groups' terms s_l D_l + b_l X_l, whose lanes are then added to their rows.
template <int M, int T>
void spans_affine(const QLinear& w, const Acts& xs, int64_t m0, at::BFloat16* y, int64_t row_begin, int64_t row_end) {
  const int64_t G = w.groups(), P = w.patterns(), span_chunks = w.span_chunks(), span_bytes = w.span_bytes();
  const int64_t first = row_begin * G / 16, last = row_end * G / 16;  // spans [first, last)
  const auto* scales = reinterpret_cast<const uint16_t*>(w.scales);
  const auto* biases = reinterpret_cast<const uint16_t*>(w.biases);
  Vec16 row_acc[M];
  for (int m = 0; m < M; ++m) row_acc[m] = zero16();
  int64_t row = row_begin, left = G, pattern = first % P;  // the current row, its groups not yet added, the span's
  const bool whole_rows = 16 % G == 0;  // spans of 16 / G rows each
  for (int64_t s = first; s < last; ++s, pattern = pattern + 1 == P ? 0 : pattern + 1) {
    const uint8_t* ws = w.w + s * span_bytes;
    Int16x d[M];
    for (int m = 0; m < M; ++m) d[m].lo = d[m].hi = _mm256_setzero_si256();
    for (int64_t c = 0; c < span_chunks; ++c) {
      _mm_prefetch(reinterpret_cast<const char*>(ws + c * CHUNK_BYTES + SPAN_PREFETCH), _MM_HINT_T1);
      const int16_t* xp[M];
      for (int m = 0; m < M; ++m) xp[m] = xs.token_q(m0 + m) + (pattern * span_chunks + c) * T * 16;
      chunk_madd<M, T>(ws + c * CHUNK_BYTES, xp, d);
    }
    const Vec16 sv = load_bf16x16(scales + 16 * s), bv = load_bf16x16(biases + 16 * s);
    Vec16 terms[M];
    for (int m = 0; m < M; ++m) {
      const int64_t at = ((m0 + m) * P + pattern) * 16;
      terms[m] = span_terms(d[m], load16(xs.steps.data() + at), sv, bv, load16(xs.sums.data() + at));
    }
    if (whole_rows) {  // 16 / G rows: lane k G of the block sums is row k's
      for (int m = 0; m < M; ++m) {
        alignas(32) float sums[16];
        store16(sums, block_sums(terms[m], G));
        for (int64_t k = 0; k < 16 / G; ++k) y[(m0 + m) * w.N + row + k] = at::BFloat16(sums[k * G]);
      }
      row += 16 / G;
      continue;
    }
    int64_t lo = 0;  // lanes [lo, lo + left) finish the current row, if it ends in this span
    for (; lo + left <= 16; lo += left, left = G, ++row)
      for (int m = 0; m < M; ++m) {
        y[(m0 + m) * w.N + row] = at::BFloat16(sum16(row_acc[m] + keep_lanes(terms[m], lo, lo + left)));
        row_acc[m] = zero16();
      }
    if (lo < 16) {
      for (int m = 0; m < M; ++m) row_acc[m] = row_acc[m] + keep_lanes(terms[m], lo, 16);
      left -= 16 - lo;
    }
  }
}

// ---- FP8

// 32 e4m3 bytes, none of them zero or subnormal, as 32 fp32 values * 2^-120, in arrange_fp8's first order. Each
// 16-bit lane's high byte s eeee mmm, shifted right by 4 with its sign copied down and masked (0x87F0: the sign,
// then eeee mmm in bits 10-4), is the bf16 of its value * 2^-120; the low byte, shifted up first, too. A bf16
// moved to the upper half of a 32-bit lane, the lower half cleared, is that fp32 (one mask does both).
inline void fp8_normal_to_f32(__m256i v, __m256* out) {
  const __m256i keep = _mm256_set1_epi32(static_cast<int>(0x87F00000));
  const __m256i odd = _mm256_srai_epi16(v, 4), even = _mm256_srai_epi16(_mm256_slli_epi16(v, 8), 4);
  out[0] = _mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32(even, 16), keep));  // bytes 4j
  out[1] = _mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32(odd, 16), keep));   // 4j + 1
  out[2] = _mm256_castsi256_ps(_mm256_and_si256(even, keep));                         // 4j + 2
  out[3] = _mm256_castsi256_ps(_mm256_and_si256(odd, keep));                          // 4j + 3
}

// Any 32 e4m3 bytes as 32 fp32 values * 2^-8, in arrange_fp8's second order: fp16 bits made in each 16-bit lane from
// its high byte (an arithmetic shift by one takes s eeee mmm to bits 15-7 with the sign in bit 14 too, which the
// mask clears with the low byte's remains) and from its low byte (shifted up first), then converted by F16C.
inline void fp8_to_f32(__m256i v, __m256* out) {
  const __m256i keep = _mm256_set1_epi16(static_cast<short>(0xBF80));
  const __m256i even = _mm256_and_si256(_mm256_srai_epi16(_mm256_slli_epi16(v, 8), 1), keep);
  const __m256i odd = _mm256_and_si256(_mm256_srai_epi16(v, 1), keep);
  out[0] = _mm256_cvtph_ps(_mm256_castsi256_si128(even));
  out[1] = _mm256_cvtph_ps(_mm256_extracti128_si256(even, 1));
  out[2] = _mm256_cvtph_ps(_mm256_castsi256_si128(odd));
  out[3] = _mm256_cvtph_ps(_mm256_extracti128_si256(odd, 1));
}

// Whether the R rows' 64-byte chunks at src hold no zero or subnormal byte (eeee = 0): the least eeee of them all.
// The conversion loads the bytes again (from L1): kept in registers from here, they would push the accumulators out.
template <int R>
inline bool fp8_all_normal(const uint8_t* const* src) {
  const __m256i e = _mm256_set1_epi8(0x78);
  __m256i least = e;
  for (int r = 0; r < R; ++r) {
    const uint8_t* p = src[r];
    __asm__ volatile("" : "+r"(p));
    for (int h = 0; h < 2; ++h)
      least = _mm256_min_epu8(least, _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * h)), e));
  }
  return _mm256_movemask_epi8(_mm256_cmpeq_epi8(least, _mm256_setzero_si256())) == 0;
}

// R partial-sum vectors folded into one: lane l holds a partial sum of row l % R (R = 4), of row (l / 2) % 2
// (R = 2), of row 0 (R = 1). Rows share a block's scale, so it applies to the folded vector.
template <int R>
inline __m256 fold_rows(const __m256* d) {
  if constexpr (R == 4) return _mm256_hadd_ps(_mm256_hadd_ps(d[0], d[1]), _mm256_hadd_ps(d[2], d[3]));
  if constexpr (R == 2) return _mm256_hadd_ps(d[0], d[1]);
  return d[0];
}
template <int R>
constexpr int fold_owner(int lane) { return R == 4 ? lane % 4 : R == 2 ? (lane / 2) % 2 : 0; }

// One 64-byte chunk of R rows (at src[r]) against tokens m0..m0+M's activations from column i, converted by the
// normal bytes' integer steps or through fp16 (NORMAL): two chains per row and token, a 32-byte half of every row
// after another. One token's 4 activation vectors of a half are loaded once for the rows (3% fewer cycles); more
// tokens' are read again for each row: held in registers, they would push the accumulators out.
template <int M, int R, bool NORMAL>
inline void fp8_chunk(const uint8_t* const* src, const Acts& xs, int64_t m0, int64_t i, __m256 (&da)[M][R],
                      __m256 (&db)[M][R]) {
  const int64_t order = NORMAL ? 0 : xs.width / 2;
  for (int h = 0; h < 2; ++h) {
    __m256 x1[4];
    if constexpr (M == 1)
      for (int j = 0; j < 4; ++j) x1[j] = _mm256_loadu_ps(xs.token(m0) + order + i + 32 * h + 8 * j);
    for (int r = 0; r < R; ++r) {
      __m256 f[4];
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src[r] + 32 * h));
      if constexpr (NORMAL)
        fp8_normal_to_f32(v, f);
      else
        fp8_to_f32(v, f);
      for (int m = 0; m < M; ++m) {
        const float* xp = xs.token(m0 + m) + order + i + 32 * h;
        __asm__ volatile("" : "+r"(xp));  // a fresh pointer per row: its loads are not shared with the other rows'
        auto x = [&](int j) { return M == 1 ? x1[j] : _mm256_loadu_ps(xp + 8 * j); };
        da[m][r] = _mm256_fmadd_ps(f[0], x(0), da[m][r]);
        db[m][r] = _mm256_fmadd_ps(f[1], x(1), db[m][r]);
        da[m][r] = _mm256_fmadd_ps(f[2], x(2), da[m][r]);
        db[m][r] = _mm256_fmadd_ps(f[3], x(3), db[m][r]);
      }
    }
  }
}

template <int M, int R>
inline void fp8_chunk(const uint8_t* const* src, const Acts& xs, int64_t m0, int64_t i, __m256 (&da)[M][R],
                      __m256 (&db)[M][R]) {
  if (fp8_all_normal<R>(src))
    fp8_chunk<M, R, true>(src, xs, m0, i, da, db);
  else
    fp8_chunk<M, R, false>(src, xs, m0, i, da, db);
}

// R rows from r0 (never straddling a 128-row block) for tokens m0..m0+M. Each block's products gather in two
// chains per row and token, then fold and take the block's scale; the token's factor applies at the end. A last
// chunk past K runs on zero-padded copies.
template <int M, int R>
void fp8_pass(const QLinear& w, const Acts& xs, int64_t m0, int64_t r0, int rows, float* out /*[M][ROWS]*/) {
  const uint8_t* wr[R];
  for (int r = 0; r < R; ++r) wr[r] = w.w + (r0 + (r < rows ? r : 0)) * w.K;
  const float* scales = w.block_scales + (r0 / FP8_BLOCK) * w.block_cols;
  __m256 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t kb = 0; kb < w.block_cols; ++kb) {
    __m256 da[M][R], db[M][R];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) da[m][r] = db[m][r] = _mm256_setzero_ps();
    const int64_t end = std::min<int64_t>(w.K, (kb + 1) * FP8_BLOCK);
    int64_t i = kb * FP8_BLOCK;
    for (; i + CHUNK_BYTES <= end; i += CHUNK_BYTES) {
      const uint8_t* src[R];
      for (int r = 0; r < R; ++r) {
        src[r] = wr[r] + i;
        _mm_prefetch(reinterpret_cast<const char*>(src[r] + PREFETCH_ROWS * w.K), _MM_HINT_T1);
      }
      fp8_chunk<M, R>(src, xs, m0, i, da, db);
    }
    if (i < end) {
      alignas(32) uint8_t tail[R][CHUNK_BYTES] = {};
      const uint8_t* src[R];
      for (int r = 0; r < R; ++r) {
        std::memcpy(tail[r], wr[r] + i, end - i);
        src[r] = tail[r];
      }
      fp8_chunk<M, R>(src, xs, m0, i, da, db);
    }
    const __m256 s = _mm256_set1_ps(scales[kb]);
    for (int m = 0; m < M; ++m) {
      __m256 d[R];
      for (int r = 0; r < R; ++r) d[r] = _mm256_add_ps(da[m][r], db[m][r]);
      acc[m] = _mm256_fmadd_ps(fold_rows<R>(d), s, acc[m]);
    }
  }
  for (int m = 0; m < M; ++m) {
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, acc[m]);
    float total[R] = {};
    for (int l = 0; l < 8; ++l) total[fold_owner<R>(l)] += lanes[l];
    for (int r = 0; r < R && r < rows; ++r) out[m * ROWS + r] = total[r] * xs.steps[m0 + m];  // 2^(120 - e)
  }
}

template <int M>
void rows_fp8(const QLinear& w, const Acts& xs, int64_t m0, int64_t r0, int rows, float* out) {
  constexpr int R = M == 1 ? ROWS : M == 2 ? 2 : 1;  // 2 M R accumulators: 8
  for (int r = 0; r < rows; r += R) fp8_pass<M, R>(w, xs, m0, r0 + r, std::min(R, rows - r), out + r);
}
