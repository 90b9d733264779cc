// Fused Adam-mini step for CPU (fp32): every parameter of a group in one call, one pass per block.
//
// A block is `bs` consecutive elements of a contiguous tensor. For each block the kernel sums
// g*g (a row or a head stays in L1/L2), updates the block's second moment, then updates m and p
// in a second sweep over the same, cache-resident, gradient: memory traffic is ~20 bytes per
// parameter (g, m, p read; m, p written), against ~28 for AdamW. Per-element blocks (biases) are
// plain Adam in the same loop nest, so one call covers a whole parameter group.
//
// Work is split by estimated memory traffic, not by item count: thread k takes the items whose first
// byte falls in [k * total / T, (k + 1) * total / T), in memory order, so both cores stream and finish
// together (a per-element item moves 28 bytes per element, a block item 20).
// Step counters and bias corrections are handled here too, so Python does no per-parameter work.
// Headers: only the Tensor class, parallel_for and the op registry. The op is registered as
// torch.ops.blockopt_cpu.adam_mini_step and called through the dispatcher; there is no Python
// module, so pybind11 and <torch/extension.h>, most of the time of a cold build, are not compiled.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
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

// Momentum storage (kernels/momentum.py has the same formats, hash and formulas).
constexpr int64_t kGroup = 256;  // int8: elements per scale group, along a row

inline uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}
inline uint32_t hash_at(uint32_t seed, int64_t index) {
  // the low 32 bits of index * K + seed depend only on the low 32 bits of index: 32-bit lanes
  return hash32((uint32_t)index * 0x9E3779B9u + seed);
}
inline uint32_t step_seed(uint32_t base, double step) {
  return hash32(base ^ (uint32_t)(((uint64_t)step * 0x9E3779B1ull) & 0xFFFFFFFFull));
}
inline float bf16_load(uint16_t b) {
  uint32_t bits = (uint32_t)b << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline uint16_t bf16_store_sr(float x, uint32_t r) {  // stochastic rounding with 16 random bits
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  return (uint16_t)((bits + (r & 0xFFFFu)) >> 16);
}

struct Momentum {  // one parameter's stored first moment
  int kind;            // 0 fp32, 1 bf16, 2 int8
  void* data;
  float* scale;        // int8: [rows, groups]
  int64_t row, groups; // int8: elements per row, scale groups per row
  uint32_t seed;       // this step's seed
};

template <bool Bf16>
inline void elementwise(float* __restrict p, const float* __restrict g, void* mv, float* __restrict v,
                        int64_t n, const Scalars& s, const Hyper& h, uint32_t seed, int64_t first) {
  float* __restrict m = (float*)mv;
  uint16_t* __restrict m16 = (uint16_t*)mv;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float gi = h.sign * g[i];
    const float m0 = Bf16 ? bf16_load(m16[i]) : m[i];
    const float mm = std::fma(h.w1, gi - m0, m0);
    const float vv = h.b2 * v[i] + h.omb2 * (gi * gi);
    if (Bf16) {
      m16[i] = bf16_store_sr(mm, hash_at(seed, first + i));
    } else {
      m[i] = mm;
    }
    v[i] = vv;
    const float denom = std::sqrt(vv) / s.bc2_sqrt + h.eps;
    p[i] = p[i] * s.decay - s.step_size * (mm / denom);
  }
}

// Sums of squares: float lanes within tiles of kTile elements (32 terms per lane), tiles added in
// double. A plain float sum over a head of 50k squares would lose ~n*eps; double lanes throughout
// cost ~5 % of the step (the conversions), measured on gpt2-160m.
constexpr int64_t kTile = 256;

inline double sum_sq(const float* __restrict g, int64_t n) {
  double acc = 0.0;
  for (int64_t t = 0; t < n; t += kTile) {
    const int64_t e = std::min(n, t + kTile);
    float part = 0.0f;
#pragma omp simd reduction(+ : part)
    for (int64_t i = t; i < e; ++i) part += g[i] * g[i];
    acc += (double)part;
  }
  return acc;
}

// sum_sq, with each square also added into ts (a factored matrix's column tile).
inline double sum_sq_into(const float* __restrict g, int64_t n, float* __restrict ts) {
  double acc = 0.0;
  for (int64_t t = 0; t < n; t += kTile) {
    const int64_t e = std::min(n, t + kTile);
    float part = 0.0f;
#pragma omp simd reduction(+ : part)
    for (int64_t i = t; i < e; ++i) {
      const float q = g[i] * g[i];
      part += q;
      ts[i] += q;
    }
    acc += (double)part;
  }
  return acc;
}

// One tile [t, e) of a block's update with fp32 momentum (block at pb, mb, gradient gb, step `scale`);
// returns the sum of the squares of the next block's tile gn (nullptr: none, 0).
inline float block_tile(float* __restrict pb, const float* __restrict gb, const float* __restrict gn,
                        float* __restrict mb, int64_t t, int64_t e, float scale, const Scalars& s, const Hyper& h) {
  const float sg = h.sign, w1 = h.w1, decay = s.decay;
  float part = 0.0f;
  if (gn != nullptr) {
#pragma omp simd reduction(+ : part)
    for (int64_t i = t; i < e; ++i) {
      part += gn[i] * gn[i];
      const float mm = std::fma(w1, sg * gb[i] - mb[i], mb[i]);
      mb[i] = mm;
      pb[i] = pb[i] * decay - scale * mm;
    }
  } else {
#pragma omp simd
    for (int64_t i = t; i < e; ++i) {
      const float mm = std::fma(w1, sg * gb[i] - mb[i], mb[i]);
      mb[i] = mm;
      pb[i] = pb[i] * decay - scale * mm;
    }
  }
  return part;
}

