// The avx2 level's decode matmuls for quantized weights (included by quant.cpp; the avx512 level's are there).
// AVX2 has no bf16 dot product, so every weight becomes an fp32 value in registers and meets an fp32 activation
// in an FMA; the activations are arranged once per call (`prepare`) in the order the weights unpack into:
//   int4 / int8, lane-major (the same layout as avx512): 32-bit lane l of every 64-byte chunk of a span is a word
//     of the span's group l, holding T = 8 nibbles or 4 bytes. Value t is isolated in place by one AND and
//     converted exactly by VCVTDQ2PS, as q * 2^(bits t); its activation carries the 2^(-bits t) (exact: a power
//     of two). The top value is shifted down instead (its mask would be the sign bit) and takes x as it is. So
//     D_g = sum q x directly (no offset), and a span ends as on avx512: y += s_g D_g + b_g X_g, 16 groups in the
//     16 lanes of a Vec16.
//   FP8 e4m3, as value * 2^-8 (the 2^8 goes into the block's scale): chunks without zero or subnormal bytes (all of
//     a trained model's but a few) take integer steps alone: a normal s eeee mmm is the bf16 number
//     s | (eeee mmm << 4) + (112 << 7), and bf16 is the upper half of an fp32. Other chunks go through fp16: the byte
//     moved to bits 15 and 13-7 of a 16-bit lane is the fp16 number (fp16 has one more exponent bit, bias 15 for 7;
//     e4m3's subnormals land on fp16's), which F16C's VCVTPH2PS converts exactly, at about twice the cost.
// Registers bound the tokens x rows of a pass: 8 accumulators in all, 16 registers.

// Included inside namespace moemesh.

// ---- activations

// FP8: per 64-byte chunk, its 64 values in the order each conversion gives them (zero past K), the orders one after
// the other: chunks * 64 floats for fp8_normal_to_f32 (per 32-byte half: bytes 4j, then 4j + 1, 4j + 2, 4j + 3),
// then chunks * 64 for fp8_to_f32 (per half: its even bytes, the first 8 then the last 8, then its odd bytes).
void arrange_fp8(const QLinear& w, const uint16_t* x, float* out) {
  const int64_t n = w.chunks() * 64;
  for (int64_t i = 0; i < n; i += 32)
    for (int t = 0; t < 4; ++t)
      for (int j = 0; j < 8; ++j) out[i + 8 * t + j] = i + 4 * j + t < w.K ? bf16_to_float(x[i + 4 * j + t]) : 0.0f;
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
      _mm256_storeu_ps(out + i + 8 * k, bf16_even(v));
      _mm256_storeu_ps(out + i + 16 + 8 * k, bf16_odd(v));
    }
  }
}

// Lane-major: per pattern p (QLinear::patterns) and chunk c of a span, T runs of 16 floats: run t, lane l = value
// T c + t of group (16 p + l) % G, times 2^(-bits t) (times 1 for the top value, see unpack).
void arrange_lanes(const QLinear& w, const uint16_t* x, float* out) {
  const int T = w.kind == KIND_INT4 ? 8 : 4, bits = 32 / T;
  const int64_t G = w.groups(), span_chunks = w.span_chunks();
  float scale[8];
  for (int t = 0; t < T; ++t) scale[t] = t == T - 1 ? 1.0f : std::ldexp(1.0f, -bits * t);
  for (int64_t p = 0; p < w.patterns(); ++p)
    for (int64_t l = 0; l < 16; ++l) {
      const uint16_t* xg = x + (16 * p + l) % G * w.group;
      for (int64_t c = 0; c < span_chunks; ++c)
        for (int t = 0; t < T; ++t)
          out[((p * span_chunks + c) * T + t) * 16 + l] = bf16_to_float(xg[T * c + t]) * scale[t];
    }
}

