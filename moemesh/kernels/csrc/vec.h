// The instruction-set level this build targets (cpu_ext.py compiles one module per level) and a 16-float vector
// over it: one __m512 at the avx512 level, two __m256 at avx2. The lane-major affine layout puts 16 groups in
// 16 fp32 lanes, so the code that finishes a span (scales, biases, group sums) and the element-wise helpers
// (SwiGLU, softmax, the MoE sums) are written once against Vec16; the inner loops, where the two levels use
// different instructions, are written per level (quant.cpp, quant_avx2.h, common.h).
#pragma once
#include <cstdint>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#if defined(__AVX512BF16__) && defined(__AVX512VBMI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define MOEMESH_AVX512 1
#define MOEMESH_ISA "avx512"
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define MOEMESH_AVX2 1
#define MOEMESH_ISA "avx2"
#else
#define MOEMESH_ISA "scalar"
#endif

namespace moemesh {

#if defined(MOEMESH_AVX512)
struct Vec16 {
  __m512 v;
};
inline Vec16 zero16() { return {_mm512_setzero_ps()}; }
inline Vec16 set16(float f) { return {_mm512_set1_ps(f)}; }
inline Vec16 operator+(Vec16 a, Vec16 b) { return {_mm512_add_ps(a.v, b.v)}; }
inline Vec16 operator-(Vec16 a, Vec16 b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline Vec16 operator*(Vec16 a, Vec16 b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline Vec16 operator/(Vec16 a, Vec16 b) { return {_mm512_div_ps(a.v, b.v)}; }
inline Vec16 fma(Vec16 a, Vec16 b, Vec16 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }  // a * b + c
inline Vec16 fnma(Vec16 a, Vec16 b, Vec16 c) { return {_mm512_fnmadd_ps(a.v, b.v, c.v)}; }  // c - a * b
inline Vec16 max(Vec16 a, Vec16 b) { return {_mm512_max_ps(a.v, b.v)}; }
inline Vec16 min(Vec16 a, Vec16 b) { return {_mm512_min_ps(a.v, b.v)}; }
inline Vec16 load16(const float* p) { return {_mm512_loadu_ps(p)}; }
inline void store16(float* p, Vec16 a) { _mm512_storeu_ps(p, a.v); }
inline __mmask16 first_lanes(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? 0 : __mmask16((1u << n) - 1); }
// The first n lanes from p, `fill` in the others; and their store.
inline Vec16 load16(const float* p, int64_t n, float fill) {
  return {_mm512_mask_loadu_ps(_mm512_set1_ps(fill), first_lanes(n), p)};
}
inline void store16(float* p, Vec16 a, int64_t n) { _mm512_mask_storeu_ps(p, first_lanes(n), a.v); }
inline float sum16(Vec16 a) { return _mm512_reduce_add_ps(a.v); }
inline float max16(Vec16 a) { return _mm512_reduce_max_ps(a.v); }
// bf16 -> fp32: the 16 bits become the upper half of the float.
inline Vec16 load_bf16x16(const void* p) {
  return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(static_cast<const __m256i*>(p))), 16))};
}
inline void store_bf16x16(void* p, Vec16 a) {  // rounded to nearest even, as at::BFloat16(float)
  _mm256_storeu_si256(static_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(a.v));
}
inline Vec16 round_bf16x16(Vec16 a) {  // a rounded to bf16, kept in fp32: the reference's rounding points
  return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(a.v)), 16))};
}
inline Vec16 round_nearest(Vec16 a) { return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
inline Vec16 scale_pow2(Vec16 p, Vec16 n) { return {_mm512_scalef_ps(p.v, n.v)}; }  // p * 2^n, n integral
#elif defined(MOEMESH_AVX2)
struct Vec16 {
  __m256 lo, hi;  // lanes 0-7, 8-15
};
inline Vec16 zero16() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline Vec16 set16(float f) { return {_mm256_set1_ps(f), _mm256_set1_ps(f)}; }
inline Vec16 operator+(Vec16 a, Vec16 b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline Vec16 operator-(Vec16 a, Vec16 b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
inline Vec16 operator*(Vec16 a, Vec16 b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline Vec16 operator/(Vec16 a, Vec16 b) { return {_mm256_div_ps(a.lo, b.lo), _mm256_div_ps(a.hi, b.hi)}; }
inline Vec16 fma(Vec16 a, Vec16 b, Vec16 c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
inline Vec16 fnma(Vec16 a, Vec16 b, Vec16 c) { return {_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)}; }
inline Vec16 max(Vec16 a, Vec16 b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
inline Vec16 min(Vec16 a, Vec16 b) { return {_mm256_min_ps(a.lo, b.lo), _mm256_min_ps(a.hi, b.hi)}; }
inline Vec16 load16(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline void store16(float* p, Vec16 a) {
  _mm256_storeu_ps(p, a.lo);
  _mm256_storeu_ps(p + 8, a.hi);
}
// VMASKMOVPS masks: the sign bit of each 32-bit lane; a window into -1 x 16, 0 x 16 selects the first n lanes.
inline __m256i first_lanes8(int64_t n) {
  alignas(32) static const int32_t window[32] = {-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1};
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(window + 16 - (n < 0 ? 0 : n > 16 ? 16 : n)));
}
inline Vec16 load16(const float* p, int64_t n, float fill) {
  const __m256i lo = first_lanes8(n), hi = first_lanes8(n - 8);
  const __m256 f = _mm256_set1_ps(fill);
  return {_mm256_blendv_ps(f, _mm256_maskload_ps(p, lo), _mm256_castsi256_ps(lo)),
          _mm256_blendv_ps(f, _mm256_maskload_ps(p + 8, hi), _mm256_castsi256_ps(hi))};
}
inline void store16(float* p, Vec16 a, int64_t n) {
  _mm256_maskstore_ps(p, first_lanes8(n), a.lo);
  _mm256_maskstore_ps(p + 8, first_lanes8(n - 8), a.hi);
}
inline float sum8(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline float sum16(Vec16 a) { return sum8(_mm256_add_ps(a.lo, a.hi)); }
inline float max16(Vec16 a) {
  const __m256 m = _mm256_max_ps(a.lo, a.hi);
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
inline __m256 bf16x8_to_f32(__m128i v) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16)); }
inline Vec16 load_bf16x16(const void* p) {
  const auto* q = static_cast<const __m128i*>(p);
  return {bf16x8_to_f32(_mm_loadu_si128(q)), bf16x8_to_f32(_mm_loadu_si128(q + 1))};
}
// fp32 -> bf16 bits, rounded to nearest even (finite inputs): add 0x7FFF plus the kept part's lowest bit, keep the
// upper 16 bits. The two halves' 32-bit lanes pack into 16-bit lanes in order once the 128-bit blocks are swapped
// back (VPACKUSDW packs within 128-bit blocks).
inline __m256i bf16_bits(Vec16 a) {
  auto round = [](__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    return _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  };
  return _mm256_permute4x64_epi64(_mm256_packus_epi32(round(a.lo), round(a.hi)), 0xD8);
}
inline void store_bf16x16(void* p, Vec16 a) { _mm256_storeu_si256(static_cast<__m256i*>(p), bf16_bits(a)); }
inline Vec16 round_bf16x16(Vec16 a) {
  const __m256i b = bf16_bits(a);
  return {bf16x8_to_f32(_mm256_castsi256_si128(b)), bf16x8_to_f32(_mm256_extracti128_si256(b, 1))};
}
inline Vec16 round_nearest(Vec16 a) {
  constexpr int mode = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  return {_mm256_round_ps(a.lo, mode), _mm256_round_ps(a.hi, mode)};
}
// p * 2^n for integral n in [-252, 254], as VSCALEFPS gives it: 2^n in two halves, each a normal float built in
// its exponent field, so that a result below the normal range is rounded once, by the second multiplication.
inline Vec16 scale_pow2(Vec16 p, Vec16 n) {
  auto half = [](__m256 p, __m256 n) {
    const __m256i k = _mm256_cvtps_epi32(n), k1 = _mm256_srai_epi32(k, 1), k2 = _mm256_sub_epi32(k, k1);
    auto pow2 = [](__m256i e) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(127)), 23)); };
    return _mm256_mul_ps(_mm256_mul_ps(p, pow2(k1)), pow2(k2));
  };
  return {half(p.lo, n.lo), half(p.hi, n.hi)};
}
#endif

#if defined(MOEMESH_AVX512) || defined(MOEMESH_AVX2)
// e^x, 16 at a time: x = n ln2 + r with |r| <= ln2/2, e^r by its degree-7 Taylor polynomial (truncation < 1e-8,
// below fp32's half ulp), times 2^n. x is clamped first to where e^x goes from 0 to inf in fp32, so that r stays
// small.
inline Vec16 exp16(Vec16 x) {
  x = min(max(x, set16(-104.0f)), set16(89.0f));
  const Vec16 n = round_nearest(x * set16(1.4426950408889634f));
  Vec16 r = fnma(n, set16(0.693145751953125f), x);  // ln2 in two parts: n * hi is exact
  r = fnma(n, set16(1.4286068203094173e-06f), r);
  Vec16 p = set16(1.0f / 5040);
  for (const float c : {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = fma(p, r, set16(c));
  return scale_pow2(p, n);
}
#endif

}  // namespace moemesh