// Blocks with fp32 momentum. The item's two halves are stepped together, a tile of each in turn (twice
// the memory streams in flight per core). In one-process A/Bs on gpt2-160m's row blocks this was faster
// when memory was fast and no slower when it was slow (benchmarks/step_parts.py splits the groups by
// bandwidth); on a bare stream (benchmarks/stream_floor.py) the gain does not always show.
// Each half is software-pipelined: the loop that updates block j also sums the squares of block j + 1,
// so g, m and p stream together (as in AdamW's single loop) while block j's gradient is re-read from
// cache. Sums are tiled as in sum_sq.
inline void blockwise_halves(float* __restrict p, const float* __restrict g, float* __restrict m,
                             float* __restrict v, int64_t nb, int64_t bs, const Scalars& s, const Hyper& h) {
  const double inv_bs = 1.0 / (double)bs;
  struct Run {
    int64_t j, end;  // the next block, and the end of this half
    double acc, next;
    float scale;
  };
  auto begin = [&](Run& r) {  // block r.j's second moment (from r.acc) and step
    const float vv = h.b2 * v[r.j] + h.omb2 * (float)(r.acc * inv_bs);
    v[r.j] = vv;
    r.scale = s.step_size / (std::sqrt(vv) / s.bc2_sqrt + h.eps);
    r.next = 0.0;
  };
  Run runs[2] = {{0, nb / 2, 0.0, 0.0, 0.0f}, {nb / 2, nb, 0.0, 0.0, 0.0f}};
  for (Run& r : runs) {
    if (r.j == r.end) continue;
    r.acc = sum_sq(g + r.j * bs, bs);
    begin(r);
  }
  while (runs[1].j < runs[1].end) {  // the second half has at least as many blocks
    for (int64_t t = 0; t < bs; t += kTile) {
      const int64_t e = std::min(bs, t + kTile);
      for (Run& r : runs) {
        if (r.j == r.end) continue;
        const int64_t o = r.j * bs;
        r.next += (double)block_tile(p + o, g + o, r.j + 1 < r.end ? g + o + bs : nullptr, m + o, t, e, r.scale, s, h);
      }
    }
    for (Run& r : runs) {
      if (r.j == r.end) continue;
      r.acc = r.next;
      if (++r.j < r.end) begin(r);
    }
  }
}

// Blocks of `bs` consecutive elements, bfloat16 momentum (read exactly, written with stochastic rounding;
// `first` is the index of p[0] in the full tensor, the random bits depend on it). Software-pipelined as
// blockwise_halves, one run.
inline void blockwise_bf16(float* __restrict p, const float* __restrict g, uint16_t* __restrict mb16,
                           float* __restrict v, int64_t nb, int64_t bs, const Scalars& s, const Hyper& h,
                           uint32_t seed, int64_t first) {
  const double inv_bs = 1.0 / (double)bs;
  const float sg = h.sign, w1 = h.w1, decay = s.decay;
  double acc = sum_sq(g, bs);
  for (int64_t j = 0; j < nb; ++j) {
    const float* __restrict gb = g + j * bs;
    float* __restrict pb = p + j * bs;
    const float vv = h.b2 * v[j] + h.omb2 * (float)(acc * inv_bs);
    v[j] = vv;
    const float denom = std::sqrt(vv) / s.bc2_sqrt + h.eps;
    const float scale = s.step_size / denom;
    const float* __restrict gn = gb + bs;
    const bool more = j + 1 < nb;
    double next = 0.0;
    uint16_t* __restrict mb = mb16 + j * bs;
    const int64_t base = first + j * bs;
    for (int64_t t = 0; t < bs; t += kTile) {
      const int64_t e = std::min(bs, t + kTile);
      float part = 0.0f;
#pragma omp simd reduction(+ : part)
      for (int64_t i = t; i < e; ++i) {
        if (more) part += gn[i] * gn[i];
        const float m0 = bf16_load(mb[i]);
        const float mm = std::fma(w1, sg * gb[i] - m0, m0);
        mb[i] = bf16_store_sr(mm, hash_at(seed, base + i));
        pb[i] = pb[i] * decay - scale * mm;
      }
      next += (double)part;
    }
    acc = next;
  }
}

// int8 momentum, one row of the tensor (`a`: index of its first element): per scale group, decode
// m, update m and p, then re-encode the group with its new absolute maximum. The step is `scale`
// for the whole row, or `colscale[c]` per column (column blocks).
template <bool PerColumn>
inline void int8_row(float* __restrict p, const float* __restrict g, int8_t* __restrict codes, float* scales,
                     int64_t row_len, int64_t groups, int64_t a, float scale, const float* __restrict colscale,
                     const Hyper& h, float decay, uint32_t seed) {
  const float sg = h.sign, w1 = h.w1;
  float buf[kGroup];
  for (int64_t gi = 0; gi < groups; ++gi) {
    const int64_t o = gi * kGroup;  // offset in the row
    const int64_t n = std::min<int64_t>(kGroup, row_len - o);
    const float c = scales[gi] / 16129.0f;
    const float* __restrict ga = g + o;
    float* __restrict pa = p + o;
    int8_t* __restrict qa = codes + o;
    float amax = 0.0f;
#pragma omp simd reduction(max : amax)
    for (int64_t i = 0; i < n; ++i) {
      const float q = (float)qa[i];
      const float m0 = (q * std::abs(q)) * c;
      const float mm = std::fma(w1, sg * ga[i] - m0, m0);
      buf[i] = mm;
      pa[i] = pa[i] * decay - (PerColumn ? colscale[o + i] : scale) * mm;
      amax = std::max(amax, std::abs(mm));
    }
    const float inv = amax > 0.0f ? 1.0f / amax : 0.0f;
    const uint32_t a32 = (uint32_t)(a + o);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float u = (float)(int32_t)(hash32((a32 + (uint32_t)i) * 0x9E3779B9u + seed) >> 8) *
                      (1.0f / 16777216.0f);
      const float y = std::sqrt(std::abs(buf[i]) * inv) * 127.0f;
      const int32_t q = std::min((int32_t)(y + u), 127);  // y + u >= 0: truncation is floor
      qa[i] = (int8_t)(buf[i] < 0.0f ? -q : q);
    }
    scales[gi] = amax;
  }
}

