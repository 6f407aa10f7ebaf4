// Decode attention: one query per sequence over the paged KV cache, read in place (no gathered copy of the
// blocks), for the CPU extension (built per CPU capability by mistral7b/cpu/build.py).
//
// bfloat16 pools (AVX-512 builds): it rounds exactly where the PyTorch path does (cache/paged.py,
// _one_query_attention), so the two give the same bits:
//   scores = bf16(q . k)        oneDNN's bf16 matmul: float32 sums of exact bf16 products, each pair of
//                                dimensions odd one first (vdpbf16ps), rounded once to bf16
//   p = softmax(float(scores) * scale, masked)    ATen's own vectorised softmax (the same header code, built for
//                                the same CPU capability as the running libtorch), over the row as the PyTorch
//                                path gathers it: from the sequence's first live block, -inf where masked
//   out = bf16(bf16(p) . v)     again float32 sums over pairs of keys, odd one first, rounded once.
// The keys' pairs are counted from the first live block, as in the gathered row. The summation orders were
// checked against oneDNN for head_dim 64 and 128 with 1 to 8 query heads a kv head (tests/cpu/test_ops.py);
// other shapes (head_dim 32 with one query head a kv head sums in another order) stay on the PyTorch path. On
// other capabilities oneDNN sums bf16 in other orders, and bf16 pools stay on the PyTorch path.
//
// float32 pools (every build): float32 dot products and sums of p * v in this file's own order, the softmax split
// over chunks of keys and merged (MKL's order, which the PyTorch path uses, is not reproducible): within float32
// rounding of the PyTorch path, which tests/cpu/test_ops.py checks against float64 attention.

