// Fused CPU ops of a decode step, each with the bits of the ATen ops it replaces (model/transformer.py,
// cache/paged.py), for float32 and bfloat16 rows on every build: one call where ATen dispatches ~13 (residual
// add + F.rms_norm), ~20 (apply_rotary + the cache store) and 4 (chunk, silu, mul) small ops; a 135M model's
// decode step has 61 norms, 30 rotations and 30 SwiGLU products. bf16 rounds where ATen's bf16 ops round;
// float32 does not round at all beyond float32 arithmetic.

#include "ops.h"
#include "threads.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace mistral7b {
namespace {

template <typename T>
inline float f32(T v) { return static_cast<float>(v); }

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK((t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16) && t.is_contiguous(),
              name, ": contiguous float32 or bfloat16");
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> add_rms_norm_t(const at::Tensor& x, const c10::optional<at::Tensor>& delta,
                                                  const at::Tensor& weight, double eps) {
  const int64_t D = x.size(-1), rows = D ? x.numel() / D : 0;
  at::Tensor h = x;
  if (delta.has_value()) {
    h = at::empty_like(x);
    const T *a = x.data_ptr<T>(), *b = delta->data_ptr<T>();
    T* o = h.data_ptr<T>();
    for (int64_t i = 0; i < rows * D; ++i) o[i] = static_cast<T>(f32(a[i]) + f32(b[i]));
  }
  auto squares = at::empty({rows, D}, x.options().dtype(at::kFloat));
  const T* hp = h.data_ptr<T>();
  float* sq = squares.data_ptr<float>();
  for (int64_t i = 0; i < rows * D; ++i) {
    float v = f32(hp[i]);
    sq[i] = v * v;
  }
  const auto sums = at::sum(squares, {-1});
  const float* ss = sums.data_ptr<float>();
  const T* w = weight.data_ptr<T>();
  auto out = at::empty_like(x);
  T* o = out.data_ptr<T>();
  for (int64_t r = 0; r < rows; ++r) {
    float mean = ss[r] / static_cast<float>(D);
    float scale = 1.0f / std::sqrt(mean + static_cast<float>(eps));
    for (int64_t d = 0; d < D; ++d) o[r * D + d] = static_cast<T>(f32(hp[r * D + d]) * scale * f32(w[d]));
  }
  return {h, out};
}

// One head's pairs (a, b) times the complex (c, d) of its position, as ATen multiplies complex64 numbers:
// (ac - bd, ad + bc), every product and sum rounded to float32 (no fused multiply-add). In intrinsics where
// the build has them: written as scalar code, GCC recognises the complex product and emits vfmaddsub (one
// rounding fewer) whatever -ffp-contract says. The portable build has no FMA instructions to emit.
template <typename T>
inline void rotate(const T* x, const float* f, T* dst, int64_t D) {
  int64_t i = 0;
#if defined(CPU_CAPABILITY_AVX512)
  alignas(64) float out[16];
  for (; i + 16 <= D; i += 16) {
    __m512 v;
    if constexpr (std::is_same_v<T, bf16>)
      v = _mm512_castsi512_ps(_mm512_slli_epi32(
          _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i))), 16));
    else
      v = _mm512_loadu_ps(reinterpret_cast<const float*>(x + i));   // (a, b) pairs
    __m512 cs = _mm512_loadu_ps(f + i);                                // (c, d) pairs
    __m512 p = _mm512_mul_ps(v, cs);                                   // (ac, bd)
    __m512 r = _mm512_mul_ps(v, _mm512_permute_ps(cs, 0xB1));          // (ad, bc)
    __m512 re = _mm512_sub_ps(p, _mm512_permute_ps(p, 0xB1));           // even lanes: ac - bd
    __m512 im = _mm512_add_ps(r, _mm512_permute_ps(r, 0xB1));           // odd lanes: bc + ad
    _mm512_store_ps(out, _mm512_mask_blend_ps(0xAAAA, re, im));
    for (int j = 0; j < 16; ++j) dst[i + j] = static_cast<T>(out[j]);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  alignas(32) float out[8];
  for (; i + 8 <= D; i += 8) {
    __m256 v;
    if constexpr (std::is_same_v<T, bf16>)
      v = _mm256_castsi256_ps(_mm256_slli_epi32(
          _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i))), 16));
    else
      v = _mm256_loadu_ps(reinterpret_cast<const float*>(x + i));
    __m256 cs = _mm256_loadu_ps(f + i);
    __m256 p = _mm256_mul_ps(v, cs);
    __m256 r = _mm256_mul_ps(v, _mm256_permute_ps(cs, 0xB1));
    __m256 re = _mm256_sub_ps(p, _mm256_permute_ps(p, 0xB1));
    __m256 im = _mm256_add_ps(r, _mm256_permute_ps(r, 0xB1));
    _mm256_store_ps(out, _mm256_blend_ps(re, im, 0xAA));
    for (int j = 0; j < 8; ++j) dst[i + j] = static_cast<T>(out[j]);
  }