// int8 momentum, blocks of whole rows (bs is a multiple of the row length).
inline void blockwise_int8(float* __restrict p, const float* __restrict g, const Momentum& mo, float* __restrict v,
                           int64_t nb, int64_t bs, const Scalars& s, const Hyper& h, int64_t first) {
  const double inv_bs = 1.0 / (double)bs;
  int8_t* codes = (int8_t*)mo.data;
  for (int64_t j = 0; j < nb; ++j) {
    const int64_t b0 = first + j * bs;  // index of the block's first element in the tensor
    const double acc = sum_sq(g + j * bs, bs);
    const float vv = h.b2 * v[j] + h.omb2 * (float)(acc * inv_bs);
    v[j] = vv;
    const float scale = s.step_size / (std::sqrt(vv) / s.bc2_sqrt + h.eps);
    for (int64_t r0 = b0; r0 < b0 + bs; r0 += mo.row) {
      int8_row<false>(p + (r0 - first), g + (r0 - first), codes + r0, mo.scale + (r0 / mo.row) * mo.groups,
                      mo.row, mo.groups, r0, scale, nullptr, h, s.decay, mo.seed);
    }
  }
}

// int8 momentum, one second moment per element; the item is whole rows (`first`: its first element in
// the tensor, a multiple of the row length). Each row's v is updated first, then int8_row steps the row
// with each element's step size.
inline void elementwise_int8(float* __restrict p, const float* __restrict g, const Momentum& mo, float* __restrict v,
                             int64_t n, const Scalars& s, const Hyper& h, int64_t first) {
  int8_t* codes = (int8_t*)mo.data;
  std::vector<float> steps(mo.row);
  float* __restrict st = steps.data();
  for (int64_t r0 = 0; r0 < n; r0 += mo.row) {
    const float* __restrict gr = g + r0;
    float* __restrict vr = v + r0;
#pragma omp simd
    for (int64_t c = 0; c < mo.row; ++c) {
      const float vv = h.b2 * vr[c] + h.omb2 * (gr[c] * gr[c]);
      vr[c] = vv;
      st[c] = s.step_size / (std::sqrt(vv) / s.bc2_sqrt + h.eps);
    }
    const int64_t a = first + r0;
    int8_row<true>(p + r0, gr, codes + a, mo.scale + (a / mo.row) * mo.groups, mo.row, mo.groups, a, 0.0f, st, h,
                   s.decay, mo.seed);
  }
}

// Column blocks (layers stored [in, out], e.g. Hugging Face Conv1D): block colblock[c] holds column c
// of every row. One pass sums g*g per column, a second updates m and p with each column's step.
template <int Kind>  // momentum kind: 0 fp32, 1 bf16, 2 int8
inline void columnwise(float* __restrict p, const float* __restrict g, const Momentum& mo, float* __restrict v,
                       int64_t rows, int64_t cols, const int32_t* __restrict colblock, int64_t nb, const Scalars& s,
                       const Hyper& h, int64_t off) {
  // off: the item's first element in the parameter (a slice of a stacked tensor; 0 for int8)
  void* mv = mo.data;
  const uint32_t seed = mo.seed;
  // float sums over tiles of 32 rows, added in double (as the row sums are tiled)
  std::vector<double> colsum(cols, 0.0);
  std::vector<float> tile(cols);
  double* __restrict cs = colsum.data();
  float* __restrict ts = tile.data();
  for (int64_t r0 = 0; r0 < rows; r0 += 32) {
    std::fill(tile.begin(), tile.end(), 0.0f);
    for (int64_t r = r0; r < std::min(rows, r0 + 32); ++r) {
      const float* __restrict gr = g + r * cols;
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) ts[c] += gr[c] * gr[c];
    }
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) cs[c] += (double)ts[c];
  }
  std::vector<double> bsum(nb, 0.0);
  std::vector<int64_t> bcount(nb, 0);
  for (int64_t c = 0; c < cols; ++c) {
    bsum[colblock[c]] += cs[c];
    bcount[colblock[c]] += rows;
  }
  std::vector<float> bscale(nb), colscale(cols);
  for (int64_t b = 0; b < nb; ++b) {
    const float vv = h.b2 * v[b] + h.omb2 * (float)(bsum[b] / (double)bcount[b]);
    v[b] = vv;
    bscale[b] = s.step_size / (std::sqrt(vv) / s.bc2_sqrt + h.eps);
  }
  for (int64_t c = 0; c < cols; ++c) colscale[c] = bscale[colblock[c]];
  const float* __restrict sc = colscale.data();
  const float sg = h.sign, w1 = h.w1, decay = s.decay;
  for (int64_t r = 0; r < rows; ++r) {
    const float* __restrict gr = g + r * cols;
    float* __restrict pr = p + r * cols;
    if (Kind == 2) {
      int8_row<true>(pr, gr, (int8_t*)mv + r * cols, mo.scale + r * mo.groups, cols, mo.groups, r * cols, 0.0f, sc,
                     h, decay, seed);
    } else if (Kind == 1) {
      uint16_t* __restrict mr = (uint16_t*)mv + off + r * cols;
      const int64_t base = off + r * cols;
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) {
        const float m0 = bf16_load(mr[c]);
        const float mm = std::fma(w1, sg * gr[c] - m0, m0);
        mr[c] = bf16_store_sr(mm, hash_at(seed, base + c));
        pr[c] = pr[c] * decay - sc[c] * mm;
      }
    } else {
      float* __restrict mr = (float*)mv + off + r * cols;
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) {
        const float mm = std::fma(w1, sg * gr[c] - mr[c], mr[c]);
        mr[c] = mm;
        pr[c] = pr[c] * decay - sc[c] * mm;
      }
    }
  }
}

// A factored matrix's step for one element of a row: step_size / (a * shape_c + eps). Series: the
// division is replaced by (step / a) * inv_c * (1 - y + y*y), y = (eps / a) * inv_c, inv_c = 1 / shape_c,
// used only where y <= 2^-8 for every column (the dropped term, y^3, is below fp32's rounding);
// ra = step / a and e = eps / a are the row's. Where y <= 2^-12 for every column (gradients of 1e-3
// and eps 1e-8 give y ~ 2^-17), the first order, s - s * y with s = ra * inv_c, is as close (y^2 <=
// 2^-24) in a multiply and a fused multiply-add. Where y <= 2^-25 (eps far below sqrt(v)), 1 - y rounds
// to 1 in fp32, so the series is ra * inv_c, bit for bit, in one multiply.
template <int Series>  // 0: divide; 1: the series; 2: ra * inv_c; 3: the first order
inline float factored_scale(float shc, float invc, float step, float a, float eps, float ra, float e) {
  if (Series == 2) return ra * invc;
  if (Series == 3) {
    const float sc = ra * invc;
    return std::fma(-sc, e * invc, sc);
  }
  return Series ? ra * invc * (1.0f - e * invc + (e * invc) * (e * invc)) : step / (a * shc + eps);
}

