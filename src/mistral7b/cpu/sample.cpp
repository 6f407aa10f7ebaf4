// The top-p (nucleus) threshold of probability rows, without sorting them: engine/sampler.py's top-p rows with no
// top-k whose nucleus is wider than the sampler's candidates (a flat distribution). Sorting 16 rows of 49,152 and
// drawing from them took ~25 ms on a 2-vCPU Sapphire Rapids, as long as a decode step's forward; this op takes
// ~0.4 ms there on 2 threads (AVX-512 build; ~0.6 ms for the others, which compact the rows without vectors).
//
// Per row, t is the largest value v in the row with sum(p[p >= v]) >= top_p, so that `p >= t` keeps what the
// sorted rule keeps (token i, in descending order, iff the tokens before it hold less than top_p), all of the
// boundary's ties included. Non-negative floats order like their bit patterns as uint32, so t is found by a radix
// select over the bits: the mass (in double) per value of bits 23..30 (the exponent), walked from the top until
// the mass above a bucket and in it reaches top_p; then bits 11..22 and 0..10 alike, each over the elements of the
// bucket chosen so far alone (kept aside in a per-thread buffer). After the last pass a bucket is one value.

#include "ops.h"
#include "threads.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace mistral7b {
namespace {

// A value's bits in three passes: 23..30 (the exponent; a set sign bit 31 is a negative value), 11..22, 0..10.
constexpr int kBits2 = 12, kBits3 = 11;
constexpr int kShift1 = kBits2 + kBits3, kShift2 = kBits3;
constexpr uint32_t kHalf = 256;  // the first pass's buckets of non-negative values (one per exponent)
constexpr int kCopies = 16;  // the first pass's histograms: 16 x 2 KiB, within a core's L1 (histogram())

inline uint32_t bits_of(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}

inline float float_of(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

// min and max of a row, vectorised (NaN not considered).
void min_max(const float* x, int64_t V, float& lo, float& hi) {
  using Vec = at::vec::Vectorized<float>;
  int64_t i = 0;
  Vec vlo(std::numeric_limits<float>::infinity()), vhi(-std::numeric_limits<float>::infinity());
  for (; i + Vec::size() <= V; i += Vec::size()) {
    const Vec v = Vec::loadu(x + i);
    vlo = at::vec::minimum(vlo, v);
    vhi = at::vec::maximum(vhi, v);
  }
  lo = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::minimum(a, b); }, vlo);
  hi = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vhi);
  for (; i < V; ++i) {
    lo = std::min(lo, x[i]);
    hi = std::max(hi, x[i]);
  }
}

// The bucket, walking `mass` [n] from the top, where `above` (the mass of the larger values; updated to the mass
// above the bucket returned) plus the bucket's own reaches `p`; -1 if none does. `lowest`: if none does, the
// lowest bucket with mass instead (a bucket's parts summed apart may fall short of its sum by a rounding).
int walk(const double* mass, int n, double& above, double p, bool lowest) {
  double a = above, before_last = above;
  int last = -1;
  for (int b = n - 1; b >= 0; --b) {
    if (mass[b] == 0.0) continue;
    if (a + mass[b] >= p) {
      above = a;
      return b;
    }
    last = b;
    before_last = a;
    a += mass[b];
  }
  if (!lowest || last < 0) return -1;
  above = before_last;
  return last;
}

// d[0..16) = x[0..16) as doubles, by vector conversions: a scalar one (cvtss2sd) writes half a register, so each
// would wait for the last element's add in the histogram below.
inline void widen16(const float* x, double* d) {
#if defined(__AVX__)
  for (int j = 0; j < 16; j += 4) _mm256_storeu_pd(d + j, _mm256_cvtps_pd(_mm_loadu_ps(x + j)));
#elif defined(__SSE2__)
  for (int j = 0; j < 16; j += 4) {
    const __m128 v = _mm_loadu_ps(x + j);
    _mm_storeu_pd(d + j, _mm_cvtps_pd(v));
    _mm_storeu_pd(d + j + 2, _mm_cvtps_pd(_mm_movehl_ps(v, v)));
  }
#else
  for (int j = 0; j < 16; ++j) d[j] = x[j];
#endif
}

// hist[(i % copies) * stride + bucket(bits of x[i])] += x[i] for i in [0, n), in double. `copies` histograms keep
// the adds to one bucket apart (each waits for the last one's store), where values crowd into few buckets.
template <int copies, typename Bucket>
void histogram(const float* x, int64_t n, double* hist, int64_t stride, Bucket bucket) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    double d[16];
    widen16(x + i, d);
    for (int c = 0; c < 16; ++c) hist[(c % copies) * stride + bucket(bits_of(x[i + c]))] += d[c];
  }
  for (; i < n; ++i) hist[bucket(bits_of(x[i]))] += x[i];
}