#endif
  for (; i < D; i += 2) {
    const float a = f32(x[i]), b = f32(x[i + 1]), c = f[i], d = f[i + 1];
    const float ac = a * c, bd = b * d, ad = a * d, bc = b * c;
    dst[i] = static_cast<T>(ac - bd);
    dst[i + 1] = static_cast<T>(ad + bc);
  }
}

template <typename T>
at::Tensor rotate_store_t(const at::Tensor& qkv, const at::Tensor& freqs, at::Tensor& k_cache, at::Tensor& v_cache,
                          const at::Tensor& slots, int64_t n_heads) {
  const int64_t N = qkv.size(0), D = qkv.size(2), H = n_heads;
  const int64_t H_kv = k_cache.size(0), capacity = k_cache.size(1) * k_cache.size(2);
  const T* src = qkv.data_ptr<T>();
  const float* f = freqs.data_ptr<float>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  T *kp = k_cache.data_ptr<T>(), *vp = v_cache.data_ptr<T>();
  auto q = at::empty({N, H, D}, qkv.options());
  T* qp = q.data_ptr<T>();
  for (int64_t t = 0; t < N; ++t) {
    TORCH_CHECK(slot[t] >= 0 && slot[t] < capacity, "slot ", slot[t], " outside the pool");
    const float* ft = f + t * D;
    for (int64_t h = 0; h < H + 2 * H_kv; ++h) {
      const T* x = src + (t * (H + 2 * H_kv) + h) * D;
      T* dst = h < H ? qp + (t * H + h) * D
                     : (h < H + H_kv ? kp + ((h - H) * capacity + slot[t]) * D
                                     : vp + ((h - H - H_kv) * capacity + slot[t]) * D);
      if (h >= H + H_kv) {
        std::copy(x, x + D, dst);
        continue;
      }
      rotate(x, ft, dst, D);
    }
  }
  return q;
}

// ATen's silu kernel computes x / (1 + exp(-x)) in float32: in vectors (its vectorised exp, the same header
// code) over each row's first multiple of 2 * Vectorized<T>::size() elements, std::exp on the loop's scalar
// tail; bf16 rounds the result, then the product with `up` rounds again.
template <typename T>
at::Tensor silu_mul_t(const at::Tensor& gate_up) {
  const int64_t F2 = gate_up.size(-1), F = F2 / 2, rows = F2 ? gate_up.numel() / F2 : 0;
  auto sizes = gate_up.sizes().vec();
  sizes.back() = F;
  auto out = at::empty(sizes, gate_up.options());
  using Vec = at::vec::Vectorized<float>;
  const int64_t chunk = 2 * at::vec::Vectorized<T>::size(), vec_end = F - F % chunk;
  const T* src = gate_up.data_ptr<T>();
  T* dst = out.data_ptr<T>();
  alignas(64) float buf[Vec::size()];
  for (int64_t r = 0; r < rows; ++r) {
    const T* g = src + r * F2;
    const T* u = g + F;
    T* o = dst + r * F;
    for (int64_t i = 0; i < vec_end; i += Vec::size()) {
      for (int j = 0; j < Vec::size(); ++j) buf[j] = f32(g[i + j]);
      Vec x = Vec::loadu(buf);
      (x / (Vec(1.0f) + x.neg().exp())).store(buf);
      for (int j = 0; j < Vec::size(); ++j) o[i + j] = static_cast<T>(f32(static_cast<T>(buf[j])) * f32(u[i + j]));
    }
    for (int64_t i = vec_end; i < F; ++i) {
      float x = f32(g[i]);
      float s = f32(static_cast<T>(x / (1.0f + std::exp(-x))));
      o[i] = static_cast<T>(s * f32(u[i]));
    }
  }
  return out;
}

}  // namespace