// The form of factored_scale a row can use, from y_max = (eps / a) * max_c inv_c (NaN, a = 0: divide).
inline int series_form(float a, float y_max) {
  if (!(a > 0.0f) || !(y_max <= 0.00390625f)) return 0;  // 2^-8
  if (y_max <= 2.9802322e-08f) return 2;                  // 2^-25
  return y_max <= 0.000244140625f ? 3 : 1;               // 2^-12
}

// One row of a factored matrix with compact momentum (bf16 or int8): m and p updated with each
// column's factored_scale.
template <int Kind, int Series>
inline void factored_row(float* __restrict pr, const float* __restrict gr, const Momentum& mo, int64_t r,
                         int64_t cols, const float* __restrict sh, const float* __restrict inv, float a,
                         float* __restrict rowscale, const Scalars& s, const Hyper& h) {
  static_assert(Kind == 1 || Kind == 2, "fp32 momentum: factored_row_fp32");
  const float sg = h.sign, w1 = h.w1, decay = s.decay, eps = h.eps, step = s.step_size;
  const float ra = Series ? step / a : 0.0f, e = Series ? eps / a : 0.0f;
  if (Kind == 2) {
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) rowscale[c] = factored_scale<Series>(sh[c], inv[c], step, a, eps, ra, e);
    int8_row<true>(pr, gr, (int8_t*)mo.data + r * cols, mo.scale + r * mo.groups, cols, mo.groups, r * cols, 0.0f,
                   rowscale, h, decay, mo.seed);
  } else {
    uint16_t* __restrict mr = (uint16_t*)mo.data + r * cols;
    const int64_t base = r * cols;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) {
      const float m0 = bf16_load(mr[c]);
      const float mm = std::fma(w1, sg * gr[c] - m0, m0);
      mr[c] = bf16_store_sr(mm, hash_at(mo.seed, base + c));
      pr[c] = pr[c] * decay - factored_scale<Series>(sh[c], inv[c], step, a, eps, ra, e) * mm;
    }
  }
}

// One column tile [t, end) of a factored row with fp32 momentum: m and p updated with each column's
// factored_scale. Software-pipelined as in blockwise_halves: the loop also sums the squares of the next row's
// tile gn (nullptr: none), adds them into the column tile ts, and returns their sum.
template <int Series>
inline float factored_tile(float* __restrict pr, const float* __restrict gr, const float* __restrict gn,
                           float* __restrict mr, int64_t t, int64_t end, const float* __restrict sh,
                           const float* __restrict inv, float a, const Scalars& s, const Hyper& h,
                           float* __restrict ts) {
  const float sg = h.sign, w1 = h.w1, decay = s.decay, eps = h.eps, step = s.step_size;
  const float ra = Series ? step / a : 0.0f, e = Series ? eps / a : 0.0f;
  float part = 0.0f;
  if (gn != nullptr) {
#pragma omp simd reduction(+ : part)
    for (int64_t c = t; c < end; ++c) {
      const float q = gn[c] * gn[c];
      part += q;
      ts[c] += q;
      const float mm = std::fma(w1, sg * gr[c] - mr[c], mr[c]);
      mr[c] = mm;
      pr[c] = pr[c] * decay - factored_scale<Series>(sh[c], inv[c], step, a, eps, ra, e) * mm;
    }
  } else {
#pragma omp simd
    for (int64_t c = t; c < end; ++c) {
      const float mm = std::fma(w1, sg * gr[c] - mr[c], mr[c]);
      mr[c] = mm;
      pr[c] = pr[c] * decay - factored_scale<Series>(sh[c], inv[c], step, a, eps, ra, e) * mm;
    }
  }
  return part;
}

// A factored item's float column tile `ts` (at most 32 rows of squares) added, in double, into its
// column sums `cs`, and cleared.
inline void add_tile(double* __restrict cs, float* __restrict ts, int64_t cols) {
#pragma omp simd
  for (int64_t c = 0; c < cols; ++c) {
    cs[c] += (double)ts[c];
    ts[c] = 0.0f;
  }
}

// factored_tile in the form series_form chose.
inline float factored_tile_in(int form, float* pr, const float* gr, const float* gn, float* mr, int64_t t,
                              int64_t end, const float* sh, const float* inv, float a, const Scalars& s,
                              const Hyper& h, float* ts) {
  switch (form) {
    case 2: return factored_tile<2>(pr, gr, gn, mr, t, end, sh, inv, a, s, h, ts);
    case 3: return factored_tile<3>(pr, gr, gn, mr, t, end, sh, inv, a, s, h, ts);
    case 1: return factored_tile<1>(pr, gr, gn, mr, t, end, sh, inv, a, s, h, ts);
    default: return factored_tile<0>(pr, gr, gn, mr, t, end, sh, inv, a, s, h, ts);
  }
}

// One whole row with fp32 momentum (narrow rows): its tiles in order; returns the next row's sum of squares,
// the tiles' float sums added in double (as sum_sq). Kept apart from a per-tile dispatch of factored_tile_in:
// that form was slower on narrow rows when memory was fast (one-process A/B with benchmarks/step_parts.py's split).
template <int Series>
inline double factored_row_fp32(float* pr, const float* gr, const float* gn, float* mr, int64_t cols,
                                const float* sh, const float* inv, float a, const Scalars& s, const Hyper& h,
                                float* ts) {
  double next = 0.0;
  for (int64_t t = 0; t < cols; t += kTile) {
    next += (double)factored_tile<Series>(pr, gr, gn, mr, t, std::min(cols, t + kTile), sh, inv, a, s, h, ts);
  }
  return next;
}

// factored_row_fp32 in the form series_form chose.
inline double factored_row_fp32_in(int form, float* pr, const float* gr, const float* gn, float* mr, int64_t cols,
                                   const float* sh, const float* inv, float a, const Scalars& s, const Hyper& h,
                                   float* ts) {
  switch (form) {
    case 2: return factored_row_fp32<2>(pr, gr, gn, mr, cols, sh, inv, a, s, h, ts);
    case 3: return factored_row_fp32<3>(pr, gr, gn, mr, cols, sh, inv, a, s, h, ts);
    case 1: return factored_row_fp32<1>(pr, gr, gn, mr, cols, sh, inv, a, s, h, ts);
    default: return factored_row_fp32<0>(pr, gr, gn, mr, cols, sh, inv, a, s, h, ts);
  }
}

