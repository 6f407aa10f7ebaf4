// CPU kernels for one decode step, as a PyTorch C++ extension (built by mistral7b/cpu/build.py).
//
// decode_attention: one query per sequence over the paged KV cache, read in place (no gathered copy of the
// blocks). It rounds exactly where the PyTorch path does (cache/paged.py, _one_query_attention), so the two
// give the same bits:
//   scores = bf16(q . k)        oneDNN's bf16 matmul: float32 sums of exact bf16 products, each pair of
//                                dimensions odd one first (vdpbf16ps), rounded once to bf16
//   p = softmax(float(scores) * scale, masked)    ATen's own vectorised softmax (the same header code, built for
//                                the same CPU capability as the running libtorch), over the row as the PyTorch
//                                path gathers it: from the sequence's first live block, -inf where masked
//   out = bf16(bf16(p) . v)     again float32 sums over pairs of keys, odd one first, rounded once.
// The keys' pairs are counted from the first live block, as in the gathered row. The summation orders were
// checked against oneDNN for head_dim 64 and 128 with 1 to 8 query heads a kv head (tests/cpu/test_ops.py);
// other shapes (head_dim 32 with one query head a kv head sums in another order) stay on the PyTorch path.
// AVX-512 only: on other CPUs libtorch's softmax is another build, and the engine uses the PyTorch path.
//
// add_rms_norm and rotate_store (at the end) replace the residual add + F.rms_norm and apply_rotary + the cache
// store of model/transformer.py and cache/paged.py, each with the same bits: one call where ATen dispatches
// ~13 and ~20 small ops (a 135M model's decode step: 61 norms and 30 rotations).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#ifndef __AVX512F__
#error "built for AVX-512 only (mistral7b/cpu/build.py)"
#endif
#include <immintrin.h>

namespace {

using bf16 = c10::BFloat16;
constexpr int64_t kTile = 16;  // keys per score tile (one AVX-512 register of float32)

inline float bf16_round(float x) { return static_cast<float>(static_cast<bf16>(x)); }

struct Row {  // one sequence of the step: its keys and where they lie in the pool
  const int32_t* table;
  int64_t base;   // position of the first key of the gathered row (first live block * block size)
  int64_t lo;     // first valid key, relative to base
  int64_t hi;     // one past the last valid key, relative to base
};

struct Pool {
  const bf16* k;
  const bf16* v;
  int64_t head_stride;  // elements between kv heads
  int64_t block_size;
  int64_t dim;
  int block_shift;  // log2(block_size) when a power of two (a shift instead of a 40-cycle division), else -1
  // element offset of key `rel` (relative to the row's base) of kv head h
  inline int64_t offset(const Row& r, int64_t h, int64_t rel) const {
    int64_t pos = r.base + rel, block, slot;
    if (block_shift >= 0) {
      block = pos >> block_shift;
      slot = pos & (block_size - 1);
    } else {
      block = pos / block_size;
      slot = pos % block_size;
    }
    return h * head_stride + (static_cast<int64_t>(r.table[block]) * block_size + slot) * dim;
  }
};

// The 16 x 16 dwords at rows[i] + col0 (i = key), transposed: out[c] holds column col0 + c of the 16 keys, key i
// in lane i. Each dword is a pair of bf16 dimensions.
inline void transpose16(const int32_t* const* rows, int64_t col0, __m512i* out) {
  __m512i r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(rows[i] + col0);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  // u[4m + c], 128-bit lane L: keys 4m .. 4m + 3 at column 4L + c
  for (int m = 0; m < 4; ++m) {
    r[4 * m + 0] = _mm512_unpacklo_epi64(t[4 * m], t[4 * m + 2]);
    r[4 * m + 1] = _mm512_unpackhi_epi64(t[4 * m], t[4 * m + 2]);
    r[4 * m + 2] = _mm512_unpacklo_epi64(t[4 * m + 1], t[4 * m + 3]);
    r[4 * m + 3] = _mm512_unpackhi_epi64(t[4 * m + 1], t[4 * m + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    __m512i v_even = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x88), v_odd = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xdd);
    __m512i w_even = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x88), w_odd = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xdd);
    out[c] = _mm512_shuffle_i32x4(v_even, w_even, 0x88);
    out[8 + c] = _mm512_shuffle_i32x4(v_even, w_even, 0xdd);
    out[4 + c] = _mm512_shuffle_i32x4(v_odd, w_odd, 0x88);
    out[12 + c] = _mm512_shuffle_i32x4(v_odd, w_odd, 0xdd);
  }
}

