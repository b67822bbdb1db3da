// y = x @ W^T for a GQSA weight: each output row keeps `kept` groups of G
// consecutive input features, stored as 4-bit values plus 8 (byte i of a group
// holds feature i in its low nibble and feature i + G/2 in its high nibble, so
// both halves read x contiguously and the loops vectorize), one scale per
// group, and the group's block column. Also the dense rows prefills multiply
// with: of a GQSA weight, and of plait::quant_linear's int8/int4 weights.
#include <torch/python.h>  // (not torch/extension.h: the C++ frontend takes seconds to parse)
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
// 16 features of one group: 8 bytes -> low and high nibbles -> floats, times x
static inline __m256 group16(const uint8_t* v, const float* xb, __m256 acc, float s) {
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(v));
  const __m128i mask = _mm_set1_epi8(15);
  const __m256 eight = _mm256_set1_ps(8.f);
  const __m256 lo = _mm256_sub_ps(
      _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(bytes, mask))), eight);
  const __m256 hi = _mm256_sub_ps(
      _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(bytes, 4), mask))),
      eight);
  const __m256 dot = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xb + 8), _mm256_mul_ps(lo, _mm256_loadu_ps(xb)));
  return _mm256_fmadd_ps(_mm256_set1_ps(s), dot, acc);
}
#endif

#if defined(__AVX512F__)
// G = 16 with AVX-512: a group is one register (lanes 0-7 the low nibbles,
// features 0-7; 8-15 the high ones), unpacked and scaled once per tile of up
// to 16 tokens and multiplied into one accumulator per token (32 registers),
// so at 2-16 tokens each kept group is decoded once, not once per token
static inline __m512 group16x(const uint8_t* v, float s) {
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(v));
  const __m128i mask = _mm_set1_epi8(15);
  const __m128i nibbles =
      _mm_unpacklo_epi64(_mm_and_si128(bytes, mask), _mm_and_si128(_mm_srli_epi16(bytes, 4), mask));
  const __m512 u = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(nibbles));
  return _mm512_fmadd_ps(u, _mm512_set1_ps(s), _mm512_set1_ps(-8.f * s));  // (u - 8) s
}

// xt: the activations as [in / 16, tokens, 16], from the tile's first token
// (a block's features for all tokens side by side: one run of loads per group)
template <int N, typename Sc, typename Bl>
static void tile16(const float* xt, const uint8_t* values, const Sc* scales, const Bl* blocks,
                   float* y, int64_t tokens, int64_t out, int64_t kept,
                   int64_t o) {
  __m512 acc[N];
  for (int i = 0; i < N; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t j = o * kept; j < (o + 1) * kept; ++j) {
    const __m512 w = group16x(values + j * 8, static_cast<float>(scales[j]));
    const float* xb = xt + static_cast<int64_t>(blocks[j]) * tokens * 16;
    for (int i = 0; i < N; ++i) acc[i] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xb + i * 16), acc[i]);
  }
  for (int i = 0; i < N; ++i) y[i * out + o] = _mm512_reduce_add_ps(acc[i]);
}

template <typename Sc, typename Bl>
static void rows16(const float* xt, const uint8_t* values, const Sc* scales, const Bl* blocks,
                   float* y, int64_t tokens, int64_t out, int64_t kept,
                   int64_t begin, int64_t end) {
  using Tile = void (*)(const float*, const uint8_t*, const Sc*, const Bl*, float*,
                        int64_t, int64_t, int64_t, int64_t);
  static constexpr Tile tiles[] = {
      tile16<1, Sc, Bl>,  tile16<2, Sc, Bl>,  tile16<3, Sc, Bl>,  tile16<4, Sc, Bl>,
      tile16<5, Sc, Bl>,  tile16<6, Sc, Bl>,  tile16<7, Sc, Bl>,  tile16<8, Sc, Bl>,
      tile16<9, Sc, Bl>,  tile16<10, Sc, Bl>, tile16<11, Sc, Bl>, tile16<12, Sc, Bl>,
      tile16<13, Sc, Bl>, tile16<14, Sc, Bl>, tile16<15, Sc, Bl>, tile16<16, Sc, Bl>};
  for (int64_t o = begin; o < end; ++o) {
    for (int64_t t = 0; t < tokens; t += 16) {
      tiles[std::min<int64_t>(16, tokens - t) - 1](xt + t * 16, values, scales, blocks,
                                                   y + t * out, tokens, out, kept, o);
    }
  }
}
#endif

