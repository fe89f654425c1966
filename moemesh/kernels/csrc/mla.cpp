// A decode step's attention block (MlaLayer): the q and kv_a projections and their norms, then MLA for each
// request's few new tokens in the absorbed form, then o_proj, bf16 in and out. MLA itself (`attend`):
// rope the new keys and write [latent | rope key] rows into the cache, take each query into the latent
// space (W_UK), attend over the cache in fp32 — each cache row is read once for all heads — and bring
// the attended latent back out (W_UV). W_UK and W_UV are bf16, FP8 (128x128 blocks), or packed int4/int8 as
// mlx-lm stores them (`embed_q`, `unembed_out`), heads stacked. Rounding points follow the torch path in
// torch_backend.py.
#include "mla.h"

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

// scores[h, s] = scale * (q[h] . kv[s]) for all heads and the first S cache rows: the bf16 few-token matmul
// with the heads as its "tokens" (4 at a time) and cache rows as its weight rows. q holds bf16 values and the
// products are exact in fp32, so this equals float32 math up to summation order.
template <int M>
inline void scores_rows(const uint16_t* q, const uint16_t* kv, int64_t W, int64_t s0, int64_t s1, int64_t S,
                        float scale, float* scores) {
  float out[M * ROWS];
  for (int64_t s = s0; s < s1; s += ROWS) {
    const int rows = static_cast<int>(std::min<int64_t>(ROWS, s1 - s));
    rows_bf16<M>(q, kv + s * W, W, rows, out);
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < rows; ++r) scores[m * S + s + r] = out[m * ROWS + r] * scale;
  }
}

inline void attention_scores(const at::BFloat16* q, const at::BFloat16* kv, int64_t H, int64_t S, int64_t W,
                             float scale, float* scores) {
  auto qp = reinterpret_cast<const uint16_t*>(q);
  auto kp = reinterpret_cast<const uint16_t*>(kv);
  at::parallel_for(0, S, 32, [&](int64_t s0, int64_t s1) {
    for (int64_t h = 0; h < H; h += 4) {
      switch (std::min<int64_t>(4, H - h)) {
        case 4: scores_rows<4>(qp + h * W, kp, W, s0, s1, S, scale, scores + h * S); break;
        case 3: scores_rows<3>(qp + h * W, kp, W, s0, s1, S, scale, scores + h * S); break;
        case 2: scores_rows<2>(qp + h * W, kp, W, s0, s1, S, scale, scores + h * S); break;
        default: scores_rows<1>(qp + h * W, kp, W, s0, s1, S, scale, scores + h * S);
      }
    }
  });
}

constexpr int64_t VALUE_HEADS = 8;  // heads per attention_values tile; its p has whole tiles of heads

// o[h, c] = sum_s p[h, s] * kv[s, c] for c < C (the latent part of each row), in fp32: tiles of 8 heads x 32
// columns (avx512; avx2: 8 columns) kept in registers (16 accumulators; avx2: 8) while the rows stream by, so each
// row's bf16 -> fp32 conversion serves 8 heads. p has rows for H rounded up to 8 heads (the extra ones zero).
// This is attention's one fp32 product, H x S x C multiply-adds per token, growing with the context.
inline void attention_values(const float* p, const at::BFloat16* kv, int64_t H, int64_t S, int64_t W, int64_t C,
                             float* o) {
#if defined(MOEMESH_AVX512)
  constexpr int64_t CB = 32;
#else
  constexpr int64_t CB = 8;
#endif
  constexpr int64_t HB = VALUE_HEADS;
  const int64_t h_tiles = (H + HB - 1) / HB, c_tiles = (C + CB - 1) / CB;
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(kv);
  at::parallel_for(0, h_tiles * c_tiles, 1, [=](int64_t begin, int64_t end) {  // by value: no reloads per row
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t h0 = (tile / c_tiles) * HB, c0 = (tile % c_tiles) * CB;
      const int64_t hb = std::min(HB, H - h0), cb = std::min(CB, C - c0);
#if defined(MOEMESH_AVX512)
      __m512 acc[HB][2];
      __mmask16 mask[2];
      for (int j = 0; j < 2; ++j) {
        const int64_t left = std::max<int64_t>(0, std::min<int64_t>(16, cb - 16 * j));
        mask[j] = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
        for (int m = 0; m < HB; ++m) acc[m][j] = _mm512_setzero_ps();
      }
      for (int64_t s = 0; s < S; ++s) {
        __m512 row[2];
        for (int j = 0; j < 2; ++j)
          row[j] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
              _mm256_maskz_loadu_epi16(mask[j], bits + s * W + c0 + 16 * j)), 16));
        for (int m = 0; m < HB; ++m) {
          const __m512 pm = _mm512_set1_ps(p[(h0 + m) * S + s]);
          for (int j = 0; j < 2; ++j) acc[m][j] = _mm512_fmadd_ps(pm, row[j], acc[m][j]);
        }
      }
      for (int m = 0; m < HB; ++m)  // constant bounds, so the accumulators can live in registers
        for (int j = 0; j < 2; ++j)
          if (m < hb) _mm512_mask_storeu_ps(o + (h0 + m) * C + c0 + 16 * j, mask[j], acc[m][j]);
      continue;