// The elements of x [n] whose bits >> shift are `prefix`, moved to the front of out (which may be x; 16 floats
// of room past n), without branches; their count. AVX-512 compresses 16 at a time.
template <int shift>
int64_t compact(const float* x, int64_t n, float* out, uint32_t prefix) {
  int64_t i = 0, m = 0;
#if defined(CPU_CAPABILITY_AVX512)
  const __m512i want = _mm512_set1_epi32(static_cast<int>(prefix));
  for (; i + 16 <= n; i += 16) {  // out + m <= x + i: a store overwrites only elements already loaded
    const __m512 v = _mm512_loadu_ps(x + i);
    const __mmask16 k = _mm512_cmpeq_epi32_mask(_mm512_srli_epi32(_mm512_castps_si512(v), shift), want);
    _mm512_storeu_ps(out + m, _mm512_maskz_compress_ps(k, v));
    m += __builtin_popcount(k);
  }
#endif
  for (; i < n; ++i) {
    const float v = x[i];
    out[m] = v;
    m += (bits_of(v) >> shift) == prefix;
  }
  return m;
}

// A thread's working memory, kept from call to call: the first bucket's elements, and one set of histograms for
// each pass in turn (33 KiB: off the stack of the calling thread).
struct Scratch {
  std::vector<float> kept;
  std::vector<double> hist = std::vector<double>(std::max<size_t>(kCopies * (kHalf + 1), 1u << kBits2));
};

// Rows' status, written by the tasks (the pool does not carry exceptions across threads): checked after.
enum Status : char { kOk = 0, kBad = 1 };

// t for one row (see the top of the file).
float row_threshold(const float* x, int64_t V, double p, Scratch& scratch, Status& status) {
  if (p <= 0.0 || p >= 1.0) {  // the row's maximum (its ties only), or its minimum (everything)
    float lo, hi;
    min_max(x, V, lo, hi);
    if (lo < 0.0f) status = kBad;
    return p <= 0.0 ? hi : lo;
  }
  // pass 1, the exponent: a set sign bit counts in bucket kHalf (a negative value; -0.0 adds 0), NaN shows as a
  // NaN mass
  const auto bucket1 = [](uint32_t u) { return std::min(u >> kShift1, kHalf); };
  const auto bucket2 = [](uint32_t u) { return (u >> kShift2) & ((1u << kBits2) - 1); };
  const auto bucket3 = [](uint32_t u) { return u & ((1u << kBits3) - 1); };
  double* hist = scratch.hist.data();
  std::fill_n(hist, kCopies * (kHalf + 1), 0.0);
  histogram<kCopies>(x, V, hist, kHalf + 1, bucket1);
  double mass1[kHalf + 1];
  for (uint32_t b = 0; b <= kHalf; ++b) {
    double sum = 0.0;
    for (int c = 0; c < kCopies; ++c) sum += hist[c * (kHalf + 1) + b];
    mass1[b] = sum;
    if (std::isnan(sum)) status = kBad;
  }
  if (mass1[kHalf] != 0.0 || status != kOk) {
    status = kBad;
    return 0.0f;
  }
  double above = 0.0;
  const int b1 = walk(mass1, kHalf, above, p, false);
  if (b1 < 0) {  // the row holds less than top_p (rounding of a normalised row): keep everything
    float lo, hi;
    min_max(x, V, lo, hi);
    return lo;
  }
  // pass 2, the mantissa's high bits, over the exponent's elements (in a flat row, up to half the row)
  if (static_cast<int64_t>(scratch.kept.size()) < V + 16) scratch.kept.resize(V + 16);
  float* kept = scratch.kept.data();
  int64_t n = compact<kShift1>(x, V, kept, b1);
  std::fill_n(hist, 1 << kBits2, 0.0);
  histogram<1>(kept, n, hist, 0, bucket2);
  const int b2 = walk(hist, 1 << kBits2, above, p, true);
  // pass 3, the mantissa's low bits: a bucket is one value
  n = compact<kShift2>(kept, n, kept, (static_cast<uint32_t>(b1) << kBits2) | b2);
  std::fill_n(hist, 1 << kBits3, 0.0);
  histogram<1>(kept, n, hist, 0, bucket3);
  const int b3 = walk(hist, 1 << kBits3, above, p, true);
  return float_of((static_cast<uint32_t>(b1) << kShift1) | (static_cast<uint32_t>(b2) << kShift2) |
                  static_cast<uint32_t>(b3));
}