Acts prepare(const QLinear& w, const at::BFloat16* x, int64_t M) {
  Acts acts;
  acts.M = M;
  acts.raw = x;
  if (w.kind == KIND_BF16 || (w.kind != KIND_FP8 && !w.lanes)) return acts;  // affine in MLX's order: scalar path
  const int T = w.kind == KIND_INT4 ? 8 : 4;
  acts.width = w.kind == KIND_FP8 ? 2 * w.chunks() * 64 : w.patterns() * w.span_chunks() * T * 16;
  acts.xf.resize(M * acts.width);
  const auto* xb = reinterpret_cast<const uint16_t*>(x);
  for (int64_t m = 0; m < M; ++m) {
    if (w.kind == KIND_FP8)
      arrange_fp8(w, xb + m * w.K, acts.xf.data() + m * acts.width);
    else
      arrange_lanes(w, xb + m * w.K, acts.xf.data() + m * acts.width);
  }
  if (w.kind != KIND_FP8) group_sums_by_lane(w, xb, M, acts);
  return acts;
}

// ---- int4 / int8, lane-major

// Weight rows (or spans) in flight per pass for M tokens, and chains per row and token (value positions t
// alternate between them): 8 accumulators in all. A chunk's U units are unpacked side by side, so that
// neighbouring FMAs feed different chains rather than one row's chain after another's.
template <int M>
constexpr int pass_units() { return M == 1 ? 2 : 1; }
template <int M, int U>
constexpr int chains() { return M * U <= 2 ? 2 : 1; }

// d[m][u][t % chains] += unit u's chunk at wp[u] (16 lanes of T values) times token m's activations at
// xp[u * M + m] (T runs of 16 floats), lane by lane. Value t of a lane is isolated in place by an AND with a
// mask shifted along once per t (one register, not T constants), the top one by a shift; the words stay in
// registers (folded into each AND, a load would repeat T times).
template <int M, int U, int T>
inline void chunk_fma(const uint8_t* const* wp, const float* const* xp, Vec16 (&d)[M][U][2]) {
  constexpr int P = chains<M, U>(), bits = 32 / T;
  __m256i lo[U], hi[U];
  for (int u = 0; u < U; ++u) {
    lo[u] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp[u]));
    hi[u] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp[u] + 32));
    __asm__("" : "+x"(lo[u]), "+x"(hi[u]));
  }
  __m256i mask = _mm256_set1_epi32((1 << bits) - 1);
#pragma GCC unroll 8
  for (int t = 0; t < T; ++t) {
    for (int u = 0; u < U; ++u) {
      const __m256i ql = t < T - 1 ? _mm256_and_si256(lo[u], mask) : _mm256_srli_epi32(lo[u], 32 - bits);
      const __m256i qh = t < T - 1 ? _mm256_and_si256(hi[u], mask) : _mm256_srli_epi32(hi[u], 32 - bits);
      for (int m = 0; m < M; ++m) {  // q * 2^(bits t) exactly: at most 8 significant bits
        const float* x = xp[u * M + m] + 16 * t;
        Vec16& acc = d[m][u][t % P];
        acc.lo = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ql), _mm256_loadu_ps(x), acc.lo);
        acc.hi = _mm256_fmadd_ps(_mm256_cvtepi32_ps(qh), _mm256_loadu_ps(x + 8), acc.hi);
      }
    }
    mask = _mm256_slli_epi32(mask, bits);
  }
}

template <int M, int U>
inline Vec16 chained(const Vec16 (&d)[M][U][2], int m, int u) {
  return chains<M, U>() == 2 ? d[m][u][0] + d[m][u][1] : d[m][u][0];
}

