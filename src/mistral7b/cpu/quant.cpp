// Weight-only quantized matmuls on a layout this project owns (model/quantize.py), for every CPU capability.
//
// int4: qweight uint8 [N, K / 2]; per block of 32 weights of a row, 16 bytes read as 8 little-endian 16-bit
// words, word j holding weights j, j + 8, j + 16 and j + 24 in its nibbles from the lowest up. A 128-bit load
// broadcast to every 128-bit lane of a register, each lane L shifted right by 4 L and masked to 4 bits, gives
// the block's 32 weights as int16 in their natural order, with no shuffle (unpacking GGUF's byte order needs
// two a block, and that was the kernel's bottleneck: 55 against 41 us for a 3072 x 576 matrix). scales and mins
// float16 [N, K / G] for groups of G (a multiple of 32): w = q * scale + min, in float32. q * scale has at most
// 15 significant bits, so it is exact and w is the same float whichever way it is summed: GGUF's Q4_1
// (min = m) and Q4_0 (min = -8 d) dequantize to gguf-py's floats exactly.
// int8: weight int8 [N, K] with a float16 scale per block of 32 weights of a row, [N, K / 32]: w = q * scale,
// GGUF's Q8_0 exactly.
//
// A few rows of activations (a decode step) are multiplied without dequantizing: each row is quantized to int16
// per block of 32 (step = max |x| / 32767, so each value is within step / 2 of x, ~1.5e-5 of the block's
// largest), and the weights' small integers meet it in integer multiply-adds (vpmaddwd, exact), one float
// multiply-add per block applying scale * step; int4's min term is min * sum(x) over the rounded x. The error
// against the float matmul on the same dequantized weights is that of the int16 rounding alone: far below the
// bfloat16 rounding of activations (3.9e-3). Many rows (a pre-fill chunk) go through int4_dequantize and a dense
// matmul instead (model/quantize.py chooses), which is the float reference's exact arithmetic.

#include "ops.h"

#include "threads.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace mistral7b {
namespace {

constexpr int64_t kBlock = 32;  // activations are quantized per 32 values; int4 groups are multiples of it

struct Activations {
  int64_t M = 0, K = 0, G = 0;
  std::vector<int16_t> q;    // [M, K]
  std::vector<float> step;   // [M, K / 32]
  std::vector<float> sums;   // [M, K / G]: sums of the rounded x over each weight group (int4's min term)
};

template <typename T>
inline float to_float(T v) { return static_cast<float>(v); }

// One block of 32 values of x to int16: q = round(x / step) with step = max |x| / 32767 (round half to even,
// as nearbyint in the default rounding mode, which the vector conversions use too).
template <typename T>
void quantize_block(const T* x, int16_t* q, float* step) {
  float v[kBlock];
  float amax = 0.f;
  for (int i = 0; i < kBlock; ++i) {
    v[i] = to_float(x[i]);
    amax = std::max(amax, std::fabs(v[i]));
  }
  const float inv = amax > 0.f ? 32767.f / amax : 0.f;
  *step = amax / 32767.f;
  for (int i = 0; i < kBlock; ++i)
    q[i] = static_cast<int16_t>(std::max(-32767.f, std::min(32767.f, std::nearbyint(v[i] * inv))));
}

template <typename T>
Activations quantize(const T* x, int64_t M, int64_t K, int64_t G) {
  Activations a;
  a.M = M, a.K = K, a.G = G;
  const int64_t nb = K / kBlock;
  a.q.resize(M * K);
  a.step.resize(M * nb);
  if (G > 0) a.sums.assign(M * (K / G), 0.f);
  for (int64_t i = 0; i < M * nb; ++i) quantize_block(x + i * kBlock, a.q.data() + i * kBlock, &a.step[i]);
  // x's sums per group from the rounded values, as the q . x term sees them: the min term's rounding error then
  // cancels the q term's offset (q is 0..15), and the result's error is that of sum(w * (x_rounded - x)) alone
  // (half of what x's exact sums gave for random Q4 weights)
  if (G > 0)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t b = 0; b < nb; ++b) {
        const int16_t* q = a.q.data() + (m * nb + b) * kBlock;
        int32_t sum = 0;
        for (int j = 0; j < kBlock; ++j) sum += q[j];
        a.sums[m * (K / G) + b * kBlock / G] += static_cast<float>(sum) * a.step[m * nb + b];
      }
  return a;
}