// Sum of the row's values >= limit, vectorised (float lanes, summed in double per 16 elements).
double kept_sum(const float* x, int64_t V, float limit) {
  using Vec = at::vec::Vectorized<float>;
  const Vec lim(limit), zero(0.0f);
  double total = 0.0;
  int64_t i = 0;
  for (; i + 4 * Vec::size() <= V; i += 4 * Vec::size()) {
    Vec acc = zero;
    for (int j = 0; j < 4; ++j) {
      const Vec v = Vec::loadu(x + i + j * Vec::size());
      acc = acc + Vec::blendv(zero, v, v >= lim);
    }
    total += at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc);
  }
  for (; i < V; ++i) total += x[i] >= limit ? x[i] : 0.0f;
  return total;
}

// The index i of a kept value (x[i] >= limit > 0) where the kept values' running sum first exceeds u * total,
// in vocabulary order; the last kept index where rounding leaves the target past the end; -1 if none is kept.
// The kept sums of blocks of 64 are taken once (`blocks`: the caller's scratch): their total sets the target, and
// the walk skips whole blocks that do not reach it.
int64_t draw_row(const float* x, int64_t V, float limit, double u, std::vector<double>& blocks) {
  constexpr int64_t kBlock = 64;
  const int64_t count = (V + kBlock - 1) / kBlock;
  blocks.resize(count);
  double total = 0.0;
  for (int64_t b = 0; b < count; ++b) {
    blocks[b] = kept_sum(x + b * kBlock, std::min(kBlock, V - b * kBlock), limit);
    total += blocks[b];
  }
  const double target = u * total;
  double run = 0.0;
  for (int64_t b = 0; b < count; ++b) {
    if (run + blocks[b] <= target) {
      run += blocks[b];
      continue;
    }
    for (int64_t i = b * kBlock; i < std::min(V, (b + 1) * kBlock); ++i) {
      if (!(x[i] >= limit)) continue;
      run += x[i];
      if (run > target) return i;
    }
  }
  for (int64_t i = V - 1; i >= 0; --i)  // rounding left the target past the end: the last kept value
    if (x[i] >= limit) return i;
  return -1;
}

}  // namespace

at::Tensor draw_above(const at::Tensor& probs, const at::Tensor& limit, const at::Tensor& u) {
  TORCH_CHECK(probs.scalar_type() == at::kFloat && probs.dim() == 2 && probs.is_contiguous() && probs.size(1) > 0,
              "probs: contiguous float32 [rows, vocab]");
  TORCH_CHECK(limit.scalar_type() == at::kFloat && limit.dim() == 1 && limit.size(0) == probs.size(0),
              "limit: float32 [rows]");
  TORCH_CHECK(u.scalar_type() == at::kFloat && u.dim() == 1 && u.size(0) == probs.size(0), "u: float32 [rows]");
  TORCH_CHECK(!probs.is_cuda() && !limit.is_cuda() && !u.is_cuda(), "probs, limit, u: CPU tensors");
  const int64_t R = probs.size(0), V = probs.size(1);
  const at::Tensor lc = limit.contiguous(), uc = u.contiguous();
  auto out = at::empty({R}, probs.options().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  const float* base = probs.data_ptr<float>();
  const float* lp = lc.data_ptr<float>();
  const float* up = uc.data_ptr<float>();
  parallel_for(R, [&](int64_t r) {
    // a limit of 0 keeps zeros too, which are never drawn: the smallest positive float instead
    const float lim = std::max(lp[r], std::numeric_limits<float>::denorm_min());
    thread_local std::vector<double> blocks;
    o[r] = draw_row(base + r * V, V, lim, static_cast<double>(up[r]), blocks);
  });
  return out;  // -1 where a row keeps no positive value at or above its limit
}

at::Tensor penalize(const at::Tensor& x, const at::Tensor& counts, const at::Tensor& seen, const at::Tensor& slots,
                    const at::Tensor& repetition, const at::Tensor& presence, const at::Tensor& frequency) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              "x: contiguous float32 [rows, vocab]");
  const int64_t R = x.size(0), V = x.size(1);
  TORCH_CHECK(counts.scalar_type() == at::kInt && counts.dim() == 2 && counts.size(1) == V && counts.is_contiguous(),
              "counts: contiguous int32 [slots, vocab]");
  TORCH_CHECK(seen.scalar_type() == at::kBool && seen.sizes() == counts.sizes() && seen.is_contiguous(),
              "seen: contiguous bool, the shape of counts");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 1 && slots.size(0) == R, "slots: int64 [rows]");
  for (const at::Tensor* t : {&repetition, &presence, &frequency})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 1 && t->size(0) == R, "penalties: float32 [rows]");
  const at::Tensor sl = slots.contiguous(), rp = repetition.contiguous(), pr = presence.contiguous(),
                   fr = frequency.contiguous();
  const int64_t* slot = sl.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r)
    TORCH_CHECK(slot[r] >= 0 && slot[r] < counts.size(0), "slots: row ", r, " names slot ", slot[r], " of ",
                counts.size(0));
  auto out = at::empty(x.sizes(), x.options());
  const float* xs = x.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int32_t* cs = counts.data_ptr<int32_t>();
  const bool* ss = seen.data_ptr<bool>();
  const float *rps = rp.data_ptr<float>(), *prs = pr.data_ptr<float>(), *frs = fr.data_ptr<float>();
  parallel_for(R, [&](int64_t r) {
    const float* xr = xs + r * V;
    float* orow = o + r * V;
    const int32_t* c = cs + slot[r] * V;
    const bool* seen_row = ss + slot[r] * V;
    const float rep = rps[r], pres = prs[r], freq = frs[r];
    for (int64_t v = 0; v < V; ++v) {  // Sampler._penalize's ops in its order: the same bits
      const float present = c[v] > 0 ? 1.0f : 0.0f;
      float value = xr[v];
      if (c[v] > 0 || seen_row[v]) value = value > 0.0f ? value / rep : value * rep;
      value = value - pres * present;
      orow[v] = value - freq * static_cast<float>(c[v]);
    }
  });
  return out;
}