#elif defined(MOEMESH_AVX2)
      if (cb == CB) {  // a tile of 8 whole columns; a narrower last tile takes the loop below
        __m256 acc[HB];
        for (int m = 0; m < HB; ++m) acc[m] = _mm256_setzero_ps();
        for (int64_t s = 0; s < S; ++s) {
          const __m256 row = bf16x8_to_f32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bits + s * W + c0)));
          for (int m = 0; m < HB; ++m) acc[m] = _mm256_fmadd_ps(_mm256_broadcast_ss(p + (h0 + m) * S + s), row, acc[m]);
        }
        for (int m = 0; m < HB; ++m)
          if (m < hb) _mm256_storeu_ps(o + (h0 + m) * C + c0, acc[m]);
        continue;
      }
#endif
      for (int64_t m = 0; m < hb; ++m)
        for (int64_t c = 0; c < cb; ++c) {
          float total = 0;
          for (int64_t s = 0; s < S; ++s) total += p[(h0 + m) * S + s] * bf16_to_float(bits[s * W + c0 + c]);
          o[(h0 + m) * C + c0 + c] = total;
        }
    }
  });
}

// In place, fp32: scores -> e^(s - max) / sum, one head's row. H x S exponentials per token, growing with the
// context: vectorized here, and split over heads by the caller.
inline void softmax(float* sc, int64_t S) {
#if defined(MOEMESH_AVX512) || defined(MOEMESH_AVX2)
  Vec16 top = set16(-INFINITY), total = zero16();
  for (int64_t i = 0; i < S; i += 16) top = max(top, load16(sc + i, S - i, -INFINITY));
  top = set16(max16(top));
  for (int64_t i = 0; i < S; i += 16) {
    const Vec16 e = exp16(load16(sc + i, S - i, -INFINITY) - top);  // e^-inf = 0 past S
    store16(sc + i, e, S - i);
    total = total + e;
  }
  const Vec16 sum = set16(sum16(total));
  for (int64_t i = 0; i < S; i += 16) store16(sc + i, load16(sc + i, S - i, 0.0f) / sum, S - i);
#else
  const float top = *std::max_element(sc, sc + S);
  float total = 0;
  for (int64_t s = 0; s < S; ++s) total += (sc[s] = std::exp(sc[s] - top));
  for (int64_t s = 0; s < S; ++s) sc[s] /= total;
#endif
}