// Wide rows with fp32 momentum (cols > kNarrowCols), the item's two halves stepped together, a column
// tile of each in turn (as blockwise_halves), each half pipelined as factored_row_fp32, both adding their
// squares into the column tile ts. `ts` takes at most 32 rows before it is added, in double, into cs.
inline void factored_halves(float* __restrict p, const float* __restrict g, float* __restrict m,
                            float* __restrict v, int64_t cols, int64_t r0, int64_t nr, double* __restrict cs,
                            const float* __restrict sh, const float* __restrict inv, float inv_max,
                            float* __restrict ts, const Scalars& s, const Hyper& h) {
  struct Run {
    int64_t r, end;  // the next row, and the end of this half
    double acc, next;
    float a;
    int form;
  };
  auto begin = [&](Run& u) {  // row u.r's second moment (from u.acc) and form
    const float vr = h.b2 * v[u.r] + h.omb2 * (float)(u.acc / (double)cols);
    v[u.r] = vr;
    u.a = std::sqrt(vr) / s.bc2_sqrt;
    u.form = series_form(u.a, (h.eps / u.a) * inv_max);
    u.next = 0.0;
  };
  Run runs[2] = {{r0, r0 + nr / 2, 0.0, 0.0, 0.0f, 0}, {r0 + nr / 2, r0 + nr, 0.0, 0.0, 0.0f, 0}};
  int64_t in_tile = 0;  // rows whose squares are in ts
  for (Run& u : runs) {
    if (u.r == u.end) continue;
    u.acc = sum_sq_into(g + u.r * cols, cols, ts);
    ++in_tile;
    begin(u);
  }
  while (runs[1].r < runs[1].end) {  // the second half has at least as many rows
    if (in_tile + 2 > 32) {
      add_tile(cs, ts, cols);
      in_tile = 0;
    }
    for (int64_t t = 0; t < cols; t += kTile) {
      const int64_t end = std::min(cols, t + kTile);
      for (Run& u : runs) {
        if (u.r == u.end) continue;
        const int64_t o = u.r * cols;
        const float* gn = u.r + 1 < u.end ? g + o + cols : nullptr;
        u.next += (double)factored_tile_in(u.form, p + o, g + o, gn, m + o, t, end, sh, inv, u.a, s, h, ts);
      }
    }
    for (Run& u : runs) {
      if (u.r == u.end) continue;
      in_tile += u.r + 1 < u.end;
      u.acc = u.next;
      if (++u.r < u.end) begin(u);
    }
  }
  add_tile(cs, ts, cols);
}

// One row with compact momentum, in the form series_form chose (see factored_row).
template <int Kind>
inline void factored_row_in(int form, float* pr, const float* gr, const Momentum& mo, int64_t r, int64_t cols,
                            const float* sh, const float* inv, float a, float* rowscale, const Scalars& s,
                            const Hyper& h) {
  switch (form) {
    case 2: return factored_row<Kind, 2>(pr, gr, mo, r, cols, sh, inv, a, rowscale, s, h);
    case 3: return factored_row<Kind, 3>(pr, gr, mo, r, cols, sh, inv, a, rowscale, s, h);
    case 1: return factored_row<Kind, 1>(pr, gr, mo, r, cols, sh, inv, a, rowscale, s, h);
    default: return factored_row<Kind, 0>(pr, gr, mo, r, cols, sh, inv, a, rowscale, s, h);
  }
}

// Rows whose column squares the row loop adds into the column tile itself, one row at a time (fp32
// momentum): up to this many columns, the tile, the inverse shapes and a row of each stream stay in L1
// (32 KiB). Wider fp32 rows are stepped two at a time (factored_halves).
constexpr int64_t kNarrowCols = 1024;