// The float16 scales of a row as float32.
inline void halves_to_floats(const c10::Half* h, float* f, int64_t n) {
  int64_t i = 0;
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(f + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
#endif
  for (; i < n; ++i) f[i] = static_cast<float>(h[i]);
}

// Per capability: Acc, a float32 accumulator vector; WVec, a block's 32 weights as int16; and
//   acc_block(acc, w, x, scale): acc + float(w . x pairwise, exact int32) * *scale (a broadcast from memory)
//   acc_dot(acc, halves, floats, n): acc + the products of n float16 and float32 values, spread over its lanes
//   acc_sum(acc): the sum of its lanes; acc_sum4(a, out): the sums of four accumulators at once.
#if defined(CPU_CAPABILITY_AVX512)
using Acc = __m512;
using WVec = __m512i;
inline Acc acc_zero() { return _mm512_setzero_ps(); }
inline WVec unpack_int4(const uint8_t* p) {
  const __m512i v = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m512i shifts = _mm512_set_epi64(0x000C000C000C000CLL, 0x000C000C000C000CLL, 0x0008000800080008LL,
                                          0x0008000800080008LL, 0x0004000400040004LL, 0x0004000400040004LL, 0, 0);
  return _mm512_and_si512(_mm512_srlv_epi16(v, shifts), _mm512_set1_epi16(0x000F));
}
inline WVec unpack_int8(const int8_t* p) {
  return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline Acc acc_block(Acc acc, WVec w, const int16_t* x, const float* scale) {
  const __m512i p = _mm512_madd_epi16(w, _mm512_loadu_si512(x));
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_set1_ps(*scale), acc);
}
inline Acc acc_dot(Acc acc, const c10::Half* h, const float* f, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    acc = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + i))),
                          _mm512_loadu_ps(f + i), acc);
  if (i < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
    acc = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, h + i)), _mm512_maskz_loadu_ps(m, f + i), acc);
  }
  return acc;
}
inline void acc_sum4(const Acc* a, float* out) {  // out[j] = acc_sum(a[j]), by a tree of horizontal adds
  __m256 r[4];
  for (int j = 0; j < 4; ++j) r[j] = _mm256_add_ps(_mm512_castps512_ps256(a[j]), _mm512_extractf32x8_ps(a[j], 1));
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(r[0], r[1]), _mm256_hadd_ps(r[2], r[3]));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
}
inline void scale_products(const c10::Half* h, const float* f, float* out, int64_t n) {  // out = h * f
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + i))),
                                            _mm512_loadu_ps(f + i)));
  if (i < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, h + i)),
                                                    _mm512_maskz_loadu_ps(m, f + i)));
  }
}
#elif defined(CPU_CAPABILITY_AVX2)
using Acc = __m256;
struct WVec { __m256i lo, hi; };  // weights 0..15 and 16..31
inline Acc acc_zero() { return _mm256_setzero_ps(); }
inline WVec unpack_int4(const uint8_t* p) {  // 32-bit shifts: the bits they carry across words are masked off
  const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i mask = _mm256_set1_epi16(0x000F);
  return {_mm256_and_si256(_mm256_srlv_epi32(v, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)), mask),
          _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_setr_epi32(8, 8, 8, 8, 12, 12, 12, 12)), mask)};
}
inline WVec unpack_int8(const int8_t* p) {
  return {_mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
          _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16)))};
}
inline Acc acc_block(Acc acc, const WVec& w, const int16_t* x, const float* scale) {
  const __m256i* xv = reinterpret_cast<const __m256i*>(x);
  const __m256i p = _mm256_add_epi32(_mm256_madd_epi16(w.lo, _mm256_loadu_si256(xv)),
                                     _mm256_madd_epi16(w.hi, _mm256_loadu_si256(xv + 1)));
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_broadcast_ss(scale), acc);
}
inline Acc acc_dot(Acc acc, const c10::Half* h, const float* f, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))),
                          _mm256_loadu_ps(f + i), acc);
  if (i < n) {  // the last 1..7 products in lane 0
    float tail = 0.f;
    for (; i < n; ++i) tail += _cvtsh_ss(reinterpret_cast<const uint16_t*>(h)[i]) * f[i];
    acc = _mm256_add_ps(acc, _mm256_set_ps(0, 0, 0, 0, 0, 0, 0, tail));
  }
  return acc;
}
inline void acc_sum4(const Acc* a, float* out) {  // out[j] = acc_sum(a[j]), by a tree of horizontal adds
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
}
inline void scale_products(const c10::Half* h, const float* f, float* out, int64_t n) {  // out = h * f
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))),
                                            _mm256_loadu_ps(f + i)));
  for (; i < n; ++i) out[i] = static_cast<float>(h[i]) * f[i];
}
#else  // portable C++: exact integer sums per block, the compiler vectorises what it can
using Acc = float;
struct WVec { int16_t v[kBlock]; };
inline Acc acc_zero() { return 0.f; }
inline WVec unpack_int4(const uint8_t* p) {
  WVec w;
  for (int j = 0; j < 8; ++j) {
    const int word = p[2 * j] | p[2 * j + 1] << 8;
    for (int L = 0; L < 4; ++L) w.v[8 * L + j] = (word >> (4 * L)) & 15;
  }
  return w;
}
inline WVec unpack_int8(const int8_t* p) {
  WVec w;
  for (int j = 0; j < kBlock; ++j) w.v[j] = p[j];
  return w;
}
inline Acc acc_block(Acc acc, const WVec& w, const int16_t* x, const float* scale) {
  int32_t sum = 0;
  for (int j = 0; j < kBlock; ++j) sum += int32_t(w.v[j]) * int32_t(x[j]);
  return acc + static_cast<float>(sum) * *scale;
}
inline Acc acc_dot(Acc acc, const c10::Half* h, const float* f, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc += static_cast<float>(h[i]) * f[i];
  return acc;
}
inline void acc_sum4(const Acc* a, float* out) {
  for (int j = 0; j < 4; ++j) out[j] = a[j];
}
inline void scale_products(const c10::Half* h, const float* f, float* out, int64_t n) {  // out = h * f
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(h[i]) * f[i];
}
#endif

