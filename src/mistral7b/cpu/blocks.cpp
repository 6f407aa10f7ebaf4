// A decode step's transformer blocks in one call: the same ops, in the same order, as Transformer._forward_cpu
// runs for decode rows on the paged cache (add + RMSNorm, the fused q/k/v projection, RoPE + k/v store,
// decode attention, the output projection, add + RMSNorm, the fused gate/up projection, SwiGLU's product, the
// down projection), so the results are the same bits; what goes is ~30 Python-level calls a layer (views,
// slices, module dispatch), ~1.3 ms of a 6.4 ms token of a 30-layer model on a 2-core machine.
//
// DecodeStack is built once per model from its weights: for each projection a kind (0: float weight, 1: int4
// in quant.cpp's layout, 2: int8 blocks of 32) and its tensors.
#include "ops.h"

#include <ATen/ops/linear.h>
#include <ATen/ops/mul.h>

#include <cmath>

#include <utility>
#include <vector>

namespace mistral7b {

namespace {

struct Projection {
  int64_t kind = 0;
  at::Tensor a, b, c;  // float weight | (qweight, scales, mins) | (weight, scales)
  int64_t dense_rows = 0;

  at::Tensor operator()(const at::Tensor& x) const {  // as Int4Linear / Int8Linear / nn.Linear compute it
    if (kind == 0) return at::linear(x, a);
    if (x.size(0) < dense_rows) return kind == 1 ? int4_linear(x, a, b, c) : int8_linear(x, a, b);
    const int64_t N = a.size(0), K = a.size(1);
    at::Tensor w = kind == 1 ? int4_dequantize(a, b, c, x.scalar_type())
                             : at::mul(a.to(at::kFloat).view({N, K / 32, 32}), b.to(at::kFloat).unsqueeze(-1))
                                   .view({N, K}).to(x.scalar_type());
    return at::linear(x, w);
  }
};

struct Block {
  at::Tensor attention_norm, ffn_norm;
  Projection wqkv, wo, w13, w2;
};

Projection projection(int64_t kind, const std::vector<at::Tensor>& t, size_t& at,
                      const std::vector<int64_t>& dense_rows) {
  static const int counts[] = {1, 3, 2};
  TORCH_CHECK(kind >= 0 && kind <= 2, "projection kind must be 0 (float), 1 (int4) or 2 (int8)");
  TORCH_CHECK(at + counts[kind] <= t.size(), "a block's tensors end early");
  Projection p;
  p.kind = kind;
  p.dense_rows = kind >= 1 ? dense_rows[kind - 1] : 0;
  p.a = t[at];
  if (kind >= 1) p.b = t[at + 1];
  if (kind == 1) p.c = t[at + 2];
  at += counts[kind];
  return p;
}

}  // namespace

struct DecodeStack::Impl {
  std::vector<Block> blocks;
  int64_t n_heads, n_kv_heads, head_dim;
  double eps;
};

DecodeStack::DecodeStack(const std::vector<std::vector<at::Tensor>>& tensors,
                         const std::vector<std::vector<int64_t>>& kinds, int64_t n_heads, int64_t n_kv_heads,
                         int64_t head_dim, double eps, std::vector<int64_t> dense_rows) {
  TORCH_CHECK(tensors.size() == kinds.size(), "one list of tensors and of kinds a layer");
  TORCH_CHECK(dense_rows.size() == 2, "dense_rows: [int4, int8]");
  auto impl = std::make_shared<Impl>();
  impl->n_heads = n_heads, impl->n_kv_heads = n_kv_heads, impl->head_dim = head_dim, impl->eps = eps;
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK(kinds[i].size() == 4 && tensors[i].size() >= 2, "layer ", i, ": 2 norms and 4 projections");
    Block b;
    b.attention_norm = tensors[i][0];
    b.ffn_norm = tensors[i][1];
    size_t at = 2;
    b.wqkv = projection(kinds[i][0], tensors[i], at, dense_rows);
    b.wo = projection(kinds[i][1], tensors[i], at, dense_rows);
    b.w13 = projection(kinds[i][2], tensors[i], at, dense_rows);
    b.w2 = projection(kinds[i][3], tensors[i], at, dense_rows);
    TORCH_CHECK(at == tensors[i].size(), "layer ", i, ": more tensors than its projections take");
    impl->blocks.push_back(std::move(b));
  }
  impl_ = std::move(impl);
}

// h [N, dim]: the embeddings of N decode rows; freqs [N, D / 2, 2]; slots [N]; block_tables, first_blocks,
// seq_lens as decode_attention takes them. Returns (residual, delta): the last block's residual stream and
// its down projection, for the final add + norm.
std::tuple<at::Tensor, at::Tensor> DecodeStack::forward(const at::Tensor& h, const std::vector<at::Tensor>& k_caches,
                                                        const std::vector<at::Tensor>& v_caches,
                                                        const at::Tensor& freqs, const at::Tensor& slots,
                                                        const at::Tensor& block_tables, const at::Tensor& first_blocks,
                                                        const at::Tensor& seq_lens, int64_t window) const {
  const Impl& m = *impl_;
  TORCH_CHECK(k_caches.size() == m.blocks.size() && v_caches.size() == m.blocks.size(), "one cache a layer");
  TORCH_CHECK(h.dim() == 2 && h.is_contiguous(), "h: contiguous [N, dim]");
  const int64_t N = h.size(0), H = m.n_heads, H_kv = m.n_kv_heads, D = m.head_dim;
  const double scale = std::pow(static_cast<double>(D), -0.5);  // D**-0.5, as cache/paged.py passes it
  at::Tensor residual = h;
  c10::optional<at::Tensor> delta;
  for (size_t i = 0; i < m.blocks.size(); ++i) {
    const Block& b = m.blocks[i];
    auto [res, x] = add_rms_norm(residual, delta, b.attention_norm, m.eps);
    const at::Tensor qkv = b.wqkv(x).view({N, H + 2 * H_kv, D});
    at::Tensor k_cache = k_caches[i], v_cache = v_caches[i];
    const at::Tensor q = rotate_store(qkv, freqs, k_cache, v_cache, slots, H);
    const at::Tensor attn = decode_attention(q, k_cache, v_cache, block_tables, first_blocks, seq_lens, window, scale);
    auto [res2, x2] = add_rms_norm(res, b.wo(attn.view({N, H * D})).contiguous(), b.ffn_norm, m.eps);
    residual = res2;
    delta = b.w2(silu_mul(b.w13(x2).contiguous())).contiguous();
  }
  TORCH_CHECK(delta.has_value(), "a model with no layers");
  return {residual, *delta};
}

}  // namespace mistral7b