template <int G, typename Sc, typename Bl>
static void rows(const float* x, const uint8_t* values, const Sc* scales, const Bl* blocks,
                 float* y, int64_t tokens, int64_t in, int64_t out,
                 int64_t kept, int64_t begin, int64_t end) {
  constexpr int H = G / 2;
  for (int64_t o = begin; o < end; ++o) {
    for (int64_t t = 0; t < tokens; ++t) {
      const float* xr = x + t * in;
      float acc = 0.f;
      int64_t j = 0;
#if defined(__AVX2__) && defined(__FMA__)
      if constexpr (G == 16) {
        __m256 lanes = _mm256_setzero_ps();
        for (; j < kept; ++j) {
          lanes = group16(values + (o * kept + j) * H,
                          xr + static_cast<int64_t>(blocks[o * kept + j]) * G, lanes,
                          static_cast<float>(scales[o * kept + j]));
        }
        alignas(32) float sums[8];
        _mm256_store_ps(sums, lanes);
        for (float v : sums) acc += v;
      }
#endif
      for (; j < kept; ++j) {  // portable path (and groups other than 16)
        const uint8_t* v = values + (o * kept + j) * H;
        const float* xb = xr + static_cast<int64_t>(blocks[o * kept + j]) * G;
        float partial = 0.f;
        for (int i = 0; i < H; ++i) {
          partial += static_cast<float>(static_cast<int>(v[i] & 15) - 8) * xb[i] +
                     static_cast<float>(static_cast<int>(v[i] >> 4) - 8) * xb[i + H];
        }
        acc += static_cast<float>(scales[o * kept + j]) * partial;
      }
      y[t * out + o] = acc;
    }
  }
}

// Scales and blocks as stored (float16, int16: 25% less to read per call than
// float32, int32) or widened; f(scales, blocks) with the matching pointers.
template <typename F>
static void with_layout(const torch::Tensor& scales, const torch::Tensor& blocks, F&& f) {
  if (scales.scalar_type() == torch::kHalf && blocks.scalar_type() == torch::kShort) {
    return f(scales.data_ptr<at::Half>(), blocks.data_ptr<int16_t>());
  }
  TORCH_CHECK(scales.scalar_type() == torch::kFloat && blocks.scalar_type() == torch::kInt,
              "scales and blocks [out, kept]: float16 and int16 (as stored), or float32 and int32");
  f(scales.data_ptr<float>(), blocks.data_ptr<int32_t>());
}

torch::Tensor gqsa_linear(torch::Tensor x, torch::Tensor values, torch::Tensor scales,
                          torch::Tensor blocks, int64_t group) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat, "x: float32 [tokens, in]");
  TORCH_CHECK(values.scalar_type() == torch::kUInt8 && values.dim() == 3 &&
                  values.size(2) * 2 == group, "values: uint8 [out, kept, group / 2]");
  x = x.contiguous();
  values = values.contiguous();
  scales = scales.contiguous();
  blocks = blocks.contiguous();
  const int64_t tokens = x.size(0), in = x.size(1), out = values.size(0), kept = values.size(1);
  TORCH_CHECK(blocks.numel() == 0 ||
                  (blocks.min().item<int64_t>() >= 0 && (blocks.max().item<int64_t>() + 1) * group <= in),
              "a block column is outside the input features");
  auto y = torch::empty({tokens, out}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* vp = values.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
#if defined(__AVX512F__)
  const auto xt = group == 16 && tokens > 1 ? x.view({tokens, in / 16, 16}).transpose(0, 1).contiguous() : x;
  const float* xtp = xt.data_ptr<float>();
#endif
  with_layout(scales, blocks, [&](const auto* sp, const auto* bp) {
    at::parallel_for(0, out, 16, [&](int64_t begin, int64_t end) {
      switch (group) {
        case 8: return rows<8>(xp, vp, sp, bp, yp, tokens, in, out, kept, begin, end);
        case 16:
#if defined(__AVX512F__)  // at one token AVX2's half-width decode is faster (measured)
          if (tokens > 1) return rows16(xtp, vp, sp, bp, yp, tokens, out, kept, begin, end);
#endif
          return rows<16>(xp, vp, sp, bp, yp, tokens, in, out, kept, begin, end);
        case 32: return rows<32>(xp, vp, sp, bp, yp, tokens, in, out, kept, begin, end);
        case 64: return rows<64>(xp, vp, sp, bp, yp, tokens, in, out, kept, begin, end);
        default: TORCH_CHECK(false, "group must be 8, 16, 32 or 64, not ", group);
      }
    });
  });
  return y;
}