// R rows from r0 of a lane-major weight whose rows are whole spans, for tokens m0..m0+M: per span, the products
// accumulate per lane (= group) and the span's 16 scales and bias terms apply at its end.
template <int M, int R, int T>
void affine_pass(const QLinear& w, const Acts& xs, int64_t m0, int64_t r0, int rows, float* out /*[M][ROWS]*/) {
  const int64_t rb = w.row_bytes(), G = w.groups(), span_chunks = w.span_chunks();
  const AffineRows rs(w, r0, rows);
  float acc[M][R] = {};
  for (int64_t g0 = 0, c0 = 0; g0 < G; g0 += 16, c0 += span_chunks) {
    Vec16 d[M][R][2];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) d[m][r][0] = d[m][r][1] = zero16();
    for (int64_t c = c0; c < c0 + span_chunks; ++c) {
      const uint8_t* wp[R];
      const float* xp[R * M];
      for (int r = 0; r < R; ++r) {
        wp[r] = rs.w[r] + c * CHUNK_BYTES;
        _mm_prefetch(reinterpret_cast<const char*>(wp[r] + PREFETCH_ROWS * rb), _MM_HINT_T1);
        for (int m = 0; m < M; ++m) xp[r * M + m] = xs.token(m0 + m) + c * T * 16;
      }
      chunk_fma<M, R, T>(wp, xp, d);
    }
    for (int r = 0; r < R; ++r) {  // y += sum_g s_g D_g + b_g X_g over the span's groups
      const Vec16 s = load_bf16x16(rs.s[r] + g0), b = load_bf16x16(rs.b[r] + g0);
      for (int m = 0; m < M; ++m)
        acc[m][r] += sum16(fma(chained(d, m, r), s, b * load16(xs.sums.data() + (m0 + m) * G + g0)));
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R && r < rows; ++r) out[m * ROWS + r] = acc[m][r];
}