// One accumulator's sum in acc_sum4's order: a row's result does not depend on where it falls in a tile, so
// the same weight row and activation row give the same bits in any batch.
inline float acc_sum(Acc a) {
  const Acc four[4] = {a, a, a, a};
  float out[4];
  acc_sum4(four, out);
  return out[0];
}

constexpr int64_t kMaxBlocks = 512;  // blocks of 32 in a row: in_features up to 16384

// Weight rows as int4_linear and int8_linear store them (the file's header). block_scales(n, a, m, out): the
// per-block factors scale * step of weight row n and activation row m; finish adds int4's min term.
struct Int4Rows {
  const uint8_t* w;
  const c10::Half* scales;
  const c10::Half* mins;
  int64_t K, groups, shift;  // block b's group: b >> shift
  WVec unpack(int64_t n, int64_t b) const { return unpack_int4(w + n * (K / 2) + b * (kBlock / 2)); }
  void block_scales(int64_t n, const Activations& a, int64_t m, float* out) const {
    const int64_t nb = K / kBlock;
    const c10::Half* s = scales + n * groups;
    const float* step = a.step.data() + m * nb;
    if (shift == 0) return scale_products(s, step, out, nb);  // groups of 32: one scale a block
    float sf[kMaxBlocks];
    halves_to_floats(s, sf, groups);
    for (int64_t b = 0; b < nb; ++b) out[b] = sf[b >> shift] * step[b];
  }
  Acc finish(Acc acc, int64_t n, const Activations& a, int64_t m) const {
    return acc_dot(acc, mins + n * groups, a.sums.data() + m * groups, groups);
  }
};

struct Int8Rows {
  const int8_t* w;
  const c10::Half* scales;
  int64_t K;
  WVec unpack(int64_t n, int64_t b) const { return unpack_int8(w + n * K + b * kBlock); }
  void block_scales(int64_t n, const Activations& a, int64_t m, float* out) const {
    const int64_t nb = K / kBlock;
    scale_products(scales + n * nb, a.step.data() + m * nb, out, nb);
  }
  Acc finish(Acc acc, int64_t, const Activations&, int64_t) const { return acc; }
};