// One request's n new tokens. Queries: token t's head h at q_nope + (t H + h) qn_row (nope values) and
// q_pe + (t H + h) qp_row (rope values, not yet rotated); rows [n, W]: normalized latent | key, not yet rotated;
// cos/sin [n, dr/2]. Writes cache rows start..start+n-1 and values [n, H, dv].
void attend(const at::BFloat16* q_nope, int64_t qn_row, const at::BFloat16* q_pe, int64_t qp_row, int64_t H,
            int64_t dn, int64_t dr, const at::BFloat16* rows, const float* cos, const float* sin, at::BFloat16* kv,
            int64_t W, int64_t start, int64_t n, const QLinear& w_uk, const QLinear& w_uv, double scale,
            bool interleave, at::BFloat16* values) {
  const int64_t C = W - dr, dv = w_uv.N / H;
  for (int64_t t = 0; t < n; ++t) {
    at::BFloat16* dst = kv + (start + t) * W;
    std::memcpy(dst, rows + t * W, C * sizeof(at::BFloat16));
    rope_bf16(rows + t * W + C, cos + t * (dr / 2), sin + t * (dr / 2), dr, interleave, dst + C);
  }

  // Queries in the latent space: q_lat[h, t, :] = W_UK[h] @ q_nope[t, h, :] (bf16, as the torch path rounds).
  std::vector<at::BFloat16> qn(H * n * dn), q_lat(H * n * C), o_lat(H * n * C);  // [H, n, *]; o_lat: attended latents
  for (int64_t h = 0; h < H; ++h)
    for (int64_t t = 0; t < n; ++t)
      std::memcpy(qn.data() + (h * n + t) * dn, q_nope + (t * H + h) * qn_row, dn * sizeof(at::BFloat16));
  linear_heads_into(w_uk, H, qn.data(), n, q_lat.data());

  std::vector<at::BFloat16> q(H * W);  // one token's queries: [latent query | roped query] per head
  std::vector<float> attended(H * C);
  for (int64_t t = 0; t < n; ++t) {
    const int64_t S = start + t + 1;  // causal: this token sees positions 0..start+t
    for (int64_t h = 0; h < H; ++h) {
      std::memcpy(q.data() + h * W, q_lat.data() + (h * n + t) * C, C * sizeof(at::BFloat16));
      rope_bf16(q_pe + (t * H + h) * qp_row, cos + t * (dr / 2), sin + t * (dr / 2), dr, interleave, q.data() + h * W + C);
    }
    std::vector<float> scores((H + VALUE_HEADS - 1) / VALUE_HEADS * VALUE_HEADS * S);  // zero past H heads
    attention_scores(q.data(), kv, H, S, W, static_cast<float>(scale), scores.data());
    at::parallel_for(0, H, 8, [&](int64_t h0, int64_t h1) {
      for (int64_t h = h0; h < h1; ++h) softmax(scores.data() + h * S, S);
    });
    attention_values(scores.data(), kv, H, S, W, C, attended.data());
    for (int64_t h = 0; h < H; ++h)
      for (int64_t c = 0; c < C; ++c) o_lat[(h * n + t) * C + c] = bf(attended[h * C + c]);
  }

  // Values: values[t, h, :] = W_UV[h] @ o_lat[h, t, :], written [H, n, dv] and laid out [n, H, dv].
  std::vector<at::BFloat16> by_head(H * n * dv);
  linear_heads_into(w_uv, H, o_lat.data(), n, by_head.data());
  for (int64_t t = 0; t < n; ++t)
    for (int64_t h = 0; h < H; ++h)
      std::memcpy(values + (t * H + h) * dv, by_head.data() + (h * n + t) * dv, dv * sizeof(at::BFloat16));
}

void check_cache(const torch::Tensor& cache, int64_t W, int64_t start, int64_t n) {
  check_bf16(cache, "MlaLayer cache");
  TORCH_CHECK(cache.dim() == 2 && cache.size(1) == W, "MlaLayer: cache rows of ", W, " values");
  TORCH_CHECK(start >= 0 && start + n <= cache.size(0), "MlaLayer: cache too small");
}

}  // namespace