template <int M>
void rows_affine_lanes(const QLinear& w, const Acts& xs, int64_t m0, int64_t r0, int rows, float* out) {
  constexpr int R = pass_units<M>();
  for (int r = 0; r < rows; r += R) {
    if (w.kind == KIND_INT4)
      affine_pass<M, R, 8>(w, xs, m0, r0 + r, std::min(R, rows - r), out + r);
    else
      affine_pass<M, R, 4>(w, xs, m0, r0 + r, std::min(R, rows - r), out + r);
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
  constexpr int SP = pass_units<M>();
  const int64_t G = w.groups(), P = w.patterns(), span_chunks = w.span_chunks(), span_bytes = w.span_bytes();
  const int64_t first = row_begin * G / 16, last = row_end * G / 16;  // spans [first, last)
  const auto* scales = reinterpret_cast<const uint16_t*>(w.scales);
  const auto* biases = reinterpret_cast<const uint16_t*>(w.biases);
  Vec16 row_acc[M];
  for (int m = 0; m < M; ++m) row_acc[m] = zero16();
  int64_t row = row_begin, left = G, p0 = first % P;  // the current row, its groups not yet added, span s0's pattern
  const bool whole_rows = 16 % G == 0;  // spans of 16 / G rows each
  for (int64_t s0 = first; s0 < last; s0 += SP) {
    const int64_t live = std::min<int64_t>(SP, last - s0);
    const uint8_t* ws[SP];  // spans past `last` re-read span s0; their results are dropped
    int64_t pattern[SP];
    const float* xs_at[SP * M];
    for (int j = 0; j < SP; ++j) {
      pattern[j] = j == 0 ? p0 : (pattern[j - 1] + 1 == P ? 0 : pattern[j - 1] + 1);
      const int64_t at = j < live ? j : 0;
      ws[j] = w.w + (s0 + at) * span_bytes;
      for (int m = 0; m < M; ++m) xs_at[j * M + m] = xs.token(m0 + m) + pattern[at] * span_chunks * T * 16;
    }
    p0 = pattern[SP - 1] + 1 == P ? 0 : pattern[SP - 1] + 1;
    Vec16 d[M][SP][2];
    for (int m = 0; m < M; ++m)
      for (int j = 0; j < SP; ++j) d[m][j][0] = d[m][j][1] = zero16();
    for (int64_t c = 0; c < span_chunks; ++c) {
      const uint8_t* wp[SP];
      const float* xp[SP * M];
      for (int j = 0; j < SP; ++j) {
        wp[j] = ws[j] + c * CHUNK_BYTES;
        _mm_prefetch(reinterpret_cast<const char*>(wp[j] + SPAN_PREFETCH), _MM_HINT_T1);
        for (int m = 0; m < M; ++m) xp[j * M + m] = xs_at[j * M + m] + c * T * 16;
      }
      chunk_fma<M, SP, T>(wp, xp, d);
    }
    for (int j = 0; j < live; ++j) {
      const int64_t s = s0 + j;
      const Vec16 sv = load_bf16x16(scales + 16 * s), bv = load_bf16x16(biases + 16 * s);
      Vec16 terms[M];
      for (int m = 0; m < M; ++m) terms[m] = fma(chained(d, m, j), sv, bv * load16(xs.sums.data() + ((m0 + m) * P + pattern[j]) * 16));
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
}

// ---- FP8

// 32 e4m3 bytes, none of them zero or subnormal, as 32 fp32 values * 2^-8, in arrange_fp8's first order. Each 16-bit
// lane's high byte s eeee mmm, shifted right by 4 with its sign copied down, masked (0x87F0: the sign, then
// eeee mmm in bits 10-4) and given 112 more exponent (bf16's bias 127 less e4m3's 7, less the 8 of 2^-8), is the
// bf16 of its value * 2^-8; the low byte, shifted up first, too. A bf16 in the upper half of a 32-bit lane is that
// fp32; one in the lower half is shifted up into it.
inline void fp8_normal_to_f32(__m256i v, __m256* out) {
  const __m256i keep = _mm256_set1_epi16(static_cast<short>(0x87F0)), bias = _mm256_set1_epi16(112 << 7);
  const __m256i odd = _mm256_add_epi16(_mm256_and_si256(_mm256_srai_epi16(v, 4), keep), bias);
  const __m256i even = _mm256_add_epi16(_mm256_and_si256(_mm256_srai_epi16(_mm256_slli_epi16(v, 8), 4), keep), bias);
  const __m256i upper = _mm256_set1_epi32(static_cast<int>(0xFFFF0000));
  out[0] = _mm256_castsi256_ps(_mm256_slli_epi32(even, 16));  // bytes 4j
  out[1] = _mm256_castsi256_ps(_mm256_slli_epi32(odd, 16));   // 4j + 1
  out[2] = _mm256_castsi256_ps(_mm256_and_si256(even, upper));  // 4j + 2
  out[3] = _mm256_castsi256_ps(_mm256_and_si256(odd, upper));   // 4j + 3
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
// normal bytes' integer steps or through fp16 (NORMAL): two chains per row and token. The activations are read
// again for each row: held in registers across the rows (8 per chunk), they would push the accumulators out.
template <int M, int R, bool NORMAL>
inline void fp8_chunk(const uint8_t* const* src, const Acts& xs, int64_t m0, int64_t i, __m256 (&da)[M][R],
                      __m256 (&db)[M][R]) {
  const int64_t order = NORMAL ? 0 : xs.width / 2;
  for (int r = 0; r < R; ++r)
    for (int h = 0; h < 2; ++h) {
      __m256 f[4];
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src[r] + 32 * h));
      if constexpr (NORMAL)
        fp8_normal_to_f32(v, f);
      else
        fp8_to_f32(v, f);
      for (int m = 0; m < M; ++m) {
        const float* xp = xs.token(m0 + m) + order + i + 32 * h;
        __asm__ volatile("" : "+r"(xp));  // a fresh pointer per row: its loads are not shared with the other rows'
        da[m][r] = _mm256_fmadd_ps(f[0], _mm256_loadu_ps(xp), da[m][r]);
        db[m][r] = _mm256_fmadd_ps(f[1], _mm256_loadu_ps(xp + 8), db[m][r]);
        da[m][r] = _mm256_fmadd_ps(f[2], _mm256_loadu_ps(xp + 16), da[m][r]);
        db[m][r] = _mm256_fmadd_ps(f[3], _mm256_loadu_ps(xp + 24), db[m][r]);
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
// chains per row and token, then fold and take the block's scale. A last chunk past K runs on zero-padded copies.
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
    const __m256 s = _mm256_set1_ps(scales[kb] * 256.0f);  // 2^8: the fp16 values' 2^-8
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
    for (int r = 0; r < R && r < rows; ++r) out[m * ROWS + r] = total[r];
  }
}

template <int M>
void rows_fp8(const QLinear& w, const Acts& xs, int64_t m0, int64_t r0, int rows, float* out) {
  constexpr int R = M == 1 ? ROWS : M == 2 ? 2 : 1;  // 2 M R accumulators: 8
  for (int r = 0; r < rows; r += R) fp8_pass<M, R>(w, xs, m0, r0 + r, std::min(R, rows - r), out + r);
}