// Factored second moment of a 2-D parameter (v = [R; C]: one value per row, then one per column), rows
// r0 to r0 + nr of it (one work item; r0 is a multiple of 32). Each row's g*g is summed (float lanes
// in tiles, added in double), its EMA R_r updated, and the row's m and p updated with
// step_size / (sqrt(R_r / bc2) * shape_c + eps), where shape_c = sqrt(C_c / mean(C)) comes from the
// column EMAs as they were before this step (1 while they are all zero). The squares go into a float
// column tile: with fp32 momentum in the loop that sums them, otherwise every 4 rows in one sweep (the
// rows still in cache); at most 32 rows at a time, then the tile is added in double into `colsum`, the
// item's own; the column EMAs take the sums of all items after the step.
// Memory traffic is that of row blocks, ~20 bytes per parameter.
// `Narrow` (fp32 momentum, cols <= kNarrowCols): one row at a time; wider fp32 rows: factored_halves.
template <int Kind, bool Narrow = false>  // momentum kind: 0 fp32, 1 bf16, 2 int8
inline void factorwise(float* __restrict p, const float* __restrict g, const Momentum& mo, float* __restrict v,
                       int64_t rows, int64_t cols, int64_t r0, int64_t nr, double* __restrict cs,
                       const Scalars& s, const Hyper& h) {
  const float* __restrict vc = v + rows;
  std::vector<float> shape_v(cols), inv_v(cols), tile(cols, 0.0f), rowscale(Kind == 2 ? cols : 0);
  float* __restrict sh = shape_v.data();
  float* __restrict inv = inv_v.data();
  float* __restrict ts = tile.data();
  double csum = 0.0;
  for (int64_t c = 0; c < cols; ++c) csum += (double)vc[c];
  const float cmean = (float)(csum / (double)cols);
  float inv_max = 0.0f;
  for (int64_t c = 0; c < cols; ++c) {
    sh[c] = cmean > 0.0f ? std::sqrt(vc[c] / cmean) : 1.0f;
    inv[c] = 1.0f / sh[c];  // inf where a column's EMA is 0: then the row divides
    inv_max = std::max(inv_max, inv[c]);
  }
  const int64_t r1 = r0 + nr;
  if constexpr (Kind == 0 && !Narrow) {
    factored_halves(p, g, (float*)mo.data, v, cols, r0, nr, cs, sh, inv, inv_max, ts, s, h);
  } else if constexpr (Kind == 0) {  // the next row's sum and squares come with this row's update
    double acc = sum_sq_into(g + r0 * cols, cols, ts);
    int64_t in_tile = 1;  // rows whose squares are in the tile
    for (int64_t r = r0; r < r1; ++r) {
      const float vr = h.b2 * v[r] + h.omb2 * (float)(acc / (double)cols);
      v[r] = vr;
      const float a = std::sqrt(vr) / s.bc2_sqrt;
      if (in_tile == 32) {
        add_tile(cs, ts, cols);
        in_tile = 0;
      }
      const float* gn = r + 1 < r1 ? g + (r + 1) * cols : nullptr;
      acc = factored_row_fp32_in(series_form(a, (h.eps / a) * inv_max), p + r * cols, g + r * cols, gn,
                                 (float*)mo.data + r * cols, cols, sh, inv, a, s, h, ts);
      in_tile += gn != nullptr;
    }
    add_tile(cs, ts, cols);
  } else {
    for (int64_t r = r0; r < r1; ++r) {
      const float* __restrict gr = g + r * cols;
      const float vr = h.b2 * v[r] + h.omb2 * (float)(sum_sq(gr, cols) / (double)cols);
      v[r] = vr;
      const float a = std::sqrt(vr) / s.bc2_sqrt;
      factored_row_in<Kind>(series_form(a, (h.eps / a) * inv_max), p + r * cols, gr, mo, r, cols, sh, inv, a,
                            rowscale.data(), s, h);
      if ((r - r0 + 1) % 4 == 0) {  // the last 4 rows' squares (still in cache) into the tile, in one sweep
        const float* __restrict g0 = g + (r - 3) * cols;
        const float* __restrict g1 = g0 + cols;
        const float* __restrict g2 = g1 + cols;
        const float* __restrict g3 = g2 + cols;
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) ts[c] += (g0[c] * g0[c] + g1[c] * g1[c]) + (g2[c] * g2[c] + g3[c] * g3[c]);
      } else if (r + 1 == r1) {
        for (int64_t q = r - (r - r0) % 4; q <= r; ++q) {
          const float* __restrict gq = g + q * cols;
#pragma omp simd
          for (int64_t c = 0; c < cols; ++c) ts[c] += gq[c] * gq[c];
        }
      }
      if ((r - r0 + 1) % 32 == 0 || r + 1 == r1) add_tile(cs, ts, cols);
    }
  }
}

}  // namespace