at::Tensor top_p_threshold(const at::Tensor& probs, const at::Tensor& top_p) {
  TORCH_CHECK(probs.scalar_type() == at::kFloat, "probs: float32, got ", probs.scalar_type());
  TORCH_CHECK(probs.dim() == 2, "probs: [rows, vocab], got ", probs.dim(), " dimension(s)");
  TORCH_CHECK(probs.is_contiguous(), "probs: contiguous");
  TORCH_CHECK(probs.size(1) > 0, "probs: an empty vocabulary");
  TORCH_CHECK(top_p.scalar_type() == at::kFloat, "top_p: float32, got ", top_p.scalar_type());
  TORCH_CHECK(top_p.dim() == 1 && top_p.size(0) == probs.size(0), "top_p: [rows] = [", probs.size(0), "], got ",
              top_p.sizes());
  TORCH_CHECK(!probs.is_cuda() && !top_p.is_cuda(), "probs, top_p: CPU tensors");
  const int64_t R = probs.size(0), V = probs.size(1);
  const at::Tensor ps = top_p.contiguous();
  auto out = at::empty({R}, probs.options());
  float* o = out.data_ptr<float>();
  const float* base = probs.data_ptr<float>();
  const float* pp = ps.data_ptr<float>();
  std::vector<Status> status(R, kOk);
  parallel_for(R, [&](int64_t r) {
    thread_local Scratch scratch;
    o[r] = row_threshold(base + r * V, V, static_cast<double>(pp[r]), scratch, status[r]);
  });
  for (int64_t r = 0; r < R; ++r)
    TORCH_CHECK(status[r] == kOk, "probs: non-negative values without NaN, row ", r, " has a negative or NaN");
  return out;
}

}  // namespace mistral7b

namespace mistral7b {

at::Tensor masked_logits(const at::Tensor& x, const at::Tensor& mask) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(), "x: contiguous float32 [rows, vocab]");
  TORCH_CHECK(mask.scalar_type() == at::kInt && mask.dim() == 2 && mask.is_contiguous() && mask.size(0) == x.size(0),
              "mask: contiguous int32 [rows, words]");
  const int64_t R = x.size(0), V = x.size(1), W = mask.size(1);
  TORCH_CHECK(W * 32 >= V, "mask: ", W, " words cover ", W * 32, " ids, fewer than the vocabulary's ", V);
  TORCH_CHECK(!x.is_cuda() && !mask.is_cuda(), "x, mask: CPU tensors");
  auto out = at::empty(x.sizes(), x.options());
  const float* src = x.data_ptr<float>();
  const uint32_t* bits = reinterpret_cast<const uint32_t*>(mask.data_ptr<int32_t>());
  float* dst = out.data_ptr<float>();
  const float minus_inf = -std::numeric_limits<float>::infinity();
  parallel_for(R, [&](int64_t r) {
    const float* s = src + r * V;
    float* d = dst + r * V;
    const uint32_t* m = bits + r * W;
    for (int64_t w = 0; w * 32 < V; ++w) {
      const int64_t lo = w * 32, n = std::min<int64_t>(32, V - lo);
      const uint32_t word = m[w];
      if (word == 0xFFFFFFFFu) {  // all allowed (rows without a grammar, most of a string's)
        std::copy(s + lo, s + lo + n, d + lo);
      } else if (word == 0) {
        std::fill(d + lo, d + lo + n, minus_inf);
      } else {
        for (int64_t j = 0; j < n; ++j) d[lo + j] = (word >> j) & 1u ? s[lo + j] : minus_inf;
      }
    }
  });
  return out;
}

}  // namespace mistral7b