// score_tile's sums for G heads: the tile's keys transposed 16 pairs of dimensions at a time, one key a lane.
template <int G>
void score_tile_g(const Pool& pool, const int64_t* off, const float* q, float* acc_out /* [G, 16] */) {
  const int64_t D = pool.dim;
  const int32_t* rows[kTile];
  for (int j = 0; j < kTile; ++j) rows[j] = reinterpret_cast<const int32_t*>(pool.k + off[j]);
  const __m512i hi_mask = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  __m512 acc[G];
  for (int g = 0; g < G; ++g) acc[g] = _mm512_setzero_ps();
  __m512i cols[16];
  for (int64_t p0 = 0; p0 < D / 2; p0 += 16) {
    transpose16(rows, p0, cols);
    for (int c = 0; c < 16; ++c) {
      const int64_t p = p0 + c;
      __m512 k_even = _mm512_castsi512_ps(_mm512_slli_epi32(cols[c], 16));
      __m512 k_odd = _mm512_castsi512_ps(_mm512_and_si512(cols[c], hi_mask));
      for (int g = 0; g < G; ++g) {  // products of bf16 values are exact: fma == add(mul)
        acc[g] = _mm512_fmadd_ps(_mm512_set1_ps(q[g * D + 2 * p + 1]), k_odd, acc[g]);
        acc[g] = _mm512_fmadd_ps(_mm512_set1_ps(q[g * D + 2 * p]), k_even, acc[g]);
      }
    }
  }
  for (int g = 0; g < G; ++g) _mm512_storeu_ps(acc_out + g * kTile, acc[g]);
}

// out[g, d0 .. d0 + 31] for the G heads of kv head h, in 2 * G registers: sums over the valid keys, pairs
// counted from the row's base, the odd key of each pair first.
template <int G>
void weighted_values_g(const Pool& pool, const Row& r, int64_t h, const float* probs, int64_t stride,
                            int64_t d0, float* acc_out) {
  __m512 acc[G][2];
  for (int g = 0; g < G; ++g) acc[g][0] = acc[g][1] = _mm512_setzero_ps();
  auto add_key = [&](int64_t rel) {
    const bf16* v = pool.v + pool.offset(r, h, rel) + d0;
    __m512 lo = _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v))), 16));
    __m512 hi = _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + 16))), 16));
    for (int g = 0; g < G; ++g) {
      __m512 p = _mm512_set1_ps(probs[g * stride + rel]);
      acc[g][0] = _mm512_fmadd_ps(p, lo, acc[g][0]);
      acc[g][1] = _mm512_fmadd_ps(p, hi, acc[g][1]);
    }
  };
  for (int64_t pair = r.lo & ~int64_t(1); pair < r.hi; pair += 2) {
    if (pair + 1 >= r.lo && pair + 1 < r.hi) add_key(pair + 1);
    if (pair >= r.lo) add_key(pair);
  }
  const int64_t D = pool.dim;
  for (int g = 0; g < G; ++g) {
    _mm512_storeu_ps(acc_out + g * D + d0, acc[g][0]);
    _mm512_storeu_ps(acc_out + g * D + d0 + 16, acc[g][1]);
  }
}

template <template <int> class F, typename... Args>
bool with_group(int64_t G, Args&&... args) {  // F<G>::run for the group sizes unrolled above
  switch (G) {
    case 1: F<1>::run(args...); return true;
    case 2: F<2>::run(args...); return true;
    case 3: F<3>::run(args...); return true;
    case 4: F<4>::run(args...); return true;
    case 5: F<5>::run(args...); return true;
    case 6: F<6>::run(args...); return true;
    case 7: F<7>::run(args...); return true;
    case 8: F<8>::run(args...); return true;
    default: return false;
  }
}
template <int G> struct ScoreTile { template <typename... A> static void run(A&&... a) { score_tile_g<G>(a...); } };
template <int G> struct WeightedValues {
  template <typename... A> static void run(A&&... a) { weighted_values_g<G>(a...); }
};