// items: int64 [C, 6] = (param index, element offset, blocks, block size, v offset, first element
//        counted over the whole table), in memory order; steps: 0-dim float32 tensors, incremented
//        here; decay: uint8 [P], whether decoupled weight decay applies to parameter i.
// Momentum storage per parameter: kinds uint8 [P] (0 fp32, 1 bf16, 2 int8: exp_avgs[i] is then
// int8 of the parameter's shape and scales[i] its fp32 [rows, groups] scales; other entries of
// scales are ignored), seeds int64 [P] (the parameter's base seed; mixed with the step here).
// Column blocks: an item with block size 0 covers a whole 2-D parameter (or one slice of a stacked
// [S, in, out] one); colmaps[i] (int32, one
// entry per column) gives each column's block (other entries of colmaps are ignored).
// Factored second moments: an item with block size -1 covers rows offset / cols to + blocks (from a
// multiple of 32) of a 2-D parameter whose v holds rows + cols values (rows first); items of one
// parameter are consecutive and in row order.
void adam_mini_step(at::TensorList params, at::TensorList grads,
                    at::TensorList exp_avgs, at::TensorList vs,
                    at::TensorList steps, const at::Tensor& items, const at::Tensor& decay,
                    double lr, double beta1, double beta2, double eps, double weight_decay, bool maximize,
                    const at::Tensor& kinds, at::TensorList scales, const at::Tensor& seeds,
                    at::TensorList colmaps) {
  const size_t P = params.size();
  TORCH_CHECK(grads.size() == P && exp_avgs.size() == P && vs.size() == P && steps.size() == P && scales.size() == P &&
                  colmaps.size() == P,
              "adam_mini_step: lists of different lengths");
  TORCH_CHECK(items.dtype() == at::kLong && items.is_contiguous() && items.dim() == 2 && items.size(1) == 6);
  TORCH_CHECK(decay.dtype() == at::kByte && decay.is_contiguous() && (size_t)decay.numel() == P);
  TORCH_CHECK(kinds.dtype() == at::kByte && kinds.is_contiguous() && (size_t)kinds.numel() == P);
  TORCH_CHECK(seeds.dtype() == at::kLong && seeds.is_contiguous() && (size_t)seeds.numel() == P);
  const int64_t C = items.size(0);
  if (C == 0) return;
  const Item* it = reinterpret_cast<const Item*>(items.data_ptr<int64_t>());
  const uint8_t* dp = decay.data_ptr<uint8_t>();
  const uint8_t* kp = kinds.data_ptr<uint8_t>();
  const int64_t* seedp = seeds.data_ptr<int64_t>();

  std::vector<float*> Pp(P), Vp(P);
  std::vector<const float*> Gp(P);
  std::vector<Momentum> Mo(P);
  std::vector<at::Tensor> keep;  // contiguous copies of strided gradients, alive until the end
  std::vector<Scalars> sc(P);
  for (size_t i = 0; i < P; ++i) {  // check everything before anything changes
    const at::Tensor& g = grads[i];
    TORCH_CHECK(g.scalar_type() == at::kFloat && g.device().is_cpu() && g.numel() == params[i].numel(),
                "adam_mini_step: gradient ", i, " must be a float32 CPU tensor of the parameter's size");
    const auto want = kp[i] == 0 ? at::kFloat : kp[i] == 1 ? at::kBFloat16 : at::kChar;
    TORCH_CHECK(kp[i] <= 2 && exp_avgs[i].scalar_type() == want && exp_avgs[i].is_contiguous(),
                "adam_mini_step: exp_avg ", i, " does not match its momentum kind");
    if (kp[i] == 2) {
      TORCH_CHECK(params[i].dim() >= 2 && scales[i].scalar_type() == at::kFloat && scales[i].is_contiguous() &&
                  scales[i].dim() == 2 && scales[i].size(0) == params[i].size(0),
                  "adam_mini_step: int8 momentum ", i, " needs [rows, groups] float32 scales");
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    const Item& x = it[c];
    TORCH_CHECK(x.param >= 0 && (size_t)x.param < P, "adam_mini_step: bad item");
    if (x.block_size == -1) {  // rows offset / cols to + blocks of a factored matrix
      const at::Tensor& pp = params[x.param];
      TORCH_CHECK(pp.dim() == 2 && pp.size(1) > 0 && x.offset % pp.size(1) == 0 &&
                      (x.offset / pp.size(1)) % 32 == 0 && x.blocks > 0 &&
                      x.offset / pp.size(1) + x.blocks <= pp.size(0) && x.v_offset == 0 &&
                      vs[x.param].numel() == pp.size(0) + pp.size(1),
                  "adam_mini_step: a factored item needs rows of a 2-D parameter (from a multiple of 32) and "
                  "rows + cols second moments");
    } else if (x.block_size == 0) {
      const at::Tensor& cm = colmaps[x.param];
      const at::Tensor& pp = params[x.param];
      // a 2-D parameter, or one slice of a stacked 3-D one ([S, in, out]: the item starts at its slice)
      TORCH_CHECK((pp.dim() == 2 || pp.dim() == 3) && cm.scalar_type() == at::kInt && cm.is_contiguous() &&
                      cm.numel() == pp.size(-1) && x.offset % (pp.size(-2) * pp.size(-1)) == 0 &&
                      (pp.dim() == 2 || kp[x.param] != 2),
                  "adam_mini_step: column blocks need a 2-D (or stacked 3-D) parameter and a column map");
    } else if (kp[x.param] == 2) {
      const int64_t row = params[x.param].numel() / params[x.param].size(0);
      TORCH_CHECK((x.block_size % row == 0 || (x.block_size == 1 && x.blocks % row == 0)) && x.offset % row == 0,
                  "adam_mini_step: int8 momentum needs blocks of whole rows, or items of whole rows of per-element "
                  "blocks (parameter ", x.param, ")");
    }
  }
  for (size_t i = 0; i < P; ++i) {
    const at::Tensor& g = grads[i];
    if (g.is_contiguous()) {
      Gp[i] = g.data_ptr<float>();
    } else {
      keep.push_back(g.contiguous());
      Gp[i] = keep.back().data_ptr<float>();
    }
    Pp[i] = params[i].data_ptr<float>();
    Vp[i] = vs[i].data_ptr<float>();
    float* st = steps[i].data_ptr<float>();
    *st += 1.0f;
    const double t = (double)*st;
    // the reference's scalars: Python floats (double), rounded to float where a tensor op uses them
    sc[i].step_size = (float)(lr / (1.0 - std::pow(beta1, t)));
    sc[i].bc2_sqrt = (float)std::sqrt(1.0 - std::pow(beta2, t));
    sc[i].decay = dp[i] ? (float)(1.0 - lr * weight_decay) : 1.0f;
    Momentum& mo = Mo[i];
    mo.kind = kp[i];
    mo.data = exp_avgs[i].data_ptr();
    mo.seed = step_seed((uint32_t)seedp[i], t);
    mo.scale = nullptr;
    mo.row = mo.groups = 0;
    if (mo.kind == 2) {
      mo.scale = scales[i].data_ptr<float>();
      mo.row = params[i].numel() / params[i].size(0);
      mo.groups = scales[i].size(1);
    }
  }
  // 1 - beta in double: in float, 1 - 0.999f cancels to 0.00099998713 (1.3e-5 off)
  const Hyper h{(float)(1.0 - beta1), (float)beta2, (float)(1.0 - beta2), (float)eps, maximize ? -1.0f : 1.0f};

  const Item& last = it[C - 1];
  const at::Tensor& lp = params[last.param];
  const int64_t total = last.start + (last.block_size > 0    ? last.blocks * last.block_size
                                      : last.block_size == -1 ? last.blocks * lp.size(1)
                                                              : lp.size(-2) * lp.size(-1));
  // each factored item's column sums, added into the column EMAs after the parallel step
  std::vector<std::vector<double>> colsums(C);
  for (int64_t c = 0; c < C; ++c) {
    if (it[c].block_size == -1) colsums[c].assign(params[it[c].param].size(1), 0.0);
  }
  const int64_t T = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), C));
  // threads split the items by an estimate of their memory traffic (bytes per element: p read and written,
  // g read, m read and written at its width, per-element v read and written), not by element count
  std::vector<int64_t> starts(C);
  int64_t cost = 0;
  for (int64_t c = 0; c < C; ++c) {
    starts[c] = cost;
    const Item& x = it[c];
    const int64_t n = (c + 1 < C ? it[c + 1].start : total) - x.start;
    const int kind = Mo[x.param].kind;
    const int64_t per = 12 + (kind == 0 ? 8 : kind == 1 ? 4 : 2) + (x.block_size == 1 ? 8 : 0) +
                        (x.block_size == -1 ? 2 : 0);  // factored: its column work
    cost += n * per;
  }

  at::parallel_for(0, T, 1, [&](int64_t tb, int64_t te) {
    for (int64_t k = tb; k < te; ++k) {
      const int64_t lo = cost * k / T, hi = cost * (k + 1) / T;
      int64_t c = std::lower_bound(starts.begin(), starts.end(), lo) - starts.begin();
      const int64_t c_end = std::lower_bound(starts.begin(), starts.end(), hi) - starts.begin();
      for (; c < c_end; ++c) {
        const Item& x = it[c];
        const int64_t i = x.param;
        const Momentum& mo = Mo[i];
        float* p = Pp[i] + x.offset;
        const float* g = Gp[i] + x.offset;
        float* v = Vp[i] + x.v_offset;
        if (x.block_size == -1) {  // whole-tensor pointers: the item's rows are r0 to r0 + blocks
          const int64_t rows = params[i].size(0), cols = params[i].size(1), r0 = x.offset / cols;
          double* cs = colsums[c].data();
          if (mo.kind == 2) {
            factorwise<2>(Pp[i], Gp[i], mo, Vp[i], rows, cols, r0, x.blocks, cs, sc[i], h);
          } else if (mo.kind == 1) {
            factorwise<1>(Pp[i], Gp[i], mo, Vp[i], rows, cols, r0, x.blocks, cs, sc[i], h);
          } else if (cols <= kNarrowCols) {
            factorwise<0, true>(Pp[i], Gp[i], mo, Vp[i], rows, cols, r0, x.blocks, cs, sc[i], h);
          } else {
            factorwise<0, false>(Pp[i], Gp[i], mo, Vp[i], rows, cols, r0, x.blocks, cs, sc[i], h);
          }
        } else if (x.block_size == 0) {
          const int64_t rows = params[i].size(-2), cols = params[i].size(-1);
          const int32_t* cm = colmaps[i].data_ptr<int32_t>();
          if (mo.kind == 2) {
            columnwise<2>(p, g, mo, v, rows, cols, cm, x.blocks, sc[i], h, x.offset);
          } else if (mo.kind == 1) {
            columnwise<1>(p, g, mo, v, rows, cols, cm, x.blocks, sc[i], h, x.offset);
          } else {
            columnwise<0>(p, g, mo, v, rows, cols, cm, x.blocks, sc[i], h, x.offset);
          }
        } else if (mo.kind == 2 && x.block_size == 1) {
          elementwise_int8(p, g, mo, v, x.blocks, sc[i], h, x.offset);
        } else if (mo.kind == 2) {
          blockwise_int8(p, g, mo, v, x.blocks, x.block_size, sc[i], h, x.offset);
        } else if (x.block_size == 1 && mo.kind == 1) {
          elementwise<true>(p, g, (uint16_t*)mo.data + x.offset, v, x.blocks, sc[i], h, mo.seed, x.offset);
        } else if (x.block_size == 1) {
          elementwise<false>(p, g, (float*)mo.data + x.offset, v, x.blocks, sc[i], h, 0, 0);
        } else if (mo.kind == 1) {
          blockwise_bf16(p, g, (uint16_t*)mo.data + x.offset, v, x.blocks, x.block_size, sc[i], h, mo.seed, x.offset);
        } else {
          blockwise_halves(p, g, (float*)mo.data + x.offset, v, x.blocks, x.block_size, sc[i], h);
        }
      }
    }
  });
  // factored matrices: their items' column sums (in item order), then the column EMAs
  std::vector<double> total_cs;
  for (int64_t c = 0; c < C; ++c) {
    if (it[c].block_size != -1) continue;
    const int64_t i = it[c].param, rows = params[i].size(0), cols = params[i].size(1);
    if (it[c].offset == 0) total_cs.assign(cols, 0.0);
    for (int64_t k = 0; k < cols; ++k) total_cs[k] += colsums[c][k];
    if (it[c].offset / cols + it[c].blocks == rows) {  // the matrix's last item
      float* vc = Vp[i] + rows;
      for (int64_t k = 0; k < cols; ++k) vc[k] = h.b2 * vc[k] + h.omb2 * (float)(total_cs[k] / (double)rows);
    }
  }
}