// y[m0 .. m0 + R, n0 .. n0 + NR] = activation rows times weight rows: NR * R independent accumulators, so the
// float multiply-adds of consecutive blocks do not wait on each other.
template <int NR, int R, typename W, typename T>
void tile(const W& w, const Activations& a, int64_t n0, int64_t m0, T* y, int64_t N) {
  const int64_t nb = a.K / kBlock;
  alignas(64) float scale[NR][R][kMaxBlocks];
  for (int nr = 0; nr < NR; ++nr)
    for (int r = 0; r < R; ++r) w.block_scales(n0 + nr, a, m0 + r, scale[nr][r]);
  const int16_t* xq[R];
  for (int r = 0; r < R; ++r) xq[r] = a.q.data() + (m0 + r) * a.K;
  Acc acc[NR][R];
  for (int nr = 0; nr < NR; ++nr)
    for (int r = 0; r < R; ++r) acc[nr][r] = acc_zero();
  for (int64_t b = 0; b < nb; ++b)
    for (int nr = 0; nr < NR; ++nr) {
      const WVec wv = w.unpack(n0 + nr, b);
      for (int r = 0; r < R; ++r) acc[nr][r] = acc_block(acc[nr][r], wv, xq[r] + b * kBlock, &scale[nr][r][b]);
    }
  Acc done[NR * R];
  for (int nr = 0; nr < NR; ++nr)
    for (int r = 0; r < R; ++r) done[nr * R + r] = w.finish(acc[nr][r], n0 + nr, a, m0 + r);
  float sums[NR * R + 3];
  int j = 0;
  for (; j + 4 <= NR * R; j += 4) acc_sum4(done + j, sums + j);
  for (; j < NR * R; ++j) sums[j] = acc_sum(done[j]);
  for (int nr = 0; nr < NR; ++nr)
    for (int r = 0; r < R; ++r) y[(m0 + r) * N + n0 + nr] = static_cast<T>(sums[nr * R + r]);
}

// All of y [M, N], weight rows split into tasks across threads (threads.h): 4 weight rows a pass for one
// activation row, 2 for two, one for more (then up to 4 activation rows a pass share each unpacked block).
template <typename W, typename T>
void matmul(const W& w, const Activations& a, int64_t N, T* y) {
  const int64_t M = a.M;
  const int64_t NR = M == 1 ? 4 : (M == 2 ? 2 : 1);
  const int64_t passes = (N + NR - 1) / NR;
  // tasks of at least ~16K weights x rows, about 8 a thread
  const int64_t per_task = std::max<int64_t>(std::max<int64_t>(1, 16384 / std::max<int64_t>(a.K * M, 1)),
                                             passes / (8 * std::max(1, at::get_num_threads())));
  parallel_for((passes + per_task - 1) / per_task, [&](int64_t task) {
    for (int64_t i = task * per_task; i < std::min(passes, (task + 1) * per_task); ++i) {
      const int64_t n0 = i * NR;
      if (NR == 4 && n0 + 4 <= N) {
        tile<4, 1>(w, a, n0, 0, y, N);
      } else if (NR == 2 && n0 + 2 <= N) {
        tile<2, 2>(w, a, n0, 0, y, N);
      } else {
        for (int64_t n = n0; n < std::min(n0 + NR, N); ++n)
          for (int64_t m0 = 0; m0 < M; m0 += 4) {
            switch (std::min<int64_t>(4, M - m0)) {
              case 1: tile<1, 1>(w, a, n, m0, y, N); break;
              case 2: tile<1, 2>(w, a, n, m0, y, N); break;
              case 3: tile<1, 3>(w, a, n, m0, y, N); break;
              default: tile<1, 4>(w, a, n, m0, y, N); break;
            }
          }
      }
    }
  });
}

void check_x(const at::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) == K, "x: contiguous [M, ", K, "]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x: float32 or bfloat16");
}

void check_int4(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& mins) {
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kByte && qweight.is_contiguous(),
              "qweight: contiguous uint8 [N, K / 2]");
  const int64_t N = qweight.size(0), K = 2 * qweight.size(1);
  TORCH_CHECK(K % kBlock == 0 && K / kBlock <= kMaxBlocks, "in_features must be a multiple of 32, at most 16384");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && mins.scalar_type() == at::kHalf && scales.is_contiguous() &&
                  mins.is_contiguous() && scales.dim() == 2 && scales.sizes() == mins.sizes() && scales.size(0) == N,
              "scales, mins: contiguous float16 [N, K / group]");
  const int64_t groups = scales.size(1);
  TORCH_CHECK(groups > 0 && K % groups == 0 && (K / groups) % kBlock == 0, "group size must be a multiple of 32");
}