// How a float is stored as T: bf16 by the bits, rounded to nearest even
// (c10::BFloat16's conversion checks for NaN per value, which keeps the loop
// scalar; the products here are finite)
template <typename T>
struct Store {
  using type = T;
  static type of(float v) { return static_cast<T>(v); }
};
template <>
struct Store<at::BFloat16> {
  using type = uint16_t;
  static uint16_t of(float v) {
    uint32_t u;
    std::memcpy(&u, &v, sizeof u);
    return static_cast<uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
  }
};

// __restrict__: int8 may alias anything, which would keep the loops scalar
template <typename T, typename S = typename Store<T>::type>
static inline void scale_int8(const int8_t* __restrict__ q, float s, int64_t n, S* __restrict__ o) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) o[i] = Store<T>::of(static_cast<float>(q[i]) * s);
}

// byte i holds columns 2i (low nibble) and 2i + 1, each + 8
template <typename T, typename S = typename Store<T>::type>
static inline void scale_int4(const uint8_t* __restrict__ q, float s, int64_t n, S* __restrict__ o) {
#pragma omp simd
  for (int64_t i = 0; i < n / 2; ++i) {
    o[2 * i] = Store<T>::of(static_cast<float>((q[i] & 15) - 8) * s);
    o[2 * i + 1] = Store<T>::of(static_cast<float>((q[i] >> 4) - 8) * s);
  }
}

// plait::quant_linear's prefill (quant_linear.py has the storage layout):
// rows [begin, end) of an int8 or packed int4 weight, times their scales
// [out, groups] rounded to T first (as q.to(T) * scales.to(T) computes), into
// `out` [end - begin, in] of T; with T = int8 the values unscaled. One pass
// where torch ops take several, each through memory.
template <typename T>
static void dequantize_block(const torch::Tensor& qweight, const float* scales, int64_t bits,
                             int64_t groups, int64_t begin, int64_t end, T* out) {
  const int64_t in = qweight.size(1) * (bits == 4 ? 2 : 1), size = in / groups;
  const uint8_t* q4 = bits == 4 ? qweight.data_ptr<uint8_t>() : nullptr;
  const int8_t* q8 = bits == 8 ? qweight.data_ptr<int8_t>() : nullptr;
  at::parallel_for(begin, end, 16, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      for (int64_t g = 0; g < groups; ++g) {
        const float s = scales ? static_cast<float>(static_cast<T>(scales[r * groups + g])) : 1.f;
        const int64_t c = r * in + g * size;  // the group's first element
        auto* o = reinterpret_cast<typename Store<T>::type*>(out + c - begin * in);
        if (q8) {
          scale_int8<T>(q8 + c, s, size, o);
        } else {
          scale_int4<T>(q4 + c / 2, s, size, o);
        }
      }
    }
  });
}

void dequantize_rows(torch::Tensor qweight, torch::Tensor scales, int64_t bits, int64_t begin,
                     int64_t end, torch::Tensor out) {
  TORCH_CHECK(qweight.dim() == 2 && qweight.is_contiguous() && out.is_contiguous(),
              "qweight and out: contiguous");
  TORCH_CHECK((bits == 8 && qweight.scalar_type() == torch::kChar) ||
                  (bits == 4 && qweight.scalar_type() == torch::kByte),
              "qweight: int8 (8 bits) or uint8 (4 bits)");
  TORCH_CHECK(scales.scalar_type() == torch::kFloat && scales.is_contiguous() &&
                  scales.dim() == 2 && scales.size(0) == qweight.size(0),
              "scales: float32 [out, groups]");
  const int64_t in = qweight.size(1) * (bits == 4 ? 2 : 1), groups = scales.size(1);
  TORCH_CHECK(in % groups == 0 && (bits == 8 || (in / groups) % 2 == 0),
              "groups must divide the input features (int4: into even groups)");
  TORCH_CHECK(0 <= begin && begin <= end && end <= qweight.size(0) &&
                  out.numel() == (end - begin) * in, "rows outside the weight, or out's size");
  const float* sp = scales.data_ptr<float>();
  switch (out.scalar_type()) {
    case torch::kFloat: return dequantize_block(qweight, sp, bits, groups, begin, end, out.data_ptr<float>());
    case torch::kBFloat16:
      return dequantize_block(qweight, sp, bits, groups, begin, end, out.data_ptr<at::BFloat16>());
    case torch::kHalf: return dequantize_block(qweight, sp, bits, groups, begin, end, out.data_ptr<at::Half>());
    case torch::kChar:
      return dequantize_block<int8_t>(qweight, nullptr, bits, groups, begin, end, out.data_ptr<int8_t>());
    default: TORCH_CHECK(false, "out: float32, bfloat16, float16 or int8");
  }
}