// Compact weights (kernels/weights.py has the same formats, hash and formulas): fp32 `wide` stored
// into bf16 `p` and its remainder, in place. mode 0: bf16 with stochastic rounding (no remainder);
// 1: stochastic rounding to 24 bits, then the nearest bf16 and an int8 remainder; 2: the nearest bf16
// (ties away from zero) and the 16 low bits as an int16 remainder (exact). `offset`: the first
// element's index in the full tensor (the random bits do not depend on how a tensor is cut).
void narrow_weights(const at::Tensor& wide, const at::Tensor& p, const at::Tensor& rem, int64_t mode, int64_t seed,
                    int64_t offset) {
  TORCH_CHECK(wide.scalar_type() == at::kFloat && wide.is_contiguous() && wide.device().is_cpu(),
              "narrow_weights: wide must be a contiguous float32 CPU tensor");
  TORCH_CHECK(p.scalar_type() == at::kBFloat16 && p.is_contiguous() && p.numel() == wide.numel(),
              "narrow_weights: p must be a contiguous bf16 tensor of wide's size");
  TORCH_CHECK(mode >= 0 && mode <= 2, "narrow_weights: mode must be 0, 1 or 2");
  const auto want = mode == 1 ? at::kChar : at::kShort;
  TORCH_CHECK(mode == 0 || (rem.scalar_type() == want && rem.is_contiguous() && rem.numel() == wide.numel()),
              "narrow_weights: the remainder does not match the mode");
  const int32_t* __restrict w = (const int32_t*)wide.data_ptr<float>();
  uint16_t* __restrict hi = (uint16_t*)p.data_ptr();
  const uint32_t s = (uint32_t)seed;
  const int64_t n = wide.numel();
  at::parallel_for(0, n, 1 << 16, [&](int64_t b, int64_t e) {
    if (mode == 0) {
#pragma omp simd
      for (int64_t i = b; i < e; ++i) {
        const int64_t r = hash_at(s, offset + i) & 0xFFFF;
        hi[i] = (uint16_t)(((int64_t)w[i] + r) >> 16);
      }
    } else if (mode == 1) {
      int8_t* __restrict lo = rem.data_ptr<int8_t>();
#pragma omp simd
      for (int64_t i = b; i < e; ++i) {
        const int64_t r = hash_at(s, offset + i) & 0xFF;
        const int32_t q = (int32_t)(((int64_t)w[i] + r) >> 8);
        const int32_t h = (q + 0x80) >> 8;
        hi[i] = (uint16_t)h;
        lo[i] = (int8_t)(q - h * 256);
      }
    } else {
      int16_t* __restrict lo = rem.data_ptr<int16_t>();
#pragma omp simd
      for (int64_t i = b; i < e; ++i) {
        const int32_t h = (int32_t)(((int64_t)w[i] + 0x8000) >> 16);
        hi[i] = (uint16_t)h;
        lo[i] = (int16_t)((int64_t)w[i] - (int64_t)h * 65536);
      }
    }
  });
}

TORCH_LIBRARY(blockopt_cpu, m) {
  m.def("adam_mini_step", &adam_mini_step);
  m.def("narrow_weights", &narrow_weights);
}
