// One pass of torch.optim's single-tensor Adam/AdamW update over a float32
// parameter, bit for bit the eager update as plait's optimizer rows write it
// (frontend/optimizers.py):
//
//   p  = p * decay                                  (mul_, decay = 1 - lr*wd; 1 without)
//   m  = lerp(m, g, w)                              (lerp_: ATen's fmadd form)
//   v  = v * b2;  v = fma(c2 * g, g, v)             (mul_, addcmul_: ATen's fused form)
//   d  = sqrt(v) / bc2_sqrt + eps                   (sqrt: ATen's own kernel, see below)
//   p  = p + (neg_step_size * m) / d                (addcdiv_)
//
// Eager runs these as eight kernels, each a pass over memory; here they run
// block by block while the block is in cache. ATen's float sqrt is not the
// correctly rounded one (it differs from std::sqrt in the last bit on about a
// fifth of the values), so each block's sqrt is ATen's kernel itself.
// Build with -ffp-contract=off: every other operation rounds as written.
#include <torch/python.h>  // (not torch/extension.h: the C++ frontend takes seconds to parse)
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

namespace {

constexpr int64_t kBlock = 16384;  // floats: a block of p, m, v, g and d fits in L2

void update_block(float* p, float* m, float* v, const float* g, float* d, int64_t n,
                  float decay, float w, float b2, float c2, float bc, float eps, float nss) {
  const bool small = std::abs(w) < 0.5f;  // ATen's lerp: weight or weight - 1, from start or end
  const float coeff = small ? w : w - 1.0f;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float gi = g[i];
    const float mi = m[i];
    m[i] = std::fma(coeff, gi - mi, small ? mi : gi);
    v[i] = std::fma(c2 * gi, gi, v[i] * b2);
    p[i] = p[i] * decay;
  }
  at::Tensor vs = at::from_blob(v, {n}, at::kFloat);
  at::Tensor ds = at::from_blob(d, {n}, at::kFloat);
  at::sqrt_out(ds, vs);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float di = d[i] / bc + eps;
    p[i] = p[i] + (nss * m[i]) / di;
  }
}

}  // namespace

void adam_update(at::Tensor p, at::Tensor m, at::Tensor v, const at::Tensor& g, double decay,
                 double w, double b2, double c2, double bc, double eps, double nss) {
  const int64_t n = p.numel();
  float* pp = p.data_ptr<float>();
  float* mp = m.data_ptr<float>();
  float* vp = v.data_ptr<float>();
  const float* gp = g.data_ptr<float>();
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    std::vector<float> d(kBlock);
    for (int64_t b = first; b < last; ++b) {
      const int64_t s = b * kBlock;
      const int64_t len = std::min(kBlock, n - s);
      update_block(pp + s, mp + s, vp + s, gp + s, d.data(), len, decay, w, b2, c2, bc, eps,
                   nss);
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("adam_update", &adam_update);
}