// Rows [begin, end) of a GQSA weight as the dense [end - begin, in] of T, zero
// where pruned (the prefill's; gqsa.py's dense_weight in float32, cast to T).
#if defined(__AVX512F__)
// a decoded group of 16 (group16x) stored as float, or as bf16 rounded as Store does
static inline void store16(float* o, __m512 w) { _mm512_storeu_ps(o, w); }
static inline void store16(uint16_t* o, __m512 w) {
  const __m512i u = _mm512_castps_si512(w);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
}
#endif

template <typename T, int G, typename Sc, typename Bl>
static void densify_block(const uint8_t* values, const Sc* scales, const Bl* blocks,
                          int64_t in, int64_t kept, int64_t begin, int64_t end, T* out) {
  using S = typename Store<T>::type;
  constexpr int64_t half = G / 2;  // a compile-time trip count: the loop vectorizes
  at::parallel_for(begin, end, 16, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      S* row = reinterpret_cast<S*>(out) + (r - begin) * in;
      std::memset(row, 0, in * sizeof(S));  // all-zero bits: 0.0 in every T
      for (int64_t j = r * kept; j < (r + 1) * kept; ++j) {
        const uint8_t* __restrict__ v = values + j * half;
        S* __restrict__ o = row + static_cast<int64_t>(blocks[j]) * G;
        const float s = static_cast<float>(scales[j]);
#if defined(__AVX512F__)
        if constexpr (G == 16 && !std::is_same_v<T, at::Half>) {
          store16(o, group16x(v, s));  // the loop below, 5x faster in bf16 (measured)
          continue;
        }
#endif
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          o[i] = Store<T>::of(static_cast<float>((v[i] & 15) - 8) * s);
          o[i + half] = Store<T>::of(static_cast<float>((v[i] >> 4) - 8) * s);
        }
      }
    }
  });
}

template <typename T, typename Sc, typename Bl>
static void densify_groups(const uint8_t* values, const Sc* scales, const Bl* blocks,
                           int64_t group, int64_t in, int64_t kept, int64_t begin, int64_t end,
                           T* out) {
  switch (group) {
    case 8: return densify_block<T, 8, Sc, Bl>(values, scales, blocks, in, kept, begin, end, out);
    case 16: return densify_block<T, 16, Sc, Bl>(values, scales, blocks, in, kept, begin, end, out);
    case 32: return densify_block<T, 32, Sc, Bl>(values, scales, blocks, in, kept, begin, end, out);
    case 64: return densify_block<T, 64, Sc, Bl>(values, scales, blocks, in, kept, begin, end, out);
    default: TORCH_CHECK(false, "group must be 8, 16, 32 or 64, not ", group);
  }
}

void densify_rows(torch::Tensor values, torch::Tensor scales, torch::Tensor blocks, int64_t group,
                  int64_t begin, int64_t end, torch::Tensor out) {
  TORCH_CHECK(values.scalar_type() == torch::kUInt8 && values.dim() == 3 &&
                  values.size(2) * 2 == group && values.is_contiguous(),
              "values: contiguous uint8 [out, kept, group / 2]");
  TORCH_CHECK(scales.is_contiguous() && blocks.is_contiguous() &&
                  scales.sizes() == blocks.sizes() && scales.size(0) == values.size(0) &&
                  scales.size(1) == values.size(1),
              "scales and blocks: contiguous [out, kept]");
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous() && out.size(0) == end - begin &&
                  0 <= begin && begin <= end && end <= values.size(0),
              "out: contiguous [end - begin, in], rows inside the weight");
  const int64_t in = out.size(1), kept = values.size(1);
  TORCH_CHECK(blocks.numel() == 0 ||
                  (blocks.min().item<int64_t>() >= 0 && (blocks.max().item<int64_t>() + 1) * group <= in),
              "a block column is outside the input features");
  const uint8_t* vp = values.data_ptr<uint8_t>();
  with_layout(scales, blocks, [&](const auto* sp, const auto* bp) {
    switch (out.scalar_type()) {
      case torch::kFloat:
        return densify_groups(vp, sp, bp, group, in, kept, begin, end, out.data_ptr<float>());
      case torch::kBFloat16:
        return densify_groups(vp, sp, bp, group, in, kept, begin, end, out.data_ptr<at::BFloat16>());
      case torch::kHalf:
        return densify_groups(vp, sp, bp, group, in, kept, begin, end, out.data_ptr<at::Half>());
      default: TORCH_CHECK(false, "out: float32, bfloat16 or float16");
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("densify_rows", &densify_rows);
  m.def("gqsa_linear", &gqsa_linear);
  m.def("dequantize_rows", &dequantize_rows);
}