// Asks for the keys and values t0 .. t0 + 15 of a row (those inside it) while the tile before is scored: the
// pool's blocks lie anywhere and a decode step's weights have pushed them out of the caches since the last
// layer, so the hardware prefetcher, which follows one stream, finds little ahead (an engine call at ~600 keys
// took 38 us, 21 us with the pool in cache).
void prefetch_tile(const Pool& pool, const Row& r, int64_t h, int64_t t0) {
  const int64_t bytes = pool.dim * static_cast<int64_t>(sizeof(bf16));
  for (int64_t rel = std::max(t0, r.lo); rel < std::min(t0 + kTile, r.hi); ++rel) {
    const int64_t off = pool.offset(r, h, rel);
    for (int64_t b = 0; b < bytes; b += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(pool.k + off) + b, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(pool.v + off) + b, _MM_HINT_T1);
    }
  }
}

// Scores of the G query heads of kv head h for keys t0 .. t0 + 15 of a row (relative), masked outside lo .. hi:
// bf16-rounded float32 dot products, scaled. scores[g * stride + rel].
void score_tile(const Pool& pool, const Row& r, int64_t h, const float* q, int64_t G, int64_t t0, float scale,
                float* scores, int64_t stride) {
  int64_t off[kTile];
  for (int64_t j = 0; j < kTile; ++j) {
    int64_t rel = std::min(std::max(t0 + j, r.lo), r.hi - 1);  // masked lanes read a valid key, then drop it
    off[j] = pool.offset(r, h, rel);
  }
  float sums[8 * kTile];
  with_group<ScoreTile>(G, pool, off, q, sums);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t j = 0; j < kTile; ++j) {
      int64_t rel = t0 + j;
      scores[g * stride + rel] = rel >= r.lo && rel < r.hi ? bf16_round(sums[g * kTile + j]) * scale
                                                           : -std::numeric_limits<float>::infinity();
    }
}

// ATen's softmax over the last dimension for one row (aten/src/ATen/native/cpu/SoftmaxKernel.cpp,
// _vec_softmax_lastdim), then rounded to bf16 as the PyTorch path does before its second matmul.
void softmax_row(float* x, int64_t n) {
  using Vec = at::vec::Vectorized<float>;
  float max_input = at::vec::reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, x, n);
  at::vec::map([max_input](Vec a) { return (a - Vec(max_input)).exp(); }, x, x, n);
  float sum = at::vec::reduce_all<float>([](Vec a, Vec b) { return a + b; }, x, n);
  sum = 1 / sum;
  at::vec::map([sum](Vec a) { return a * Vec(sum); }, x, x, n);
  for (int64_t i = 0; i < n; ++i) x[i] = bf16_round(x[i]);
}

