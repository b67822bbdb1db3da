// y = x @ W^T for a GQSA weight: each output row keeps `kept` groups of G
// consecutive input features, stored as 4-bit values plus 8 (byte i of a group
// holds feature i in its low nibble and feature i + G/2 in its high nibble, so
// both halves read x contiguously and the loops vectorize), one scale per
// group, and the group's block column.
#include <torch/extension.h>
#include <ATen/Parallel.h>

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

template <int G>
static void rows(const float* x, const uint8_t* values, const float* scales,
                 const int32_t* blocks, float* y, int64_t tokens, int64_t in, int64_t out,
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
                          scales[o * kept + j]);
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
        acc += scales[o * kept + j] * partial;
      }
      y[t * out + o] = acc;
    }
  }
}

torch::Tensor gqsa_linear(torch::Tensor x, torch::Tensor values, torch::Tensor scales,
                          torch::Tensor blocks, int64_t group) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat, "x: float32 [tokens, in]");
  TORCH_CHECK(values.scalar_type() == torch::kUInt8 && values.dim() == 3 &&
                  values.size(2) * 2 == group, "values: uint8 [out, kept, group / 2]");
  TORCH_CHECK(scales.scalar_type() == torch::kFloat && blocks.scalar_type() == torch::kInt,
              "scales: float32 [out, kept]; blocks: int32 [out, kept]");
  x = x.contiguous();
  values = values.contiguous();
  scales = scales.contiguous();
  blocks = blocks.contiguous();
  const int64_t tokens = x.size(0), in = x.size(1), out = values.size(0), kept = values.size(1);
  TORCH_CHECK(blocks.numel() == 0 ||
                  (blocks.min().item<int32_t>() >= 0 && (blocks.max().item<int32_t>() + 1) * group <= in),
              "a block column is outside the input features");
  auto y = torch::empty({tokens, out}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* vp = values.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  const int32_t* bp = blocks.data_ptr<int32_t>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, out, 16, [&](int64_t begin, int64_t end) {
    switch (group) {
      case 8: return rows<8>(xp, vp, sp, bp, yp, tokens, in, out, kept, begin, end);
      case 16: return rows<16>(xp, vp, sp, bp, yp, tokens, in, out, kept, begin, end);
      case 32: return rows<32>(xp, vp, sp, bp, yp, tokens, in, out, kept, begin, end);
      case 64: return rows<64>(xp, vp, sp, bp, yp, tokens, in, out, kept, begin, end);
      default: TORCH_CHECK(false, "group must be 8, 16, 32 or 64, not ", group);
    }
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("gqsa_linear", &gqsa_linear); }