#include "ops.h"
#include "threads.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace mistral7b {
namespace {

struct Row {  // one sequence of the step: its keys and where they lie in the pool
  const int32_t* table;
  int64_t base;   // position of the first key of the gathered row (first live block * block size)
  int64_t lo;     // first valid key, relative to base
  int64_t hi;     // one past the last valid key, relative to base
};

template <typename T>
struct Pool {
  const T* k;
  const T* v;
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

// ATen's softmax over the last dimension for one row (aten/src/ATen/native/cpu/SoftmaxKernel.cpp,
// _vec_softmax_lastdim), in place.
void softmax_row(float* x, int64_t n) {
  using Vec = at::vec::Vectorized<float>;
  float max_input = at::vec::reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, x, n);
  at::vec::map([max_input](Vec a) { return (a - Vec(max_input)).exp(); }, x, x, n);
  float sum = at::vec::reduce_all<float>([](Vec a, Vec b) { return a + b; }, x, n);
  sum = 1 / sum;
  at::vec::map([sum](Vec a) { return a * Vec(sum); }, x, x, n);
}

// q [S, H, D] bf16 (last dim contiguous); caches [H_kv, blocks, block_size, D] bf16; block_tables [S, T],
// first_blocks [S], seq_lens [S] int32 (keys after this step, the query's own included); window <= 0: none.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int64_t kTile = 16;  // keys per score tile (one AVX-512 register of float32)

inline float bf16_round(float x) { return static_cast<float>(static_cast<bf16>(x)); }

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
void score_tile_g(const Pool<bf16>& pool, const int64_t* off, const float* q, float* acc_out /* [G, 16] */) {
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
void weighted_values_g(const Pool<bf16>& pool, const Row& r, int64_t h, const float* probs, int64_t stride,
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
void prefetch_tile(const Pool<bf16>& pool, const Row& r, int64_t h, int64_t t0) {
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
void score_tile(const Pool<bf16>& pool, const Row& r, int64_t h, const float* q, int64_t G, int64_t t0, float scale,
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

// The exact bf16 path (the header's first part) over rows of keys `width` wide.
at::Tensor decode_attention_bf16(const at::Tensor& q, const Pool<bf16>& pool, const std::vector<Row>& rows,
                                 int64_t width, int64_t H_kv, double scale) {
  const int64_t S = q.size(0), H = q.size(1), D = q.size(2), G = H / H_kv;
  const int64_t tiles = (width + kTile - 1) / kTile, stride = tiles * kTile;

  // q as float32 [S, H, D]; scores / probabilities [S, H, stride]; output accumulators [S, H, D]
  std::vector<float> qf(S * H * D), scores(S * H * stride), acc(S * H * D);
  const bf16* qp = q.data_ptr<bf16>();
  for (int64_t s = 0; s < S; ++s)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t d = 0; d < D; ++d) qf[(s * H + h) * D + d] = static_cast<float>(qp[s * q.stride(0) + h * q.stride(1) + d]);

  // 1. scores, tile by tile (tiles wholly outside a row's keys are masked without reading anything)
  parallel_range(S * H_kv * tiles, 8, [&](int64_t begin, int64_t end) {
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
  parallel_range(S * H, 4, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float* row = scores.data() + i * stride;
      softmax_row(row, width);  // then rounded to bf16, as the PyTorch path does before its second matmul
      for (int64_t j = 0; j < width; ++j) row[j] = bf16_round(row[j]);
    }
  });
  // 3. probabilities times values, 32 dimensions at a time
  const int64_t chunks = D / 32;
  parallel_range(S * H_kv * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      int64_t s = i / (H_kv * chunks), h = (i / chunks) % H_kv, d0 = (i % chunks) * 32;
      with_group<WeightedValues>(G, pool, rows[s], h, scores.data() + (s * H + h * G) * stride, stride, d0,
                                 acc.data() + (s * H + h * G) * D);
    }
  });
  auto out = at::empty({S, H, D}, q.options().memory_format(at::MemoryFormat::Contiguous));
  bf16* o = out.data_ptr<bf16>();
  for (int64_t i = 0; i < S * H * D; ++i) o[i] = static_cast<bf16>(acc[i]);
  return out;
}

#endif  // CPU_CAPABILITY_AVX512

// The float32 path, as flash-decoding splits it: each row's valid keys cut into chunks so that every thread has
// work (one sequence has only H_kv heads: 3 tasks on 2 threads left one idle half the time); a chunk gives, per
// query head, its scores' max m, the sum l of exp(score - m) (ATen's vectorised exp) and the sum of
// exp(score - m) * v; the chunks of a head merge with weights exp(m_c - max m). q and the value accumulators
// stay in registers (NV vectors a head: head_dim / the vector width).
struct Chunk {
  int64_t s, h, t0, t1;  // row, kv head, keys [t0, t1) relative to the row's base
};

// The sums of the lanes of four vectors: out[j] = sum of a[j]'s lanes (a tree of horizontal adds, where one
// reduction a key cost as much as its dot product).
inline void reduce4(const at::vec::Vectorized<float>* a, float* out) {
#if defined(CPU_CAPABILITY_AVX512)
  __m256 r[4];
  for (int j = 0; j < 4; ++j) {
    const __m512 v = a[j];
    r[j] = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
  }
#elif defined(CPU_CAPABILITY_AVX2)
  __m256 r[4] = {a[0], a[1], a[2], a[3]};
#endif
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(r[0], r[1]), _mm256_hadd_ps(r[2], r[3]));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
#else
  for (int j = 0; j < 4; ++j)
    out[j] = at::vec::vec_reduce_all<float>([](at::vec::Vectorized<float>& x, at::vec::Vectorized<float>& y) {
      return x + y; }, a[j]);
#endif
}

template <int NV_>  // vectors a head, or 0: head_dim / the width at run time (up to 32: no registers then)
void attend_chunk(const Pool<float>& pool, const Row& r, const Chunk& c, const float* q /* [G, D] */, int64_t G,
                  float scale, float* scores /* [G, t1 - t0] scratch */, const float** keys /* [t1 - t0] */,
                  float* m, float* l, float* o /* [G, D] */) {
  using Vec = at::vec::Vectorized<float>;
  constexpr int64_t V = Vec::size();
  constexpr int kMax = NV_ ? NV_ : 32;
  const int NV = NV_ ? NV_ : static_cast<int>(pool.dim / V);
  const int64_t n = c.t1 - c.t0, D = NV * V;
  for (int64_t t = 0; t < n; ++t) keys[t] = pool.k + pool.offset(r, c.h, c.t0 + t);  // values: the same offsets
  const int64_t kv = pool.v - pool.k;
  for (int64_t g = 0; g < G; ++g) {
    Vec qv[kMax];
    for (int i = 0; i < NV; ++i) qv[i] = Vec::loadu(q + g * D + i * V);
    float* sg = scores + g * n;
    int64_t t = 0;
    for (; t + 4 <= n; t += 4) {
      if (g == 0 && t + 8 < n)  // blocks lie anywhere in the pool: ask for the keys a few ahead
        for (int j = 4; j < 8; ++j)
          for (int64_t b = 0; b < D * 4; b += 64) __builtin_prefetch(reinterpret_cast<const char*>(keys[t + j]) + b);
      Vec a[4];
      for (int j = 0; j < 4; ++j) {
        const float* k = keys[t + j];
        a[j] = qv[0] * Vec::loadu(k);
        for (int i = 1; i < NV; ++i) a[j] = at::vec::fmadd(qv[i], Vec::loadu(k + i * V), a[j]);
      }
      reduce4(a, sg + t);
    }
    for (; t < n; ++t) {
      Vec a = qv[0] * Vec::loadu(keys[t]);
      for (int i = 1; i < NV; ++i) a = at::vec::fmadd(qv[i], Vec::loadu(keys[t] + i * V), a);
      sg[t] = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, a);
    }
    at::vec::map([scale](Vec x) { return x * Vec(scale); }, sg, sg, n);
    const float mx = at::vec::reduce_all<float>([](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, sg, n);
    at::vec::map([mx](Vec x) { return (x - Vec(mx)).exp(); }, sg, sg, n);
    m[g] = mx;
    l[g] = at::vec::reduce_all<float>([](Vec x, Vec y) { return x + y; }, sg, n);
  }
  for (int64_t g = 0; g < G; ++g) {
    Vec acc[kMax];
    for (int i = 0; i < NV; ++i) acc[i] = Vec(0.f);
    const float* sg = scores + g * n;
    for (int64_t t = 0; t < n; ++t) {
      const float* v = keys[t] + kv;
      const Vec p(sg[t]);
      for (int i = 0; i < NV; ++i) acc[i] = at::vec::fmadd(p, Vec::loadu(v + i * V), acc[i]);
    }
    for (int i = 0; i < NV; ++i) acc[i].store(o + g * D + i * V);
  }
}

template <int NV>
at::Tensor decode_attention_f32_nv(const at::Tensor& q, const Pool<float>& pool, const std::vector<Row>& rows,
                                   int64_t H_kv, double scale) {
  const int64_t S = q.size(0), H = q.size(1), D = q.size(2), G = H / H_kv;
  // chunks: about 4 tasks a thread in all, at least 32 keys each
  const int64_t want = 4 * at::get_num_threads();
  std::vector<Chunk> chunks;
  std::vector<int64_t> first(S * H_kv + 1);  // chunks of (s, h): [first[s H_kv + h], first[s H_kv + h + 1])
  for (int64_t s = 0; s < S; ++s) {
    const Row& r = rows[s];
    const int64_t n = r.hi - r.lo;
    const int64_t pieces = std::max<int64_t>(1, std::min((want + S * H_kv - 1) / (S * H_kv), (n + 31) / 32));
    const int64_t size = (n + pieces - 1) / pieces;
    for (int64_t h = 0; h < H_kv; ++h) {
      first[s * H_kv + h] = chunks.size();
      for (int64_t t0 = r.lo; t0 < r.hi; t0 += size) chunks.push_back({s, h, t0, std::min(t0 + size, r.hi)});
    }
  }
  first[S * H_kv] = chunks.size();
  const int64_t C = chunks.size();
  std::vector<float> ms(C * G), ls(C * G), os(C * G * D);
  const float* qp = q.data_ptr<float>();
  parallel_for(C, [&](int64_t i) {
    thread_local std::vector<float> qg, scratch;
    thread_local std::vector<const float*> keys;
    qg.resize(G * D);
    {
      const Chunk& c = chunks[i];
      for (int64_t g = 0; g < G; ++g)
        std::copy_n(qp + c.s * q.stride(0) + (c.h * G + g) * q.stride(1), D, qg.data() + g * D);
      scratch.resize(G * (c.t1 - c.t0));
      keys.resize(c.t1 - c.t0);
      attend_chunk<NV>(pool, rows[c.s], c, qg.data(), G, static_cast<float>(scale), scratch.data(), keys.data(),
                       ms.data() + i * G, ls.data() + i * G, os.data() + i * G * D);
    }
  });
  auto out = at::empty({S, H, D}, q.options().memory_format(at::MemoryFormat::Contiguous));
  float* op = out.data_ptr<float>();
  for (int64_t sh = 0; sh < S * H_kv; ++sh)
    for (int64_t g = 0; g < G; ++g) {
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t c = first[sh]; c < first[sh + 1]; ++c) mx = std::max(mx, ms[c * G + g]);
      float total = 0.f;
      float* dst = op + (sh * G + g) * D;  // (s, h) = divmod(sh, H_kv): query head h G + g of row s
      std::fill(dst, dst + D, 0.f);
      for (int64_t c = first[sh]; c < first[sh + 1]; ++c) {
        const float w = std::exp(ms[c * G + g] - mx);
        total += w * ls[c * G + g];
        const float* oc = os.data() + (c * G + g) * D;
        for (int64_t d = 0; d < D; ++d) dst[d] += w * oc[d];
      }
      const float inv = 1.f / total;
      for (int64_t d = 0; d < D; ++d) dst[d] *= inv;
    }
  return out;
}

