// Fused Adam-mini step for CPU (fp32): one pass over each block.
//
// A block is `bs` consecutive elements of a contiguous tensor. For each block the
// kernel sums g*g (the block stays in cache), updates the block's second moment,
// then updates m and p in a second sweep over the same, cache-resident, elements:
// memory traffic is ~20 bytes per parameter (g, m, p read; m, p written),
// against ~28 for AdamW.
//
// The arithmetic follows torch's foreach step operation by operation (lerp as an
// FMA, mul/add, sqrt/div/add, mul + addcdiv), compiled without other
// floating-point contraction. Per-element blocks are not handled here: torch's
// vectorised float32 sqrt is not correctly rounded, so only torch's own ops
// reproduce AdamW bit for bit, and the foreach path does that.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>  // std::fma, std::sqrt
#include <vector>

namespace {

inline float lerp_(float self, float end, float w) {
  // torch's vectorised CPU lerp: fmadd(w, end - self, self), or fmadd(w - 1, end - self, end)
  return (std::abs(w) < 0.5f) ? std::fma(w, end - self, self) : std::fma(w - 1.0f, end - self, end);
}

}  // namespace

// chunks: int64 [C, 6] = (param index, element offset, number of blocks, block size >= 2, v offset, unused)
// scalars: float64 [P, 3] = (step size lr / bc1, sqrt(bc2), decay factor 1 - lr * wd)
void adam_mini_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                    const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& vs,
                    const at::Tensor& chunks, const at::Tensor& scalars, double beta1, double beta2,
                    double eps, bool maximize) {
  TORCH_CHECK(chunks.dtype() == at::kLong && chunks.is_contiguous() && chunks.dim() == 2 && chunks.size(1) == 6);
  TORCH_CHECK(scalars.dtype() == at::kDouble && scalars.is_contiguous());
  const int64_t C = chunks.size(0);
  const int64_t* cp = chunks.data_ptr<int64_t>();
  const double* sp = scalars.data_ptr<double>();
  std::vector<float*> P, M, V;
  std::vector<const float*> G;
  for (size_t i = 0; i < params.size(); ++i) {
    P.push_back(params[i].data_ptr<float>());
    G.push_back(grads[i].data_ptr<float>());
    M.push_back(exp_avgs[i].data_ptr<float>());
    V.push_back(vs[i].data_ptr<float>());
  }
  // 1 - beta in double: in float, 1 - 0.999f cancels to 0.00099998713 (1.3e-5 off)
  const float w1 = (float)(1.0 - beta1);
  const float b2 = (float)beta2, omb2 = (float)(1.0 - beta2), epsf = (float)eps;
  const float sign = maximize ? -1.0f : 1.0f;

  at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t* row = cp + 6 * c;
      const int64_t pi = row[0], off = row[1], nb = row[2], bs = row[3], voff = row[4];
      float* p = P[pi] + off;
      const float* g = G[pi] + off;
      float* m = M[pi] + off;
      float* v = V[pi] + voff;
      const float ss = (float)sp[3 * pi], bc2s = (float)sp[3 * pi + 1], decay = (float)sp[3 * pi + 2];
      for (int64_t j = 0; j < nb; ++j) {
        const float* gb = g + j * bs;
        float* pb = p + j * bs;
        float* mb = m + j * bs;
        double acc = 0.0;  // double: a float sum over thousands of squares loses ~n*eps
#pragma omp simd reduction(+ : acc)
        for (int64_t i = 0; i < bs; ++i) acc += (double)gb[i] * (double)gb[i];
        const float vv = v[j] * b2 + omb2 * (float)(acc / (double)bs);
        v[j] = vv;
        const float denom = std::sqrt(vv) / bc2s + epsf;
#pragma omp simd
        for (int64_t i = 0; i < bs; ++i) {
          const float mm = lerp_(mb[i], sign * gb[i], w1);
          mb[i] = mm;
          pb[i] = pb[i] * decay + (-ss) * (mm / denom);
        }
      }
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("adam_mini_step", &adam_mini_step, "fused Adam-mini step (fp32, CPU)");
}
