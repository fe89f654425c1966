// SwiGLU MLPs and MoE layers for a few bf16 tokens, weights in any of quant.h's formats (formats may mix).
// Every expert of a step (routed and shared) shares two parallel passes — all gate and up rows, then all
// down rows — rather than two each: decode touches a few small experts per layer, and each parallel
// region has a fixed cost of its own.
#include "moe.h"

#include <memory>

namespace moemesh {
namespace {

// Rows per work item: long runs of consecutive rows keep the prefetchers ahead, which short items (64 rows)
// interrupt, and a layer of 9 experts still makes dozens of items for the threads to share.
constexpr int64_t MOE_GRAIN = 256;

struct Expert {
  QLinear gate, up, down;
  std::vector<std::pair<int64_t, float>> rows;  // (token, weight): the tokens routed here
  const at::BFloat16* x = nullptr;              // its tokens' inputs [tokens, D]
  at::BFloat16 *g = nullptr, *u = nullptr, *y = nullptr;  // gate/up outputs [tokens, I], expert outputs [tokens, D]
  std::shared_ptr<const Acts> xg, xu;           // its inputs arranged for gate and up (shared, see `run`)
  Acts xd;
};

void check_mlp(const Expert& e, int64_t D) {
  TORCH_CHECK(e.gate.K == D && e.up.K == D && e.up.N == e.gate.N && e.down.N == D && e.down.K == e.gate.N,
              "mlp: weight shapes do not make a SwiGLU MLP of hidden size ", D);
}

// dst = bf16(dst + bf16(y * weight)): one expert's term, with the reference's rounding points.
void add_weighted(at::BFloat16* dst, const at::BFloat16* y, float weight, int64_t D) {
  int64_t i = 0;
#if defined(MOEMESH_AVX512) || defined(MOEMESH_AVX2)
  const Vec16 w = set16(weight);
  for (; i + 16 <= D; i += 16) store_bf16x16(dst + i, load_bf16x16(dst + i) + round_bf16x16(load_bf16x16(y + i) * w));
#endif
  for (; i < D; ++i)
    dst[i] = at::BFloat16(static_cast<float>(dst[i]) + static_cast<float>(at::BFloat16(static_cast<float>(y[i]) * weight)));
}

// An expert's inputs arranged for weight w: experts that see the same tokens and whose weights share a
// layout share one arrangement (in a decode step of one token, every expert of the layer).
struct Arrangement {
  int64_t kind, K, group;
  bool lanes;
  std::vector<int64_t> tokens;
  std::shared_ptr<const Acts> acts;
};

std::shared_ptr<const Acts> arranged(const QLinear& w, const Expert& e, std::vector<Arrangement>& known) {
  std::vector<int64_t> tokens;
  for (const auto& row : e.rows) tokens.push_back(row.first);
  for (const Arrangement& a : known)
    if (a.kind == w.kind && a.K == w.K && a.group == w.group && a.lanes == w.lanes && a.tokens == tokens) return a.acts;
  auto acts = std::make_shared<const Acts>(prepare(w, e.x, static_cast<int64_t>(tokens.size())));
  known.push_back({w.kind, w.K, w.group, w.lanes, std::move(tokens), acts});
  return acts;
}

// out[t] = sum over the experts holding t, in order, of bf16(mlp_e(x[t]) * weight), each addition rounded.
torch::Tensor run(const torch::Tensor& x, std::vector<Expert>& experts) {
  const int64_t D = x.size(1), n = x.size(0);
  std::vector<Arrangement> arrangements;
  const at::BFloat16* xp = x.data_ptr<at::BFloat16>();
  // Gathered inputs and the outputs of every expert, in scratch kept between calls rather than fresh zeroed
  // buffers per expert. An expert that sees every token in order (a one-token step's) reads x where it is.
  thread_local std::vector<at::BFloat16> scratch;
  auto in_order = [n](const Expert& e) {
    if (static_cast<int64_t>(e.rows.size()) != n) return false;
    for (int64_t t = 0; t < n; ++t)
      if (e.rows[t].first != t) return false;
    return true;
  };
  size_t need = 0;
  for (Expert& e : experts) {
    check_mlp(e, D);
    const int64_t m = static_cast<int64_t>(e.rows.size());
    need += (in_order(e) ? 0 : m * D) + 2 * m * e.gate.N + m * D;
  }
  if (scratch.size() < need) scratch.resize(need);
  at::BFloat16* unused = scratch.data();
  auto take = [&unused](int64_t count) { at::BFloat16* p = unused; unused += count; return p; };
  struct Item { size_t expert; int64_t row; };  // MOE_GRAIN rows of gate and up, or of down
  std::vector<Item> up_items, down_items;
  for (size_t i = 0; i < experts.size(); ++i) {
    Expert& e = experts[i];
    const int64_t m = static_cast<int64_t>(e.rows.size()), I = e.gate.N;
    if (in_order(e)) {
      e.x = xp;
    } else {
      at::BFloat16* gathered = take(m * D);
      for (int64_t r = 0; r < m; ++r) std::memcpy(gathered + r * D, xp + e.rows[r].first * D, D * sizeof(at::BFloat16));
      e.x = gathered;
    }
    e.g = take(m * I);
    e.u = take(m * I);
    e.y = take(m * D);
    e.xg = arranged(e.gate, e, arrangements);
    e.xu = arranged(e.up, e, arrangements);
    for (int64_t row = 0; row < I; row += MOE_GRAIN) up_items.push_back({i, row});
    for (int64_t row = 0; row < D; row += MOE_GRAIN) down_items.push_back({i, row});
  }
  // Gate and up rows, then their SwiGLU; whichever thread finishes an expert's last item arranges its down inputs.
  std::vector<std::atomic<int64_t>> pending(experts.size());
  for (size_t i = 0; i < experts.size(); ++i) pending[i] = (experts[i].gate.N + MOE_GRAIN - 1) / MOE_GRAIN;
  for_each_item(static_cast<int64_t>(up_items.size()), [&](int64_t i) {
    Expert& e = experts[up_items[i].expert];
    const int64_t I = e.gate.N, begin = up_items[i].row, end = std::min(I, begin + MOE_GRAIN);
    linear_rows_q(e.gate, *e.xg, e.g, begin, end);
    linear_rows_q(e.up, *e.xu, e.u, begin, end);
    for (size_t t = 0; t < e.rows.size(); ++t) swiglu_bf16(e.g + t * I + begin, e.u + t * I + begin, end - begin);
    if (--pending[up_items[i].expert] == 0) e.xd = prepare(e.down, e.g, static_cast<int64_t>(e.rows.size()));
  });
  for_each_item(static_cast<int64_t>(down_items.size()), [&](int64_t i) {
    Expert& e = experts[down_items[i].expert];
    linear_rows_q(e.down, e.xd, e.y, down_items[i].row, std::min(D, down_items[i].row + MOE_GRAIN));
  });
  auto out = torch::zeros_like(x);
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  for (const Expert& e : experts)
    for (size_t r = 0; r < e.rows.size(); ++r) add_weighted(op + e.rows[r].first * D, e.y + r * D, e.rows[r].second, D);
  return out;
}

Expert expert(const QArgs& gate, const QArgs& up, const QArgs& down, const char* what) {
  return Expert{qlinear(gate, what), qlinear(up, what), qlinear(down, what)};
}

}  // namespace

// down(silu(gate(x)) * up(x)) with the reference's bf16 rounding points (gate and up outputs, silu, product).
torch::Tensor mlp_q(torch::Tensor x, QArgs gate, QArgs up, QArgs down) {
  x = x.contiguous();
  check_bf16(x, "mlp_q x");
  std::vector<Expert> experts{expert(gate, up, down, "mlp_q")};
  for (int64_t t = 0; t < x.size(0); ++t) experts[0].rows.emplace_back(t, 1.0f);  // bf16(y * 1) + 0 is y
  return run(x, experts);
}

MoeLayer::MoeLayer(std::vector<int64_t> ids, std::vector<QArgs> gates, std::vector<QArgs> ups, std::vector<QArgs> downs,
                   std::vector<QArgs> shared) {
  TORCH_CHECK(gates.size() == ids.size() && ups.size() == ids.size() && downs.size() == ids.size(),
              "MoeLayer: one gate, up and down per expert id");
  TORCH_CHECK(shared.empty() || shared.size() == 3, "MoeLayer: shared is (gate, up, down) or nothing");
  std::vector<size_t> order(ids.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return ids[a] < ids[b]; });
  for (size_t i : order) {
    TORCH_CHECK(ids[i] >= 0 && (ids_.empty() || ids[i] > ids_.back()), "MoeLayer: expert ids must be distinct and >= 0");
    ids_.push_back(ids[i]);
    experts_.push_back({qlinear(gates[i], "MoeLayer"), qlinear(ups[i], "MoeLayer"), qlinear(downs[i], "MoeLayer")});
    for (const QArgs* a : {&gates[i], &ups[i], &downs[i]}) keep(*a);
  }
  slot_.assign(ids_.empty() ? 0 : ids_.back() + 1, -1);
  for (size_t i = 0; i < ids_.size(); ++i) slot_[ids_[i]] = static_cast<int64_t>(i);
  if (!shared.empty()) {
    shared_ = {qlinear(shared[0], "MoeLayer shared"), qlinear(shared[1], "MoeLayer shared"), qlinear(shared[2], "MoeLayer shared")};
    for (const QArgs& a : shared) keep(a);
  }
}

