// MLA attention for the few new tokens of one request (decode), in the absorbed form, bf16 in and out:
// rope the new keys and write [latent | rope key] rows into the cache, take each query into the latent
// space (W_UK), attend over the cache in fp32 — each cache row is read once for all heads — and bring
// the attended latent back out (W_UV). Rounding points follow the torch path in torch_backend.py.
#include "common.h"

namespace moemesh {
namespace {

inline at::BFloat16 bf(float v) { return at::BFloat16(v); }
inline float fl(at::BFloat16 v) { return static_cast<float>(v); }

// One rope vector in bf16 arithmetic, as the reference rotates it: cos/sin rounded to bf16, each
// product and sum rounded. The output is laid out [rotated firsts | rotated seconds].
inline void rope_bf16(const at::BFloat16* x, const float* cos, const float* sin, int64_t dr, bool interleave,
                      at::BFloat16* out) {
  const int64_t half = dr / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = fl(interleave ? x[2 * i] : x[i]);
    const float x2 = fl(interleave ? x[2 * i + 1] : x[half + i]);
    const float c = fl(bf(cos[i])), s = fl(bf(sin[i]));
    out[i] = bf(fl(bf(x1 * c)) - fl(bf(x2 * s)));
    out[half + i] = bf(fl(bf(x2 * c)) + fl(bf(x1 * s)));
  }
}

inline float dot_f32(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float total = 0;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  total = _mm512_reduce_add_ps(acc);
#endif
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

inline void bf16_row_to_float(const at::BFloat16* row, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = fl(row[i]);
}

}  // namespace

torch::Tensor mla_decode_bf16(torch::Tensor q_nope,  // [n, H, nope]
                              torch::Tensor q_pe,    // [n, H, rope], not yet rotated
                              torch::Tensor rows,    // [n, kv_lora + rope]: normalized latent | key, not yet rotated
                              torch::Tensor cos,     // [n, rope/2] fp32
                              torch::Tensor sin,
                              torch::Tensor cache,   // [capacity, kv_lora + rope]; rows start.. are written
                              int64_t start,
                              torch::Tensor w_uk,    // [H, kv_lora, nope]
                              torch::Tensor w_uv,    // [H, v, kv_lora]
                              double scale, bool interleave) {
  q_nope = q_nope.contiguous();
  q_pe = q_pe.contiguous();
  rows = rows.contiguous();
  cos = cos.contiguous();
  sin = sin.contiguous();
  for (auto* t : {&q_nope, &q_pe, &rows, &cache, &w_uk, &w_uv}) check_bf16(*t, "mla_decode_bf16");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat, "mla_decode_bf16: cos/sin fp32");
  const int64_t n = q_nope.size(0), H = q_nope.size(1), dn = q_nope.size(2), dr = q_pe.size(2);
  const int64_t C = w_uk.size(1), W = C + dr, dv = w_uv.size(1);
  TORCH_CHECK(rows.size(0) == n && rows.size(1) == W && cache.size(1) == W && w_uk.size(0) == H &&
              w_uk.size(2) == dn && w_uv.size(0) == H && w_uv.size(2) == C && cos.size(1) == dr / 2,
              "mla_decode_bf16: shapes");
  TORCH_CHECK(start >= 0 && start + n <= cache.size(0), "mla_decode_bf16: cache too small");

  at::BFloat16* kv = cache.data_ptr<at::BFloat16>();
  const at::BFloat16* rp = rows.data_ptr<at::BFloat16>();
  for (int64_t t = 0; t < n; ++t) {
    at::BFloat16* dst = kv + (start + t) * W;
    std::memcpy(dst, rp + t * W, C * sizeof(at::BFloat16));
    rope_bf16(rp + t * W + C, cos.data_ptr<float>() + t * (dr / 2), sin.data_ptr<float>() + t * (dr / 2), dr,
              interleave, dst + C);
  }

  // Queries in the latent space: q_lat[h, t, :] = W_UK[h] @ q_nope[t, h, :] (bf16, as the torch path rounds).
  auto qn = q_nope.transpose(0, 1).contiguous();  // [H, n, nope]
  auto q_lat = torch::empty({H, n, C}, q_nope.options());
  linear_per_head(qn.data_ptr<at::BFloat16>(), w_uk.data_ptr<at::BFloat16>(), H, n, C, dn, q_lat.data_ptr<at::BFloat16>());

  auto o_lat = torch::empty({H, n, C}, q_nope.options());  // attended latents, rounded to bf16
  std::vector<float> q32(H * W);
  std::vector<at::BFloat16> q_rot(dr);
  for (int64_t t = 0; t < n; ++t) {
    const int64_t S = start + t + 1;  // causal: this token sees positions 0..start+t
    for (int64_t h = 0; h < H; ++h) {
      const at::BFloat16* ql = q_lat.data_ptr<at::BFloat16>() + (h * n + t) * C;
      for (int64_t c = 0; c < C; ++c) q32[h * W + c] = fl(ql[c]) * static_cast<float>(scale);
      rope_bf16(q_pe.data_ptr<at::BFloat16>() + (t * H + h) * dr, cos.data_ptr<float>() + t * (dr / 2),
                sin.data_ptr<float>() + t * (dr / 2), dr, interleave, q_rot.data());
      for (int64_t r = 0; r < dr; ++r) q32[h * W + C + r] = fl(q_rot[r]) * static_cast<float>(scale);
    }
    std::vector<float> scores(H * S);
    at::parallel_for(0, S, 16, [&](int64_t begin, int64_t end) {  // each cache row read once, for all heads
      std::vector<float> row(W);
      for (int64_t s = begin; s < end; ++s) {
        bf16_row_to_float(kv + s * W, W, row.data());
        for (int64_t h = 0; h < H; ++h) scores[h * S + s] = dot_f32(q32.data() + h * W, row.data(), W);
      }
    });
    at::parallel_for(0, H, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> acc(C), row(C);
      for (int64_t h = begin; h < end; ++h) {
        float* sc = scores.data() + h * S;
        float top = sc[0];
        for (int64_t s = 1; s < S; ++s) top = std::max(top, sc[s]);
        float total = 0;
        for (int64_t s = 0; s < S; ++s) total += (sc[s] = std::exp(sc[s] - top));
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t s = 0; s < S; ++s) {
          const float p = sc[s] / total;
          bf16_row_to_float(kv + s * W, C, row.data());
          for (int64_t c = 0; c < C; ++c) acc[c] += p * row[c];
        }
        at::BFloat16* out = o_lat.data_ptr<at::BFloat16>() + (h * n + t) * C;
        for (int64_t c = 0; c < C; ++c) out[c] = bf(acc[c]);
      }
    });
  }

  // Values: values[t, h, :] = W_UV[h] @ o_lat[h, t, :].
  auto values = torch::empty({H, n, dv}, q_nope.options());
  linear_per_head(o_lat.data_ptr<at::BFloat16>(), w_uv.data_ptr<at::BFloat16>(), H, n, dv, C, values.data_ptr<at::BFloat16>());
  return values.transpose(0, 1);  // [n, H, v]
}

}  // namespace moemesh