// q [S, H, D] bf16 (last dim contiguous); caches [H_kv, blocks, block_size, D] bf16; block_tables [S, T],
// first_blocks [S], seq_lens [S] int32 (keys after this step, the query's own included); window <= 0: none.
torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                               const torch::Tensor& block_tables, const torch::Tensor& first_blocks,
                               const torch::Tensor& seq_lens, int64_t window, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kBFloat16 && q.stride(2) == 1, "q: [S, H, D] bf16");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.scalar_type() == at::kBFloat16 && k_cache.is_contiguous() &&
                  v_cache.sizes() == k_cache.sizes() && v_cache.scalar_type() == at::kBFloat16 &&
                  v_cache.is_contiguous(), "caches: [H_kv, blocks, block_size, D] bf16, contiguous");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.is_contiguous() &&
                  first_blocks.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt,
              "block_tables, first_blocks, seq_lens: int32");
  const int64_t S = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t H_kv = k_cache.size(0), B = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D && H % H_kv == 0, "q and caches: heads and head_dim do not match");
  TORCH_CHECK(D % 64 == 0 && H / H_kv <= 8, "head_dim a multiple of 64, at most 8 query heads a kv head");
  TORCH_CHECK(k_cache.numel() / 2 < (int64_t(1) << 31), "pool too large for 32-bit gather offsets");
  TORCH_CHECK(block_tables.size(0) == S && first_blocks.numel() == S && seq_lens.numel() == S, "one row a sequence");
  const int64_t G = H / H_kv, T = block_tables.size(1);
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* firsts = first_blocks.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();

  std::vector<Row> rows(S);
  int64_t width = 0;  // keys of the gathered rows: the widest sequence's live blocks
  for (int64_t s = 0; s < S; ++s) {
    int64_t len = lens[s], first = firsts[s];
    TORCH_CHECK(len >= 1 && (len - 1) / B < T && first >= 0 && first <= (len - 1) / B, "row ", s, ": bad lengths");
    int64_t base = first * B;
    int64_t lo = window > 0 ? std::max<int64_t>(len - window, base) : base;
    rows[s] = Row{tables + s * T, base, lo - base, len - base};
    width = std::max(width, ((len - 1) / B - first + 1) * B);
  }
  int shift = 0;
  while ((int64_t(1) << shift) < B) ++shift;
  const Pool pool{k_cache.data_ptr<bf16>(), v_cache.data_ptr<bf16>(), k_cache.stride(0), B, D,
                  (int64_t(1) << shift) == B ? shift : -1};
  const int64_t tiles = (width + kTile - 1) / kTile, stride = tiles * kTile;

  // q as float32 [S, H, D]; scores / probabilities [S, H, stride]; output accumulators [S, H, D]
  std::vector<float> qf(S * H * D), scores(S * H * stride), acc(S * H * D);
  const bf16* qp = q.data_ptr<bf16>();
  for (int64_t s = 0; s < S; ++s)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t d = 0; d < D; ++d) qf[(s * H + h) * D + d] = static_cast<float>(qp[s * q.stride(0) + h * q.stride(1) + d]);

  // 1. scores, tile by tile (tiles wholly outside a row's keys are masked without reading anything)
  at::parallel_for(0, S * H_kv * tiles, 8, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      int64_t s = i / (H_kv * tiles), h = (i / tiles) % H_kv, t0 = (i % tiles) * kTile;
      float* out = scores.data() + (s * H + h * G) * stride;
      const Row& r = rows[s];
      if (t0 + kTile <= r.lo || t0 >= r.hi) {
        for (int64_t g = 0; g < G; ++g)
          std::fill(out + g * stride + t0, out + g * stride + t0 + kTile, -std::numeric_limits<float>::infinity());
        continue;
      }
      prefetch_tile(pool, r, h, t0 + kTile);
      score_tile(pool, r, h, qf.data() + (s * H + h * G) * D, G, t0, static_cast<float>(scale), out, stride);
    }
  });
  // 2. softmax of each (sequence, head) over the gathered row's width
  at::parallel_for(0, S * H, 4, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) softmax_row(scores.data() + i * stride, width);
  });
  // 3. probabilities times values, 32 dimensions at a time
  const int64_t chunks = D / 32;
  at::parallel_for(0, S * H_kv * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      int64_t s = i / (H_kv * chunks), h = (i / chunks) % H_kv, d0 = (i % chunks) * 32;
      with_group<WeightedValues>(G, pool, rows[s], h, scores.data() + (s * H + h * G) * stride, stride, d0,
                                 acc.data() + (s * H + h * G) * D);
    }
  });
  auto out = torch::empty({S, H, D}, q.options().memory_format(at::MemoryFormat::Contiguous));
  bf16* o = out.data_ptr<bf16>();
  for (int64_t i = 0; i < S * H * D; ++i) o[i] = static_cast<bf16>(acc[i]);
  return out;
}