void MoeLayer::keep(const QArgs& a) {
  for (const torch::Tensor& t : {std::get<0>(a), std::get<1>(a), std::get<2>(a)}) tensors_.push_back(t);
}

torch::Tensor MoeLayer::forward(torch::Tensor x, torch::Tensor ids, torch::Tensor weights, bool with_shared) const {
  x = x.contiguous();
  ids = ids.contiguous();
  weights = weights.contiguous();
  check_bf16(x, "MoeLayer x");
  TORCH_CHECK(ids.scalar_type() == at::kLong && weights.scalar_type() == at::kFloat && ids.dim() == 2 &&
              ids.sizes() == weights.sizes() && ids.size(0) == x.size(0), "MoeLayer: ids int64 and weights fp32, [tokens, k]");
  TORCH_CHECK(!with_shared || shared_, "MoeLayer: this layer holds no shared expert");
  const int64_t n = x.size(0), k = ids.size(1);
  const int64_t* ip = ids.data_ptr<int64_t>();
  const float* wp = weights.data_ptr<float>();
  std::vector<std::vector<std::pair<int64_t, float>>> rows(ids_.size());
  for (int64_t t = 0; t < n; ++t)
    for (int64_t j = 0; j < k; ++j) {
      const int64_t id = ip[t * k + j];
      TORCH_CHECK(id >= 0 && id < static_cast<int64_t>(slot_.size()) && slot_[id] >= 0, "MoeLayer: expert ", id, " is not held here");
      rows[slot_[id]].emplace_back(t, wp[t * k + j]);
    }
  std::vector<Expert> experts;
  for (size_t i = 0; i < ids_.size(); ++i)
    if (!rows[i].empty()) experts.push_back(Expert{experts_[i][0], experts_[i][1], experts_[i][2], std::move(rows[i])});
  if (with_shared) {
    experts.push_back(Expert{(*shared_)[0], (*shared_)[1], (*shared_)[2]});
    for (int64_t t = 0; t < n; ++t) experts.back().rows.emplace_back(t, 1.0f);
  }
  return run(x, experts);
}

}  // namespace moemesh