MlaLayer::MlaLayer(std::vector<QArgs> q, torch::Tensor q_a_norm, QArgs kv_a, torch::Tensor kv_a_norm, QArgs w_uk,
                   QArgs w_uv, QArgs o_proj, int64_t heads, int64_t rope, double eps, double scale, bool interleave)
    : kv_a_(qlinear(kv_a, "MlaLayer kv_a")), w_uk_(qlinear(w_uk, "MlaLayer w_uk")), w_uv_(qlinear(w_uv, "MlaLayer w_uv")),
      o_(qlinear(o_proj, "MlaLayer o_proj")), kv_a_norm_(kv_a_norm.contiguous()), H_(heads), dr_(rope), eps_(eps),
      scale_(scale), interleave_(interleave) {
  TORCH_CHECK(q.size() == 1 || q.size() == 2, "MlaLayer: q is [q_proj] or [q_a_proj, q_b_proj]");
  for (const QArgs& a : q) q_.push_back(qlinear(a, "MlaLayer q"));
  if (q.size() == 2) q_a_norm_ = q_a_norm.contiguous();
  check_bf16(kv_a_norm_, "MlaLayer kv_a_norm");
  const int64_t C = kv_a_.N - dr_, D = kv_a_.K;
  dn_ = q_.back().N / H_ - dr_;
  TORCH_CHECK(q_.back().N == H_ * (dn_ + dr_) && q_.front().K == D && kv_a_norm_.numel() == C && w_uk_.N == H_ * C &&
              w_uk_.K == dn_ && w_uv_.K == C && w_uv_.N % H_ == 0 && o_.K == w_uv_.N && o_.N == D,
              "MlaLayer: weight shapes do not make MLA attention");
  TORCH_CHECK(q.size() == 1 || (q_[1].K == q_[0].N && q_a_norm_.numel() == q_[0].N), "MlaLayer: q_b / q_a_norm shape");
  for (const QArgs& a : q) keep(a);
  for (const QArgs* a : {&kv_a, &w_uk, &w_uv, &o_proj}) keep(*a);
}

void MlaLayer::keep(const QArgs& a) {
  for (const torch::Tensor& t : {std::get<0>(a), std::get<1>(a), std::get<2>(a)}) tensors_.push_back(t);
}

torch::Tensor MlaLayer::forward(torch::Tensor x, std::vector<std::tuple<torch::Tensor, int64_t, int64_t>> segments,
                                torch::Tensor cos, torch::Tensor sin) const {
  x = x.contiguous();
  cos = cos.contiguous();
  sin = sin.contiguous();
  check_bf16(x, "MlaLayer x");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat, "MlaLayer: cos/sin fp32");
  const int64_t n = x.size(0), D = kv_a_.K, W = kv_a_.N, C = W - dr_, qk = dn_ + dr_, dv = w_uv_.N / H_;
  TORCH_CHECK(x.dim() == 2 && x.size(1) == D && cos.size(0) == n && cos.size(1) == dr_ / 2, "MlaLayer: x ", x.sizes());
  const at::BFloat16* xp = x.data_ptr<at::BFloat16>();
  // The projections, bf16 between each as the reference rounds: q (through q_a and its norm where it has one),
  // and the cache rows' inputs, [normalized latent | key].
  std::vector<at::BFloat16> q(n * H_ * qk), rows(n * W), values(n * H_ * dv);
  std::vector<at::BFloat16> q_a(q_.size() == 2 ? n * q_[0].N : 0);
  linear_q_pair_into(q_[0], kv_a_, xp, n, q_.size() == 2 ? q_a.data() : q.data(), rows.data());
  if (q_.size() == 2) {
    rms_norm_rows(q_a.data(), q_a_norm_.data_ptr<at::BFloat16>(), n, q_[0].N, eps_, q_a.data());
    linear_q_into(q_[1], q_a.data(), n, q.data());
  }
  for (int64_t t = 0; t < n; ++t)  // the latent normalized in place: rows of W, the first C of them
    rms_norm_rows(rows.data() + t * W, kv_a_norm_.data_ptr<at::BFloat16>(), 1, C, eps_, rows.data() + t * W);
  int64_t offset = 0;
  for (const auto& [cache, start, length] : segments) {
    TORCH_CHECK(length > 0 && offset + length <= n, "MlaLayer: segments cover more than the step's tokens");
    check_cache(cache, W, start, length);
    attend(q.data() + offset * H_ * qk, qk, q.data() + offset * H_ * qk + dn_, qk, H_, dn_, dr_, rows.data() + offset * W,
           cos.data_ptr<float>() + offset * (dr_ / 2), sin.data_ptr<float>() + offset * (dr_ / 2),
           cache.data_ptr<at::BFloat16>(), W, start, length, w_uk_, w_uv_, scale_, interleave_,
           values.data() + offset * H_ * dv);
    offset += length;
  }
  TORCH_CHECK(offset == n, "MlaLayer: segments cover ", offset, " of the step's ", n, " tokens");
  auto out = torch::empty({n, D}, x.options());
  linear_q_into(o_, values.data(), n, out.data_ptr<at::BFloat16>());
  return out;
}

}  // namespace moemesh