// RMSNorm of bf16 rows as F.rms_norm computes it on a CPU (ATen's composite, ~12 dispatched ops a call): x in
// float32, its squares summed by ATen's own sum kernel (one call for all rows: its summation order is kept),
// mean = sum / dim, rsqrt(mean + float(eps)) as 1 / sqrt, then bf16((x * rsqrt) * float(weight)). With `delta`
// the residual add comes first, rounded to bf16 as ATen's add rounds it, and the sum is returned too.
std::tuple<torch::Tensor, torch::Tensor> add_rms_norm(const torch::Tensor& x, const c10::optional<torch::Tensor>& delta,
                                                      const torch::Tensor& weight, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.is_contiguous() && x.dim() >= 1, "x: contiguous bf16");
  const int64_t D = x.size(-1), rows = D ? x.numel() / D : 0;
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && weight.is_contiguous() && weight.numel() == D,
              "weight: bf16 [dim]");
  torch::Tensor h = x;
  if (delta.has_value()) {
    TORCH_CHECK(delta->scalar_type() == at::kBFloat16 && delta->is_contiguous() && delta->sizes() == x.sizes(),
                "delta: contiguous bf16 of x's shape");
    h = torch::empty_like(x);
    const bf16 *a = x.data_ptr<bf16>(), *b = delta->data_ptr<bf16>();
    bf16* o = h.data_ptr<bf16>();
    for (int64_t i = 0; i < rows * D; ++i)
      o[i] = static_cast<bf16>(static_cast<float>(a[i]) + static_cast<float>(b[i]));
  }
  auto squares = torch::empty({rows, D}, x.options().dtype(at::kFloat));
  const bf16* hp = h.data_ptr<bf16>();
  float* sq = squares.data_ptr<float>();
  for (int64_t i = 0; i < rows * D; ++i) {
    float v = static_cast<float>(hp[i]);
    sq[i] = v * v;
  }
  const auto sums = at::sum(squares, {-1});
  const float* ss = sums.data_ptr<float>();
  const bf16* w = weight.data_ptr<bf16>();
  auto out = torch::empty_like(x);
  bf16* o = out.data_ptr<bf16>();
  for (int64_t r = 0; r < rows; ++r) {
    float mean = ss[r] / static_cast<float>(D);
    float scale = 1.0f / std::sqrt(mean + static_cast<float>(eps));
    for (int64_t d = 0; d < D; ++d)
      o[r * D + d] = static_cast<bf16>(static_cast<float>(hp[r * D + d]) * scale * static_cast<float>(w[d]));
  }
  return {h, out};
}

// RoPE of the fused projection's q and k heads and the paged-cache store of k and v, as model/rope.apply_rotary
// and PagedKVCache.attend do it: each pair (a, b) times the complex (c, d) of its position, as ATen multiplies
// complex64 numbers, (ac - bd, ad + bc) with every product and sum rounded to float32 (no fused multiply-add),
// then rounded to bf16. qkv [N, H + 2 H_kv, D] bf16; freqs [N, D / 2, 2] float32 (cos, sin); pools
// [H_kv, blocks, block_size, D] bf16; slots [N] int64. Returns the rotated q [N, H, D].
// Eight pairs at a time in intrinsics: written as scalar code, GCC recognises the complex product and emits
// vfmaddsub (one rounding fewer, other bits) whatever -ffp-contract says.
inline void rotate16(const bf16* x, const float* f, bf16* dst, int64_t D) {
  alignas(64) float out[16];
  for (int64_t i = 0; i < D; i += 16) {
    __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i))), 16));  // (a, b) pairs
    __m512 cs = _mm512_loadu_ps(f + i);                                                            // (c, d) pairs
    __m512 p = _mm512_mul_ps(v, cs);                                  // (ac, bd)
    __m512 r = _mm512_mul_ps(v, _mm512_permute_ps(cs, 0xB1));         // (ad, bc)
    __m512 re = _mm512_sub_ps(p, _mm512_permute_ps(p, 0xB1));          // even lanes: ac - bd
    __m512 im = _mm512_add_ps(r, _mm512_permute_ps(r, 0xB1));          // odd lanes: bc + ad
    _mm512_store_ps(out, _mm512_mask_blend_ps(0xAAAA, re, im));
    for (int j = 0; j < 16; ++j) dst[i + j] = static_cast<bf16>(out[j]);
  }
}

