// Fused Adam-mini step for CPU (fp32): every parameter of a group in one call, one pass per block.
//
// A block is `bs` consecutive elements of a contiguous tensor. For each block the kernel sums
// g*g (a row or a head stays in L1/L2), updates the block's second moment, then updates m and p
// in a second sweep over the same, cache-resident, gradient: memory traffic is ~20 bytes per
// parameter (g, m, p read; m, p written), against ~28 for AdamW. Per-element blocks (biases) are
// plain Adam in the same loop nest, so one call covers a whole parameter group.
//
// Work is split by element count, not by item count: thread k takes the items whose first
// element falls in [k * total / T, (k + 1) * total / T), in memory order, so both cores stream.
// Step counters and bias corrections are handled here too, so Python does no per-parameter work.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

struct Scalars {
  float step_size;  // lr / (1 - beta1^t)
  float bc2_sqrt;   // sqrt(1 - beta2^t)
  float decay;      // 1 - lr * weight_decay, or 1
};

struct Item {  // a run of whole blocks of one parameter
  int64_t param, offset, blocks, block_size, v_offset, start;
};

struct Hyper {
  float w1, b2, omb2, eps, sign;
};

inline void elementwise(float* __restrict p, const float* __restrict g, float* __restrict m, float* __restrict v,
                        int64_t n, const Scalars& s, const Hyper& h) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float gi = h.sign * g[i];
    const float mm = std::fma(h.w1, gi - m[i], m[i]);
    const float vv = h.b2 * v[i] + h.omb2 * (gi * gi);
    m[i] = mm;
    v[i] = vv;
    const float denom = std::sqrt(vv) / s.bc2_sqrt + h.eps;
    p[i] = p[i] * s.decay - s.step_size * (mm / denom);
  }
}

inline double sum_sq(const float* __restrict g, int64_t n) {
  double acc = 0.0;  // double: a float sum over tens of thousands of squares loses ~n*eps
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += (double)g[i] * (double)g[i];
  return acc;
}

// Blocks of `bs` consecutive elements. Software-pipelined: the loop that updates block j also sums
// the squares of block j + 1, so g, m and p stream together (as in AdamW's single loop) while
// block j's gradient is re-read from cache. The sums are those of sum_sq, element for element.
inline void blockwise(float* __restrict p, const float* __restrict g, float* __restrict m, float* __restrict v,
                      int64_t nb, int64_t bs, const Scalars& s, const Hyper& h) {
  const double inv_bs = 1.0 / (double)bs;
  const float sg = h.sign, w1 = h.w1, decay = s.decay;
  double acc = sum_sq(g, bs);
  for (int64_t j = 0; j < nb; ++j) {
    const float* __restrict gb = g + j * bs;
    float* __restrict pb = p + j * bs;
    float* __restrict mb = m + j * bs;
    const float vv = h.b2 * v[j] + h.omb2 * (float)(acc * inv_bs);
    v[j] = vv;
    const float denom = std::sqrt(vv) / s.bc2_sqrt + h.eps;
    const float scale = s.step_size / denom;
    if (j + 1 < nb) {
      const float* __restrict gn = gb + bs;
      double next = 0.0;
#pragma omp simd reduction(+ : next)
      for (int64_t i = 0; i < bs; ++i) {
        next += (double)gn[i] * (double)gn[i];
        const float mm = std::fma(w1, sg * gb[i] - mb[i], mb[i]);
        mb[i] = mm;
        pb[i] = pb[i] * decay - scale * mm;
      }
      acc = next;
    } else {
#pragma omp simd
      for (int64_t i = 0; i < bs; ++i) {
        const float mm = std::fma(w1, sg * gb[i] - mb[i], mb[i]);
        mb[i] = mm;
        pb[i] = pb[i] * decay - scale * mm;
      }
    }
  }
}

}  // namespace

