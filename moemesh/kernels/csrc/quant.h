// Weights in any of the kernels' formats (bf16, FP8 blocks, MLX affine int4/int8) and the few-token matmul
// over them (quant.cpp); moe.cpp builds the MLP and MoE layers on it. The formats, byte by byte: docs/formats.md.
#pragma once
#include "common.h"

#include <numeric>

namespace moemesh {

// As Python passes it; the _LANES kinds are INT4/INT8 in the lane-major layout (QLinear::lanes, below). The
// values come from moemesh/spec/formats.py's `Kind`, given as -D flags by the build (cpu_ext.py); see
// docs/formats.md, "Kernel kind codes".
enum Kind : int64_t {
  KIND_BF16 = MOEMESH_KIND_BF16,
  KIND_FP8 = MOEMESH_KIND_FP8,
  KIND_INT4 = MOEMESH_KIND_INT4,
  KIND_INT8 = MOEMESH_KIND_INT8,
  KIND_INT4_LANES = MOEMESH_KIND_INT4_LANES,
  KIND_INT8_LANES = MOEMESH_KIND_INT8_LANES,
};
// qlinear takes INT4..INT8_LANES as one range and maps a _LANES kind back by one offset.
static_assert(KIND_INT4 < KIND_INT8 && KIND_INT8 < KIND_INT4_LANES && KIND_INT4_LANES < KIND_INT8_LANES &&
              KIND_INT4_LANES - KIND_INT4 == KIND_INT8_LANES - KIND_INT8, "kind codes out of the order qlinear reads");
constexpr int64_t FP8_BLOCK = MOEMESH_FP8_BLOCK;  // square blocks (spec/formats.py)
constexpr int64_t CHUNK_BYTES = 64;  // weight bytes per inner step (one zmm, two ymm): 128 int4, 64 int8 or 64 fp8 values

// A linear weight as Python passes it: (weight, scales, biases, kind, group_size); see ../quant_ops.py.
using QArgs = std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, int64_t, int64_t>;

struct QLinear {
  int64_t kind, N, K, group;
  const uint8_t* w;                 // rows of K bf16 / K fp8 bytes / K/2 int4 bytes / K int8 bytes
  const float* block_scales;        // fp8: [ceil(N/128), ceil(K/128)]
  int64_t block_cols;
  const at::BFloat16* scales;       // affine: [N, K/group]
  const at::BFloat16* biases;
  bool lanes = false;               // affine in the lane-major layout (see lanes_offset)

  int64_t row_bytes() const { return kind == KIND_INT4 ? K / 2 : (kind == KIND_BF16 ? 2 * K : K); }
  int64_t groups() const { return K / group; }
  // Elements per chunk; activations are laid out per chunk (see `prepare`).
  int64_t chunk() const { return kind == KIND_INT4 ? 128 : 64; }
  int64_t chunks() const { return (K + chunk() - 1) / chunk(); }
  int64_t group_bytes() const { return group * (kind == KIND_INT4 ? 4 : 8) / 8; }
  int64_t span_bytes() const { return 16 * group_bytes(); }  // 16 groups: one fp32 vector of scales
  int64_t span_chunks() const { return span_bytes() / CHUNK_BYTES; }
  // Lane-major: the spans' distinct arrangements of x. Lane l of span s multiplies the row's group (16 s + l) % G,
  // which repeats every lcm(G, 16) / 16 spans.
  int64_t patterns() const { return groups() / std::gcd<int64_t>(groups(), 16); }
};

// The lane-major layout of an affine weight (specified in docs/formats.md, "Lane-major layout"; made by
// kernels/affine.py `to_lanes`): its groups, row after row, in spans of 16, each span's 32-bit words transposed
// from [16 groups][group_bytes / 4] to [group_bytes / 4][16]. Word l of every 64-byte chunk of a span (fp32 lane
// l, u16 lanes 2l and 2l + 1) then holds bytes of the span's group l only, so the decode kernel accumulates a
// span's products per lane and applies its 16 scales once, at the span's end, instead of permuting them per
// chunk. Spans may cross rows: rows * groups must be a multiple of 16. Byte b of the weight (MLX order, rows
// back to back) sits at:
inline int64_t lanes_offset(int64_t b, int64_t group_bytes) {
  const int64_t span = b / (16 * group_bytes), in_span = b % (16 * group_bytes);
  const int64_t group = in_span / group_bytes, word = in_span % group_bytes / 4;
  return span * 16 * group_bytes + 4 * (16 * word + group) + b % 4;
}

// The few tokens' activations, arranged for one weight format and level.
// avx512: a chunk of weights is one 64-byte load, seen as 32 u16 lanes; lane j holds int4 values 4j..4j+3 (a
// nibble each) or int8 values 2j, 2j+1; fp8 bytes are unpacked in the order fp8_to_bf16 gives. The kernels turn each
// nibble (int) or byte half (fp8) position t into one bf16 vector, so the activations come as one stream per
// position: stream t, lane j = the x that multiplies it. FP8 streams run along K (zero past it: the masked-off
// weights add nothing); lane-major streams hold one span's worth of chunks per pattern (QLinear::patterns).
// avx2: one run per token in the order the weights unpack into (quant_avx2.h): fp32 for FP8, 16-bit integers for
// lane-major weights, scaled by powers of two that `steps` undoes.
struct Acts {
  int64_t M = 0, width = 0;         // width: avx512, one stream of one token, 32 lanes per chunk; avx2: one token
  const at::BFloat16* raw = nullptr;  // [M, K] as given (scalar paths)
  std::vector<uint16_t> x;          // avx512: bf16 [M, streams, width]
  std::vector<float> xf;            // avx2, FP8: fp32 [M, width]
  std::vector<int16_t> xq;          // avx2, lane-major: [M, width]
  std::vector<float> steps;         // avx2: FP8 [M] each token's, lane-major [M, patterns, 16] each lane's group's
  std::vector<float> sums;          // lane-major: [M, patterns, 16] sum of x over the group each lane multiplies
  int streams = 0;
  const uint16_t* stream(int64_t m, int t) const { return x.data() + (m * streams + t) * width; }
  const float* token(int64_t m) const { return xf.data() + m * width; }
  const int16_t* token_q(int64_t m) const { return xq.data() + m * width; }
};

QLinear qlinear(const QArgs& args, const char* what);
// Rows [begin, begin + count) of w as a weight of their own (FP8: begin on a 128-row block boundary; lane-major:
// on a span boundary).
QLinear row_slice(const QLinear& w, int64_t begin, int64_t count);
Acts prepare(const QLinear& w, const at::BFloat16* x, int64_t M);
// y[m, r] for every token and output rows [row_begin, row_end); lane-major weights: both on span boundaries
// (or row_end = N), as row items of 16 rows always are.
void linear_rows_q(const QLinear& w, const Acts& xs, at::BFloat16* y, int64_t row_begin, int64_t row_end);
void linear_q_into(const QLinear& w, const at::BFloat16* x, int64_t M, at::BFloat16* y);
// Two weights over the same x in one parallel pass (their activations arranged once where their formats agree).
void linear_q_pair_into(const QLinear& a, const QLinear& b, const at::BFloat16* x, int64_t M, at::BFloat16* ya,
                        at::BFloat16* yb);
// Per head h < H: y[h] [n, N] = x[h] [n, K] @ (rows h*N.. of w)^T, where w stacks the H heads' [N, K] weights.
void linear_heads_into(const QLinear& w, int64_t H, const at::BFloat16* x, int64_t n, at::BFloat16* y);

}  // namespace moemesh