template <typename T>
at::Tensor int4_linear_t(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                         const at::Tensor& mins) {
  const int64_t M = x.size(0), N = qweight.size(0), K = 2 * qweight.size(1), groups = scales.size(1);
  const int64_t G = K / groups, shift = __builtin_ctzll(G / kBlock);
  TORCH_CHECK((G / kBlock) == (int64_t(1) << shift), "group size must be 32 times a power of two");
  const Activations a = quantize(x.data_ptr<T>(), M, K, G);
  auto y = at::empty({M, N}, x.options());
  const Int4Rows w{qweight.data_ptr<uint8_t>(), scales.data_ptr<c10::Half>(), mins.data_ptr<c10::Half>(), K,
                   groups, shift};
  matmul(w, a, N, y.data_ptr<T>());
  return y;
}

template <typename T>
at::Tensor int8_linear_t(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales) {
  const int64_t M = x.size(0), N = weight.size(0), K = weight.size(1);
  const Activations a = quantize(x.data_ptr<T>(), M, K, 0);
  auto y = at::empty({M, N}, x.options());
  matmul(Int8Rows{weight.data_ptr<int8_t>(), scales.data_ptr<c10::Half>(), K}, a, N, y.data_ptr<T>());
  return y;
}

}  // namespace

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                       const at::Tensor& mins) {
  check_int4(qweight, scales, mins);
  check_x(x, 2 * qweight.size(1));
  return x.scalar_type() == at::kFloat ? int4_linear_t<float>(x, qweight, scales, mins)
                                       : int4_linear_t<bf16>(x, qweight, scales, mins);
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar && weight.is_contiguous(),
              "weight: contiguous int8 [N, K]");
  TORCH_CHECK(weight.size(1) % kBlock == 0 && weight.size(1) / kBlock <= kMaxBlocks,
              "in_features must be a multiple of 32, at most 16384");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous() && scales.dim() == 2 &&
                  scales.size(0) == weight.size(0) && scales.size(1) == weight.size(1) / kBlock,
              "scales: contiguous float16 [N, K / 32]");
  check_x(x, weight.size(1));
  return x.scalar_type() == at::kFloat ? int8_linear_t<float>(x, weight, scales)
                                       : int8_linear_t<bf16>(x, weight, scales);
}

template <typename T>
inline void store(T* out, float v) { *out = static_cast<T>(v); }

// The float weights [N, K] in `dtype` (float32, or bfloat16 rounded from the float32 values).
at::Tensor int4_dequantize(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& mins,
                           at::ScalarType dtype) {
  check_int4(qweight, scales, mins);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "dtype: float32 or bfloat16");
  const int64_t N = qweight.size(0), K = 2 * qweight.size(1), groups = scales.size(1), G = K / groups;
  auto out = at::empty({N, K}, qweight.options().dtype(dtype));
  const uint8_t* w = qweight.data_ptr<uint8_t>();
  const c10::Half* sc = scales.data_ptr<c10::Half>();
  const c10::Half* mn = mins.data_ptr<c10::Half>();
  auto run = [&](auto* o) {
    const int64_t rows = std::max<int64_t>(1, 65536 / K);  // rows a task
    parallel_for((N + rows - 1) / rows, [&](int64_t task) {
      std::vector<float> s(groups), m(groups);
      for (int64_t n = task * rows; n < std::min(N, (task + 1) * rows); ++n) {
        halves_to_floats(sc + n * groups, s.data(), groups);
        halves_to_floats(mn + n * groups, m.data(), groups);
        const uint8_t* wr = w + n * (K / 2);
        auto* orow = o + n * K;
        for (int64_t k0 = 0; k0 < K; k0 += kBlock) {
          const float d = s[k0 / G], mi = m[k0 / G];
          const uint8_t* p = wr + k0 / 2;
          for (int j = 0; j < 8; ++j) {  // q * d is exact, so this is the one rounding of q * d + mi
            const int word = p[2 * j] | p[2 * j + 1] << 8;
            for (int L = 0; L < 4; ++L) store(orow + k0 + 8 * L + j, static_cast<float>((word >> (4 * L)) & 15) * d + mi);
          }
        }
      }
    });
  };
  if (dtype == at::kFloat)
    run(out.data_ptr<float>());
  else
    run(out.data_ptr<bf16>());
  return out;
}

}  // namespace mistral7b