// torch.argmax(logits, -1) of float32 rows [R, V]: the first index of the largest value, or of the first NaN
// where there is one (as torch's), rows split across the extension's threads. ATen's CPU argmax is a scalar
// loop: 64 us for a 49,152-token vocabulary, against ~5 here.
at::Tensor argmax_rows(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.stride(1) == 1,
              "logits: float32 [rows, vocab], last dim contiguous");
  const int64_t R = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V > 0, "logits: an empty vocabulary");
  auto out = at::empty({R}, logits.options().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  const float* base = logits.data_ptr<float>();
  using Vec = at::vec::Vectorized<float>;
  parallel_for(R, [&](int64_t r) {
    const float* x = base + r * logits.stride(0);
    int64_t i = 0;
    Vec best(-std::numeric_limits<float>::infinity());
    bool nan = false;
    for (; i + Vec::size() <= V; i += Vec::size()) {
      const Vec v = Vec::loadu(x + i);
      nan |= v.isnan().zero_mask() != (1 << Vec::size()) - 1;  // zero_mask: a bit for each lane that is 0
      best = at::vec::maximum(best, v);
    }
    float m = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, best);
    for (; i < V; ++i) {
      nan |= std::isnan(x[i]);
      m = std::max(m, x[i]);
    }
    int64_t j = 0;
    if (!nan) {  // the first lane equal to the maximum, a vector at a time
      const Vec target(m);
      for (; j + Vec::size() <= V; j += Vec::size()) {
        const int equal = ~(Vec::loadu(x + j) == target).zero_mask() & ((1 << Vec::size()) - 1);
        if (equal) break;
      }
    }
    while (j < V && !(nan ? std::isnan(x[j]) : x[j] == m)) ++j;
    o[r] = j;
  });
  return out;
}

// RMSNorm of rows as F.rms_norm computes it on a CPU (ATen's composite, ~12 dispatched ops a call): x in
// float32, its squares summed by ATen's own sum kernel (one call for all rows: its summation order is kept),
// mean = sum / dim, rsqrt(mean + float(eps)) as 1 / sqrt, then (x * rsqrt) * float(weight), rounded to x's
// dtype. With `delta` the residual add comes first, rounded as ATen's add rounds it, and the sum is returned too.
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const c10::optional<at::Tensor>& delta,
                                                const at::Tensor& weight, double eps) {
  check_rows(x, "x");
  TORCH_CHECK(x.dim() >= 1, "x: at least one dimension");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.is_contiguous() && weight.numel() == x.size(-1),
              "weight: [dim] of x's dtype");
  if (delta.has_value())
    TORCH_CHECK(delta->scalar_type() == x.scalar_type() && delta->is_contiguous() && delta->sizes() == x.sizes(),
                "delta: contiguous, x's dtype and shape");
  return x.scalar_type() == at::kFloat ? add_rms_norm_t<float>(x, delta, weight, eps)
                                       : add_rms_norm_t<bf16>(x, delta, weight, eps);
}

// RoPE of the fused projection's q and k heads and the paged-cache store of k and v, as model/rope.apply_rotary
// and PagedKVCache.attend do it. qkv [N, H + 2 H_kv, D]; freqs [N, D / 2, 2] float32 (cos, sin); pools
// [H_kv, blocks, block_size, D] of qkv's dtype; slots [N] int64. Returns the rotated q [N, H, D].
at::Tensor rotate_store(const at::Tensor& qkv, const at::Tensor& freqs, at::Tensor& k_cache, at::Tensor& v_cache,
                        const at::Tensor& slots, int64_t n_heads) {
  check_rows(qkv, "qkv");
  TORCH_CHECK(qkv.dim() == 3, "qkv: [N, heads, D]");
  const int64_t N = qkv.size(0), D = qkv.size(2), H = n_heads;
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.scalar_type() == qkv.scalar_type() && k_cache.is_contiguous() &&
                  v_cache.sizes() == k_cache.sizes() && v_cache.scalar_type() == qkv.scalar_type() &&
                  v_cache.is_contiguous() && k_cache.size(3) == D,
              "pools: contiguous [H_kv, blocks, bs, D] of qkv's dtype");
  const int64_t H_kv = k_cache.size(0);
  // head_dim a multiple of 16: whole vectors on every build, as ATen's vector loop covers them (its scalar tail
  // is compiled with fused multiply-adds on AVX-512)
  TORCH_CHECK(qkv.size(1) == H + 2 * H_kv && D % 16 == 0, "qkv: H + 2 H_kv heads of a head_dim multiple of 16");
  TORCH_CHECK(freqs.scalar_type() == at::kFloat && freqs.is_contiguous() && freqs.numel() == N * D,
              "freqs: contiguous float32 [N, D / 2, 2]");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.numel() == N, "slots: int64 [N]");
  return qkv.scalar_type() == at::kFloat ? rotate_store_t<float>(qkv, freqs, k_cache, v_cache, slots, n_heads)
                                         : rotate_store_t<bf16>(qkv, freqs, k_cache, v_cache, slots, n_heads);
}

// SwiGLU's product silu(gate) * up of the fused w13 output [..., 2F] = [gate | up], F.silu(gate) * up's bits.
at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_rows(gate_up, "gate_up");
  TORCH_CHECK(gate_up.dim() >= 1 && gate_up.size(-1) % 2 == 0, "gate_up: [..., 2F]");
  return gate_up.scalar_type() == at::kFloat ? silu_mul_t<float>(gate_up) : silu_mul_t<bf16>(gate_up);
}

}  // namespace mistral7b