torch::Tensor rotate_store(const torch::Tensor& qkv, const torch::Tensor& freqs, torch::Tensor& k_cache,
                           torch::Tensor& v_cache, const torch::Tensor& slots, int64_t n_heads) {
  TORCH_CHECK(qkv.dim() == 3 && qkv.scalar_type() == at::kBFloat16 && qkv.is_contiguous(),
              "qkv: contiguous bf16 [N, heads, D]");
  const int64_t N = qkv.size(0), D = qkv.size(2), H = n_heads;
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.scalar_type() == at::kBFloat16 && k_cache.is_contiguous() &&
                  v_cache.sizes() == k_cache.sizes() && v_cache.scalar_type() == at::kBFloat16 &&
                  v_cache.is_contiguous() && k_cache.size(3) == D, "pools: contiguous bf16 [H_kv, blocks, bs, D]");
  const int64_t H_kv = k_cache.size(0), capacity = k_cache.size(1) * k_cache.size(2);
  TORCH_CHECK(qkv.size(1) == H + 2 * H_kv && D % 16 == 0, "qkv: H + 2 H_kv heads of a head_dim multiple of 16");
  TORCH_CHECK(freqs.scalar_type() == at::kFloat && freqs.is_contiguous() && freqs.numel() == N * D,
              "freqs: contiguous float32 [N, D / 2, 2]");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.numel() == N, "slots: int64 [N]");
  const bf16* src = qkv.data_ptr<bf16>();
  const float* f = freqs.data_ptr<float>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  bf16 *kp = k_cache.data_ptr<bf16>(), *vp = v_cache.data_ptr<bf16>();
  auto q = torch::empty({N, H, D}, qkv.options());
  bf16* qp = q.data_ptr<bf16>();
  for (int64_t t = 0; t < N; ++t) {
    TORCH_CHECK(slot[t] >= 0 && slot[t] < capacity, "slot ", slot[t], " outside the pool");
    const float* ft = f + t * D;
    for (int64_t h = 0; h < H + 2 * H_kv; ++h) {
      const bf16* x = src + (t * (H + 2 * H_kv) + h) * D;
      bf16* dst = h < H ? qp + (t * H + h) * D
                        : (h < H + H_kv ? kp + ((h - H) * capacity + slot[t]) * D
                                        : vp + ((h - H - H_kv) * capacity + slot[t]) * D);
      if (h >= H + H_kv) {
        std::copy(x, x + D, dst);
        continue;
      }
      rotate16(x, ft, dst, D);
    }
  }
  return q;
}

// SwiGLU's product of the fused w13 output [..., 2F] = [gate | up], as F.silu(gate) * up computes it in bf16:
// ATen's silu kernel, x / (1 + exp(-x)) in float32 with its vectorised exp (the same header code) on the
// row's first multiple of 64 elements and std::exp on the rest (its loop's scalar tail), rounded to bf16, then
// the bf16 product. One call where chunk, silu and mul dispatch four ops.
torch::Tensor silu_mul(const torch::Tensor& gate_up) {
  TORCH_CHECK(gate_up.scalar_type() == at::kBFloat16 && gate_up.is_contiguous() && gate_up.size(-1) % 2 == 0,
              "gate_up: contiguous bf16 [..., 2F]");
  const int64_t F2 = gate_up.size(-1), F = F2 / 2, rows = F2 ? gate_up.numel() / F2 : 0;
  auto sizes = gate_up.sizes().vec();
  sizes.back() = F;
  auto out = torch::empty(sizes, gate_up.options());
  using Vec = at::vec::Vectorized<float>;
  const int64_t vec_end = F - F % 64;
  const bf16* src = gate_up.data_ptr<bf16>();
  bf16* dst = out.data_ptr<bf16>();
  alignas(64) float buf[Vec::size()];
  for (int64_t r = 0; r < rows; ++r) {
    const bf16* g = src + r * F2;
    const bf16* u = g + F;
    bf16* o = dst + r * F;
    for (int64_t i = 0; i < vec_end; i += Vec::size()) {
      for (int j = 0; j < Vec::size(); ++j) buf[j] = static_cast<float>(g[i + j]);
      Vec x = Vec::loadu(buf);
      (x / (Vec(1.0f) + x.neg().exp())).store(buf);
      for (int j = 0; j < Vec::size(); ++j)
        o[i + j] = static_cast<bf16>(static_cast<float>(static_cast<bf16>(buf[j])) * static_cast<float>(u[i + j]));
    }
    for (int64_t i = vec_end; i < F; ++i) {
      float x = static_cast<float>(g[i]);
      float s = static_cast<float>(static_cast<bf16>(x / (1.0f + std::exp(-x))));
      o[i] = static_cast<bf16>(s * static_cast<float>(u[i]));
    }
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, "one-query paged attention over bf16 blocks, read in place");
  m.def("add_rms_norm", &add_rms_norm, "(x + delta, RMSNorm(x + delta)) of bf16 rows, F.rms_norm's bits",
        py::arg("x"), py::arg("delta"), py::arg("weight"), py::arg("eps"));
  m.def("rotate_store", &rotate_store, "RoPE of q and k (apply_rotary's bits), k and v stored in their slots");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of the fused w13 output, F.silu(gate) * up's bits");
}