// items: int64 [C, 6] = (param index, element offset, blocks, block size, v offset, first element
//        counted over the whole table), in memory order; steps: 0-dim float32 tensors, incremented
//        here; decay: uint8 [P], whether decoupled weight decay applies to parameter i.
void adam_mini_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                    const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& vs,
                    const std::vector<at::Tensor>& steps, const at::Tensor& items, const at::Tensor& decay,
                    double lr, double beta1, double beta2, double eps, double weight_decay, bool maximize) {
  const size_t P = params.size();
  TORCH_CHECK(grads.size() == P && exp_avgs.size() == P && vs.size() == P && steps.size() == P,
              "adam_mini_step: lists of different lengths");
  TORCH_CHECK(items.dtype() == at::kLong && items.is_contiguous() && items.dim() == 2 && items.size(1) == 6);
  TORCH_CHECK(decay.dtype() == at::kByte && decay.is_contiguous() && (size_t)decay.numel() == P);
  const int64_t C = items.size(0);
  if (C == 0) return;
  const Item* it = reinterpret_cast<const Item*>(items.data_ptr<int64_t>());
  const uint8_t* dp = decay.data_ptr<uint8_t>();

  std::vector<float*> Pp(P), Mp(P), Vp(P);
  std::vector<const float*> Gp(P);
  std::vector<at::Tensor> keep;  // contiguous copies of strided gradients, alive until the end
  std::vector<Scalars> sc(P);
  for (size_t i = 0; i < P; ++i) {
    const at::Tensor& g = grads[i];
    TORCH_CHECK(g.scalar_type() == at::kFloat && g.device().is_cpu() && g.numel() == params[i].numel(),
                "adam_mini_step: gradient ", i, " must be a float32 CPU tensor of the parameter's size");
    if (g.is_contiguous()) {
      Gp[i] = g.data_ptr<float>();
    } else {
      keep.push_back(g.contiguous());
      Gp[i] = keep.back().data_ptr<float>();
    }
    Pp[i] = params[i].data_ptr<float>();
    Mp[i] = exp_avgs[i].data_ptr<float>();
    Vp[i] = vs[i].data_ptr<float>();
    float* st = steps[i].data_ptr<float>();
    *st += 1.0f;
    const double t = (double)*st;
    // the reference's scalars: Python floats (double), rounded to float where a tensor op uses them
    sc[i].step_size = (float)(lr / (1.0 - std::pow(beta1, t)));
    sc[i].bc2_sqrt = (float)std::sqrt(1.0 - std::pow(beta2, t));
    sc[i].decay = dp[i] ? (float)(1.0 - lr * weight_decay) : 1.0f;
  }
  // 1 - beta in double: in float, 1 - 0.999f cancels to 0.00099998713 (1.3e-5 off)
  const Hyper h{(float)(1.0 - beta1), (float)beta2, (float)(1.0 - beta2), (float)eps, maximize ? -1.0f : 1.0f};

  const Item& last = it[C - 1];
  const int64_t total = last.start + last.blocks * last.block_size;
  const int64_t T = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), C));
  std::vector<int64_t> starts(C);
  for (int64_t c = 0; c < C; ++c) starts[c] = it[c].start;

  at::parallel_for(0, T, 1, [&](int64_t tb, int64_t te) {
    for (int64_t k = tb; k < te; ++k) {
      const int64_t lo = total * k / T, hi = total * (k + 1) / T;
      int64_t c = std::lower_bound(starts.begin(), starts.end(), lo) - starts.begin();
      const int64_t c_end = std::lower_bound(starts.begin(), starts.end(), hi) - starts.begin();
      for (; c < c_end; ++c) {
        const Item& x = it[c];
        const int64_t i = x.param;
        float* p = Pp[i] + x.offset;
        const float* g = Gp[i] + x.offset;
        float* m = Mp[i] + x.offset;
        float* v = Vp[i] + x.v_offset;
        if (x.block_size == 1) {
          elementwise(p, g, m, v, x.blocks, sc[i], h);
        } else {
          blockwise(p, g, m, v, x.blocks, x.block_size, sc[i], h);
        }
      }
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("adam_mini_step", &adam_mini_step, "fused Adam-mini step (fp32, CPU)");
}