at::Tensor decode_attention_f32(const at::Tensor& q, const Pool<float>& pool, const std::vector<Row>& rows,
                                int64_t H_kv, double scale) {
  constexpr int64_t V = at::vec::Vectorized<float>::size();
  switch (q.size(2) / V) {
    case 4: return decode_attention_f32_nv<4>(q, pool, rows, H_kv, scale);    // head_dim 64 (AVX-512), 32
    case 8: return decode_attention_f32_nv<8>(q, pool, rows, H_kv, scale);    // 128 (AVX-512), 64
    case 16: return decode_attention_f32_nv<16>(q, pool, rows, H_kv, scale);  // 128 (AVX2 and portable)
    default: return decode_attention_f32_nv<0>(q, pool, rows, H_kv, scale);
  }
}

}  // namespace

bool decode_attention_exact_bf16() {
#if defined(CPU_CAPABILITY_AVX512)
  return true;
#else
  return false;
#endif
}

// q [S, H, D] (last dim contiguous); caches [H_kv, blocks, block_size, D] of q's dtype (bfloat16 on AVX-512
// builds, float32 on all); block_tables [S, T], first_blocks [S], seq_lens [S] int32 (keys after this step, the
// query's own included); window <= 0: none.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_tables, const at::Tensor& first_blocks,
                            const at::Tensor& seq_lens, int64_t window, double scale) {
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || (dtype == at::kBFloat16 && decode_attention_exact_bf16()),
              "decode_attention: float32, or bfloat16 on an AVX-512 build");
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1, "q: [S, H, D], last dim contiguous");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.scalar_type() == dtype && k_cache.is_contiguous() &&
                  v_cache.sizes() == k_cache.sizes() && v_cache.scalar_type() == dtype && v_cache.is_contiguous(),
              "caches: [H_kv, blocks, block_size, D] of q's dtype, contiguous");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.is_contiguous() &&
                  first_blocks.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt,
              "block_tables, first_blocks, seq_lens: int32");
  const int64_t S = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t H_kv = k_cache.size(0), B = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D && H % H_kv == 0, "q and caches: heads and head_dim do not match");
  TORCH_CHECK(dtype == at::kFloat ? (D % 16 == 0 && D <= 256) : (D % 64 == 0 && H / H_kv <= 8),
              "head_dim a multiple of 16 up to 256 (float32), or of 64 with at most 8 query heads a kv head (bf16)");
  TORCH_CHECK(k_cache.numel() / 2 < (int64_t(1) << 31), "pool too large for 32-bit gather offsets");
  TORCH_CHECK(block_tables.size(0) == S && first_blocks.numel() == S && seq_lens.numel() == S, "one row a sequence");
  const int64_t T = block_tables.size(1);
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
  const int block_shift = (int64_t(1) << shift) == B ? shift : -1;
  if (dtype == at::kFloat)
    return decode_attention_f32(q, Pool<float>{k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
                                               k_cache.stride(0), B, D, block_shift}, rows, H_kv, scale);
#if defined(CPU_CAPABILITY_AVX512)
  return decode_attention_bf16(q, Pool<bf16>{k_cache.data_ptr<bf16>(), v_cache.data_ptr<bf16>(), k_cache.stride(0),
                                             B, D, block_shift}, rows, width, H_kv, scale);
#else
  TORCH_CHECK(false, "unreachable");
#endif
}

}  // namespace mistral7b
