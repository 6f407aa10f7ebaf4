// Declarations shared by the extension's sources (mistral7b/cpu/*.cpp), built once per CPU capability
// (build.py): CPU_CAPABILITY_AVX512, CPU_CAPABILITY_AVX2 or CPU_CAPABILITY_DEFAULT, with that capability's
// compiler flags, so ATen's vector headers (at::vec) give the code libtorch runs for the same capability.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Optional.h>

#include <memory>
#include <tuple>
#include <vector>

namespace mistral7b {

using bf16 = c10::BFloat16;

// attention.cpp
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_tables, const at::Tensor& first_blocks,
                            const at::Tensor& seq_lens, int64_t window, double scale);
bool decode_attention_exact_bf16();  // whether bf16 pools take oneDNN's summation order (AVX-512 builds)

// fused.cpp
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const c10::optional<at::Tensor>& delta,
                                                const at::Tensor& weight, double eps);
at::Tensor rotate_store(const at::Tensor& qkv, const at::Tensor& freqs, at::Tensor& k_cache, at::Tensor& v_cache,
                        const at::Tensor& slots, int64_t n_heads);
at::Tensor silu_mul(const at::Tensor& gate_up);
at::Tensor argmax_rows(const at::Tensor& logits);

// quant.cpp
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                       const at::Tensor& mins);
at::Tensor int4_dequantize(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& mins,
                           at::ScalarType dtype);
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales);

// sample.cpp: per row, the largest value t with sum(probs[probs >= t]) >= top_p (probs >= t: the nucleus)
at::Tensor masked_logits(const at::Tensor& x, const at::Tensor& mask);  // x where the packed bitmask allows, else -inf
at::Tensor top_p_threshold(const at::Tensor& probs, const at::Tensor& top_p);
// a draw per row among the values >= limit[row], each with probability value / their sum (u[row] in [0, 1));
// -1 for a row that keeps no positive value
at::Tensor draw_above(const at::Tensor& probs, const at::Tensor& limit, const at::Tensor& u);
// the repetition, presence and frequency penalties of rows x from their slots' counts and prompt marks
at::Tensor penalize(const at::Tensor& x, const at::Tensor& counts, const at::Tensor& seen, const at::Tensor& slots,
                    const at::Tensor& repetition, const at::Tensor& presence, const at::Tensor& frequency);

// blocks.cpp: a decode step's transformer blocks in one call, built once per model
class DecodeStack {
 public:
  // per layer: tensors [attention_norm, ffn_norm, then each projection's], kinds [wqkv, wo, w13, w2] (0: float
  // weight; 1: int4 qweight, scales, mins; 2: int8 weight, scales); from `dense_rows` rows on, quantized
  // projections dequantize and run a dense matmul (model/quantize.py's thresholds: [int4, int8])
  DecodeStack(const std::vector<std::vector<at::Tensor>>& tensors, const std::vector<std::vector<int64_t>>& kinds,
              int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, double eps, std::vector<int64_t> dense_rows);
  std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& h, const std::vector<at::Tensor>& k_caches,
                                             const std::vector<at::Tensor>& v_caches, const at::Tensor& freqs,
                                             const at::Tensor& slots, const at::Tensor& block_tables,
                                             const at::Tensor& first_blocks, const at::Tensor& seq_lens,
                                             int64_t window) const;

 private:
  struct Impl;
  std::shared_ptr<const Impl> impl_;
};

}  // namespace mistral7b
