// Native CPU BatchNorm with a fused residual add and activation: the kernels, the ops that run them, and
// their autograd.
//
// Shapes: x is the input as fused_ops/batch_norm.py's _flatten leaves it, either
//   rows    (M, C): channels innermost (2-D input; channels_last / channels_last_3d input), or
//   planes  (N, C, L): each (n, c) a row of L values (3-D input; any other N-D input);
// weight, bias, running_mean, running_var (C,); residual like x; n = values per channel (M, or N * L).
// Inputs that are not contiguous in that shape are copied first (the flattened layouts always are).
//
// The math (fused_ops/batch_norm.py's module docstring has the derivation), per channel:
//   forward   u = (x - mean) * scale + beta (+ residual),  y = act(u),  scale = gamma * invstd
//   backward  g = dy * act'(u);  dbeta = sum(g),  dgamma = invstd * sum(g * (x - mean)),  dresidual = g
//             dx = g * scale + (x - mean) * b + k, where in training
//               b = -scale * invstd^2 * sum(g * (x - mean)) / n'   (n' = n, or n - 1 with unbiased)
//               k = -scale * sum(g) / n
//             and in eval (running stats are constants) b = k = 0.
//   act'      1 (none); dy where y > 0 (relu: torch's threshold_backward); 1 - y^2 (tanh);
//             s * (1 + u * (1 - s)), s = sigmoid(u), u recomputed from x (silu)
//
// Byte model, in passes over an n x C tensor of x's dtype:
//   training forward   read x once for the statistics (each chunk is read from memory, then again from
//                      cache), then read x (and the residual) and write y: 2 reads (3) + 1 write
//   eval forward       read x (and the residual), write y: 1 read (2) + 1 write
//   backward           read dy, x, and y or the residual (the sums), then read them again and write dx
//                      (and dresidual): 6 reads + 1 write (2) in training and eval
//
// Numerics: everything is computed in acc_t, float32 (float64 for float64 input); y and dx are rounded
// once. The variance is taken in two passes over each chunk of at most kChunk values (held in cache):
// its mean, then the sum of squared deviations from it, M2; chunks merge in a fixed order with Chan et
// al.'s formula (M2 = M2_a + M2_b + delta^2 * n_a n_b / n). Accurate when |mean| >> std.
//
// Determinism: the chunks and blocks that make up a reduction, and the order in which they merge, are fixed
// by the shape alone; at::parallel_for only chooses which thread runs which block. Results are the
// same, bit for bit, on any number of threads.
//
// Registered ops (namespace fused_ops; fake kernels in batch_norm.py beside this file):
//   batch_norm(...) -> Tensor                        y; differentiable (the Autograd kernel below)
//   batch_norm_fwd(...) -> (Tensor, Tensor, Tensor)  y, mean, invstd; updates the running stats in training
//   batch_norm_bwd(...) -> (Tensor, Tensor, Tensor, Tensor)   dx, dweight, dbias, dresidual

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/SmallVector.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <optional>
#include <tuple>
#include <type_traits>

#include "common.h"

namespace fused_ops {
namespace {

using at::Tensor;
namespace vec = at::vec;

// activation codes, as fused_ops/kernels/cpu/batch_norm.py's ACTIVATIONS
constexpr int64_t kNone = 0;
constexpr int64_t kRelu = 1;
constexpr int64_t kTanh = 2;
constexpr int64_t kSilu = 3;

// Reductions work on chunks of at most kChunk values (64 KiB of float32: in L2 for the second pass) and
// on blocks of about kBlock values (one task of at::parallel_for each).
constexpr int64_t kChunk = int64_t(1) << 14;
constexpr int64_t kBlock = int64_t(1) << 18;
constexpr int64_t kSumRows = 16;  // rows per float partial of the backward's sums (see grad_sums_pass)
constexpr size_t kHeldBuffers = 8;  // freed N x C buffers kept for reuse (see empty_like_input)

int64_t divup(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ----------------------------------------------------------------------------------------------------
// Vector I/O: units of kUnit values of scalar_t in memory as kParts vectors of acc_t (two float vectors
// for a bfloat16/half vector, one otherwise). A partial unit (n < kUnit) loads zeros past n.
// ----------------------------------------------------------------------------------------------------
template <typename scalar_t>
struct IO {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = vec::Vectorized<acc_t>;
  using sVec = vec::Vectorized<scalar_t>;
  using scalar_type = scalar_t;
  static constexpr bool kReduced = !std::is_same_v<scalar_t, acc_t>;
  static constexpr int kParts = kReduced ? 2 : 1;
  static constexpr int64_t kLanes = Vec::size();
  static constexpr int64_t kUnit = kParts * kLanes;
  struct Unit {
    Vec v[kParts];
  };

  static Unit load(const scalar_t* p, int64_t n) {
    Unit u;
    if constexpr (kReduced) {
      const sVec s = n == kUnit ? sVec::loadu(p) : sVec::loadu(p, n);
      std::tie(u.v[0], u.v[1]) = vec::convert_to_float<scalar_t>(s);
    } else {
      u.v[0] = n == kUnit ? Vec::loadu(p) : Vec::loadu(p, n);
    }
    return u;
  }

  static void store(scalar_t* p, const Unit& u, int64_t n) {
    if constexpr (kReduced) {
      const sVec s = vec::convert_from_float<scalar_t>(u.v[0], u.v[1]);
      if (n == kUnit) s.store(p); else s.store(p, n);
    } else {
      if (n == kUnit) u.v[0].store(p); else u.v[0].store(p, n);
    }
  }

  // lanes of part k that hold values, for a unit of n values
  static int64_t valid(int64_t n, int k) { return std::clamp<int64_t>(n - k * kLanes, 0, kLanes); }
};

// f(offset, n) over [0, len) in units: n == kUnit but for a last, partial unit.
template <int64_t kUnit, typename F>
C10_ALWAYS_INLINE void for_units(int64_t len, const F& f) {
  int64_t i = 0;
  for (; i + kUnit <= len; i += kUnit) f(i, kUnit);
  if (i < len) f(i, len - i);
}

// The per-channel constants of a pass, (C,) arrays in acc_t padded with zeros to whole units:
//   forward   y = act((x - mean) * scale + shift (+ r)),   scale = gamma * invstd, shift = beta
//   backward  dx = g * scale + (x - mean) * b + k          (shift: for silu's u; b, k: see the header)
template <typename acc_t>
struct Channels {
  const acc_t* mean;
  const acc_t* scale;
  const acc_t* shift;
  const acc_t* b;  // backward only
  const acc_t* k;
};

// Those constants as vectors, for one unit of values (per part). A row of the rows layout spans the
// channels: its unit at channel offset c takes its lanes' constants from the arrays (`lanes`). A row of
// the planes layout is one channel c, whose constants every lane takes (`broadcast`).
template <typename io, bool BACKWARD>
struct ChannelVecs {
  typename io::Vec mean[io::kParts], scale[io::kParts], shift[io::kParts], b[io::kParts], k[io::kParts];

  static ChannelVecs lanes(const Channels<typename io::acc_t>& a, int64_t c) {
    ChannelVecs v;
    for (int p = 0; p < io::kParts; ++p) {
      const int64_t o = c + p * io::kLanes;
      v.mean[p] = io::Vec::loadu(a.mean + o);
      v.scale[p] = io::Vec::loadu(a.scale + o);
      v.shift[p] = io::Vec::loadu(a.shift + o);
      if constexpr (BACKWARD) {
        v.b[p] = io::Vec::loadu(a.b + o);
        v.k[p] = io::Vec::loadu(a.k + o);
      }
    }
    return v;
  }

  static ChannelVecs broadcast(const Channels<typename io::acc_t>& a, int64_t c) {
    ChannelVecs v;
    for (int p = 0; p < io::kParts; ++p) {
      v.mean[p] = typename io::Vec(a.mean[c]);
      v.scale[p] = typename io::Vec(a.scale[c]);
      v.shift[p] = typename io::Vec(a.shift[c]);
      if constexpr (BACKWARD) {
        v.b[p] = typename io::Vec(a.b[c]);
        v.k[p] = typename io::Vec(a.k[c]);
      }
    }
    return v;
  }
};

// ----------------------------------------------------------------------------------------------------
// Activations on acc_t vectors.
// ----------------------------------------------------------------------------------------------------
template <typename Vec>
Vec sigmoid(const Vec& u) {  // 1 / (1 + exp(-u)): 0 and 1 at the ends, no nan from inf / inf
  return Vec(1) / (Vec(1) + u.neg().exp());
}

// tanh in float32: 1 - 2 / (exp(2|u|) + 1) with u's sign for |u| >= 0.4, the Taylor series to u^13 below
// (its next term is below 3e-9 relative there, and it avoids the cancellation of the first form near 0).
// Within 2 ulp of the exact value (torch's tanh is within 1; tests/test_batch_norm_native.py measures
// both), at half the cost of Sleef's tanh: at makemore's sizes tanh is most of the forward.
inline vec::Vectorized<float> tanh_float(const vec::Vectorized<float>& u) {
  using Vec = vec::Vectorized<float>;
  const Vec a = u.abs();
  const Vec e = (a + a).exp();
  const Vec large = Vec(1.f) - Vec(2.f) / (e + Vec(1.f));  // nan stays nan, inf gives 1
  const Vec u2 = u * u;
  Vec p = vec::fmadd(u2, Vec(21844.f / 6081075.f), Vec(-1382.f / 155925.f));
  p = vec::fmadd(u2, p, Vec(62.f / 2835.f));
  p = vec::fmadd(u2, p, Vec(-17.f / 315.f));
  p = vec::fmadd(u2, p, Vec(2.f / 15.f));
  p = vec::fmadd(u2, p, Vec(-1.f / 3.f));
  const Vec small = vec::fmadd(u * u2, p, u);  // u - u^3/3 + 2u^5/15 - ...
  const Vec signed_large = Vec::blendv(large, large.neg(), u < Vec(0.f));
  return Vec::blendv(signed_large, small, a < Vec(0.4f));
}

template <int64_t ACT, typename Vec>
C10_ALWAYS_INLINE Vec activate(const Vec& u) {
  if constexpr (ACT == kRelu) {
    return vec::clamp_min(u, Vec(0));  // max(u, 0), nan stays nan (as torch.relu)
  } else if constexpr (ACT == kTanh) {
    if constexpr (std::is_same_v<Vec, vec::Vectorized<float>>) return tanh_float(u); else return u.tanh();
  } else if constexpr (ACT == kSilu) {
    return u * sigmoid(u);
  } else {
    return u;
  }
}

// g = dy * act'(u): from the output y (relu, tanh), from u (silu), dy itself (none).
template <int64_t ACT, typename Vec>
C10_ALWAYS_INLINE Vec activation_grad(const Vec& dy, const Vec& y, const Vec& u) {
  if constexpr (ACT == kRelu) {
    return Vec::blendv(dy, Vec(0), y <= Vec(0));  // torch's threshold_backward: 0 where y <= 0, else dy
  } else if constexpr (ACT == kTanh) {
    return dy * (Vec(1) - y * y);  // d tanh(u)/du = 1 - tanh(u)^2
  } else if constexpr (ACT == kSilu) {
    const Vec s = sigmoid(u);  // d (u s)/du = s (1 + u (1 - s))
    return dy * s * (Vec(1) + u * (Vec(1) - s));
  } else {
    return dy;
  }
}

// ----------------------------------------------------------------------------------------------------
// One unit of values: the data at index i (n values), with its channels' constants `ch`.
// ----------------------------------------------------------------------------------------------------

// y = act((x - mean) * scale + shift + r)   read x (and r), write y
template <int64_t ACT, typename io>
C10_ALWAYS_INLINE void forward_unit(const typename io::scalar_type* x, const typename io::scalar_type* r,
                                    typename io::scalar_type* y, int64_t i, int64_t n,
                                    const ChannelVecs<io, false>& ch) {
  const auto xu = io::load(x + i, n);
  typename io::Unit ru{}, yu;
  if (r != nullptr) ru = io::load(r + i, n);
  for (int p = 0; p < io::kParts; ++p) {
    auto u = vec::fmadd(xu.v[p] - ch.mean[p], ch.scale[p], ch.shift[p]);
    if (r != nullptr) u = u + ru.v[p];
    yu.v[p] = activate<ACT>(u);
  }
  io::store(y + i, yu, n);
}

// The inputs of the backward (y and r may be null).
template <typename scalar_t>
struct GradInputs {
  const scalar_t* dy;
  const scalar_t* x;
  const scalar_t* y;  // relu, tanh
  const scalar_t* r;  // silu with a residual
};

// {g, x - mean} of a unit, g = dy * act'(u) (u recomputed for silu).
template <int64_t ACT, typename io>
C10_ALWAYS_INLINE std::array<typename io::Unit, 2> unit_grad(const GradInputs<typename io::scalar_type>& in,
                                                             int64_t i, int64_t n, const ChannelVecs<io, true>& ch) {
  const auto dy = io::load(in.dy + i, n);
  auto x = io::load(in.x + i, n);
  typename io::Unit y{}, r{};
  if constexpr (ACT == kRelu || ACT == kTanh) y = io::load(in.y + i, n);
  if constexpr (ACT == kSilu) {
    if (in.r != nullptr) r = io::load(in.r + i, n);
  }
  std::array<typename io::Unit, 2> gx;
  for (int p = 0; p < io::kParts; ++p) {
    gx[1].v[p] = x.v[p] - ch.mean[p];
    typename io::Vec u(0);
    if constexpr (ACT == kSilu) {
      u = vec::fmadd(gx[1].v[p], ch.scale[p], ch.shift[p]);
      if (in.r != nullptr) u = u + r.v[p];
    }
    gx[0].v[p] = activation_grad<ACT>(dy.v[p], y.v[p], u);
  }
  return gx;
}

// The terms of the backward's sums: {g, g * (x - mean)}. Padding lanes: dy = 0 gives g = 0.
template <int64_t ACT, typename io>
C10_ALWAYS_INLINE std::array<typename io::Unit, 2> grad_terms(const GradInputs<typename io::scalar_type>& in,
                                                              int64_t i, int64_t n, const ChannelVecs<io, true>& ch) {
  auto t = unit_grad<ACT, io>(in, i, n, ch);
  for (int p = 0; p < io::kParts; ++p) t[1].v[p] = t[0].v[p] * t[1].v[p];
  return t;
}

// dx = g * scale + (x - mean) * b + k, dresidual = g   read dy, x, y or r; write dx (and dr)
template <int64_t ACT, typename io>
C10_ALWAYS_INLINE void grad_input_unit(const GradInputs<typename io::scalar_type>& in, typename io::scalar_type* dx,
                                       typename io::scalar_type* dr, int64_t i, int64_t n,
                                       const ChannelVecs<io, true>& ch) {
  const auto gx = unit_grad<ACT, io>(in, i, n, ch);
  typename io::Unit dxu;
  for (int p = 0; p < io::kParts; ++p) {
    dxu.v[p] = vec::fmadd(gx[0].v[p], ch.scale[p], vec::fmadd(gx[1].v[p], ch.b[p], ch.k[p]));
  }
  if (dx != nullptr) io::store(dx + i, dxu, n);
  if (dr != nullptr) io::store(dr + i, gx[0], n);
}

// f(i, n, ch) over the units of rows [r0, r1) of C channels: the unit of n values at index i, and its
// channels' constants (loaded from `a` at the unit's channel offset). Rows go four at a time, which
// share each unit's constants: loading them for every row made the passes over rows with few channels
// (a channels_last CNN layer) bound by loads, not by memory.
template <typename io, bool BACKWARD, typename F>
C10_ALWAYS_INLINE void for_row_units(int64_t r0, int64_t r1, int64_t C, const Channels<typename io::acc_t>& a,
                                     const F& f) {
  int64_t row = r0;
  for (; row + 4 <= r1; row += 4) {
    for_units<io::kUnit>(C, [&](int64_t c, int64_t n) C10_ALWAYS_INLINE_ATTRIBUTE {
      const auto ch = ChannelVecs<io, BACKWARD>::lanes(a, c);
      for (int64_t q = 0; q < 4; ++q) f((row + q) * C + c, n, ch);
    });
  }
  for (; row < r1; ++row) {
    for_units<io::kUnit>(C, [&](int64_t c, int64_t n) C10_ALWAYS_INLINE_ATTRIBUTE {
      f(row * C + c, n, ChannelVecs<io, BACKWARD>::lanes(a, c));
    });
  }
}

// Reductions over rows of C channels: sums[s][c] += sum over rows [r0, r1) of term(i, n, c)[s], the
// terms of the unit of n values at index i, channel offset c. Rows go four at a time, their terms added
// in registers before the one load-add-store of each (C,) accumulator: one per row would chain every
// row through memory (store-to-load forwarding), which made the reductions of rows with few channels
// twice slower than their memory traffic.
template <int NSUMS, typename io, typename Term>
void sum_rows(int64_t r0, int64_t r1, int64_t C, typename io::acc_t* const* sums, const Term& term) {
  using Vec = typename io::Vec;
  auto add = [&](int64_t c, const std::array<typename io::Unit, NSUMS>& t) C10_ALWAYS_INLINE_ATTRIBUTE {
    for (int s = 0; s < NSUMS; ++s) {
      for (int p = 0; p < io::kParts; ++p) {
        typename io::acc_t* q = sums[s] + c + p * io::kLanes;  // (C,) arrays padded to whole units
        (Vec::loadu(q) + t[s].v[p]).store(q);
      }
    }
  };
  int64_t i = r0;
  for (; i + 4 <= r1; i += 4) {
    for_units<io::kUnit>(C, [&](int64_t c, int64_t n) C10_ALWAYS_INLINE_ATTRIBUTE {
      const int64_t at = i * C + c;
      const auto t0 = term(at, n, c), t1 = term(at + C, n, c), t2 = term(at + 2 * C, n, c);
      const auto t3 = term(at + 3 * C, n, c);
      std::array<typename io::Unit, NSUMS> t;
      for (int s = 0; s < NSUMS; ++s) {
        for (int p = 0; p < io::kParts; ++p) t[s].v[p] = (t0[s].v[p] + t1[s].v[p]) + (t2[s].v[p] + t3[s].v[p]);
      }
      add(c, t);
    });
  }
  for (; i < r1; ++i) {
    for_units<io::kUnit>(C, [&](int64_t c, int64_t n) C10_ALWAYS_INLINE_ATTRIBUTE { add(c, term(i * C + c, n, c)); });
  }
}

// ----------------------------------------------------------------------------------------------------
// The layout: what a kernel needs to walk x.
// ----------------------------------------------------------------------------------------------------
struct Shape {
  bool rows;  // (M, C) rows; else (N, C, L) planes
  int64_t N;  // rows: M
  int64_t C;
  int64_t L;  // rows: 1
  int64_t count() const { return N * L; }
};

// Per-channel constants in acc_t, each padded with zeros to whole units (rows read them as vectors).
template <typename acc_t>
struct ChannelArrays {
  int64_t padded;
  c10::SmallVector<acc_t, 256> data;
  ChannelArrays(int64_t C, int64_t unit, int count) : padded(divup(C, unit) * unit), data(padded * count, acc_t(0)) {}
  acc_t* operator[](int i) { return data.data() + i * padded; }
};

// A (C,) tensor of any float dtype, read as acc_t into out (1 when absent: `fill`).
template <typename acc_t>
void read_channels(const std::optional<Tensor>& t, acc_t* out, int64_t C, acc_t fill) {
  if (!t.has_value()) {
    std::fill_n(out, C, fill);
    return;
  }
  const Tensor& v = *t;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, v.scalar_type(), "batch_norm_read", [&] {
    const scalar_t* p = v.const_data_ptr<scalar_t>();
    const int64_t s = v.stride(0);
    for (int64_t c = 0; c < C; ++c) out[c] = static_cast<acc_t>(p[c * s]);
  });
}

// Chan et al.'s merge of (n_b, mean_b, m2_b) into (n_a, mean_a, m2_a), in double, over `padded`
// channels: mean = mean_a + delta * n_b / n, M2 = M2_a + M2_b + delta^2 * n_a * n_b / n, delta = mean_b - mean_a.
inline void merge_moments(double* mean_a, double* m2_a, double n_a, const double* mean_b, const double* m2_b,
                          double n_b, int64_t padded) {
  using dVec = vec::Vectorized<double>;
  const double n = n_a + n_b;
  const dVec wb(n_b / n), wab(n_a * n_b / n);
  int64_t c = 0;
  for (; c + dVec::size() <= padded; c += dVec::size()) {
    const dVec ma = dVec::loadu(mean_a + c), delta = dVec::loadu(mean_b + c) - ma;
    vec::fmadd(delta, wb, ma).store(mean_a + c);
    (dVec::loadu(m2_a + c) + dVec::loadu(m2_b + c) + delta * delta * wab).store(m2_a + c);
  }
  for (; c < padded; ++c) {
    const double delta = mean_b[c] - mean_a[c];
    mean_a[c] += delta * (n_b / n);
    m2_a[c] += m2_b[c] + delta * delta * (n_a * n_b / n);
  }
}

// ----------------------------------------------------------------------------------------------------
// Training statistics: per channel mean and M2 = sum (x - mean)^2.
// ----------------------------------------------------------------------------------------------------

// Rows: the rows are cut into blocks (one task each) of chunks of R rows (R * C <= kChunk, or one row).
// A chunk's moments take two passes over it, the second from cache (the corrected two-pass algorithm:
// with d = x - the first pass's mean, mean += sum(d) / n and M2 = sum(d^2) - sum(d)^2 / n, which undoes
// the rounding of the first pass); chunks merge into their block's in double, in order, and the blocks
// in block order.   read x once from memory
template <typename scalar_t>
void rows_moments(const scalar_t* x, const Shape& s, at::opmath_type<scalar_t>* mean, at::opmath_type<scalar_t>* m2) {
  using io = IO<scalar_t>;
  using acc_t = typename io::acc_t;
  using Vec = typename io::Vec;
  const int64_t M = s.N, C = s.C;
  const int64_t padded = divup(C, io::kUnit) * io::kUnit;
  const int64_t chunk_rows = std::max<int64_t>(1, kChunk / C);
  const int64_t block_rows = chunk_rows * std::max<int64_t>(1, kBlock / (chunk_rows * C));
  const int64_t blocks = divup(M, block_rows);
  c10::SmallVector<double, 512> partial(2 * blocks * padded);  // per block: mean, m2
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    c10::SmallVector<acc_t, 512> chunk(3 * padded);
    acc_t* cm = chunk.data();            // the first pass's sums, then mean
    acc_t* cd = cm + padded;             // sum(d)
    acc_t* cdd = cd + padded;            // sum(d^2)
    c10::SmallVector<double, 512> moments(2 * padded);
    for (int64_t b = b0; b < b1; ++b) {
      double* bm = partial.data() + 2 * b * padded;
      double* bm2 = bm + padded;
      const int64_t end = std::min(M, (b + 1) * block_rows);
      double merged = 0;
      for (int64_t r0 = b * block_rows; r0 < end; r0 += chunk_rows) {
        const int64_t r1 = std::min(end, r0 + chunk_rows);
        const double rows = static_cast<double>(r1 - r0);
        std::fill(chunk.begin(), chunk.end(), acc_t(0));
        acc_t* const pass1[] = {cm};  // pass 1: the chunk's sums, then its mean
        sum_rows<1, io>(r0, r1, C, pass1, [&](int64_t i, int64_t n, int64_t) C10_ALWAYS_INLINE_ATTRIBUTE {
          return std::array<typename io::Unit, 1>{io::load(x + i, n)};
        });
        const Vec inv(static_cast<acc_t>(1.0 / rows));
        for (int64_t c = 0; c < padded; c += io::kLanes) (Vec::loadu(cm + c) * inv).store(cm + c);
        acc_t* const pass2[] = {cd, cdd};  // pass 2, the chunk now in cache: d = x - mean, d^2
        sum_rows<2, io>(r0, r1, C, pass2, [&](int64_t i, int64_t n, int64_t c) C10_ALWAYS_INLINE_ATTRIBUTE {
          const auto xu = io::load(x + i, n);
          std::array<typename io::Unit, 2> t;
          for (int k = 0; k < io::kParts; ++k) {
            t[0].v[k] = xu.v[k] - Vec::loadu(cm + c + k * io::kLanes);  // padding lanes: 0 - 0
            t[1].v[k] = t[0].v[k] * t[0].v[k];
          }
          return t;
        });
        double* chunk_mean = merged == 0 ? bm : moments.data();
        double* chunk_m2 = merged == 0 ? bm2 : moments.data() + padded;
        const double inv_rows = 1.0 / rows;
        for (int64_t c = 0; c < padded; ++c) {
          const double sd = static_cast<double>(cd[c]);
          chunk_mean[c] = static_cast<double>(cm[c]) + sd * inv_rows;
          chunk_m2[c] = std::max(0.0, static_cast<double>(cdd[c]) - sd * sd * inv_rows);
        }
        if (merged > 0) merge_moments(bm, bm2, merged, chunk_mean, chunk_m2, rows, padded);
        merged += rows;
      }
    }
  });
  for (int64_t b = 1; b < blocks; ++b) {  // in block order, whatever the threads
    const double* bm = partial.data() + 2 * b * padded;
    const double rows_b = static_cast<double>(std::min(M, (b + 1) * block_rows) - b * block_rows);
    merge_moments(partial.data(), partial.data() + padded, static_cast<double>(b * block_rows), bm, bm + padded,
                  rows_b, padded);
  }
  for (int64_t c = 0; c < C; ++c) {
    mean[c] = static_cast<acc_t>(partial[c]);
    m2[c] = static_cast<acc_t>(partial[padded + c]);
  }
}

// Planes: one channel per task; its N rows of L cut into chunks of whole rows (R * L <= kChunk) or of
// pieces of one row (L > kChunk); two passes over each chunk (as in rows_moments), merged in order in
// double.   read x once from memory
template <typename scalar_t>
void planes_moments(const scalar_t* x, const Shape& s, at::opmath_type<scalar_t>* mean, at::opmath_type<scalar_t>* m2) {
  using io = IO<scalar_t>;
  using acc_t = typename io::acc_t;
  using Vec = typename io::Vec;
  const int64_t N = s.N, C = s.C, L = s.L;
  const int64_t piece = std::min(L, kChunk);                       // values of a row per chunk
  const int64_t chunk_rows = L >= kChunk ? 1 : kChunk / L;          // rows per chunk
  const int64_t grain = std::max<int64_t>(1, kBlock / std::max<int64_t>(1, N * L));
  at::parallel_for(0, C, grain, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double n_a = 0, mean_a = 0, m2_a = 0;
      for (int64_t n0 = 0; n0 < N; n0 += chunk_rows) {
        const int64_t n1 = std::min(N, n0 + chunk_rows);
        for (int64_t l0 = 0; l0 < L; l0 += piece) {
          const int64_t l1 = std::min(L, l0 + piece);
          Vec s0(0), s1(0);
          for (int64_t i = n0; i < n1; ++i) {
            const scalar_t* row = x + (i * C + c) * L;
            for_units<io::kUnit>(l1 - l0, [&](int64_t j, int64_t n) C10_ALWAYS_INLINE_ATTRIBUTE {
              const auto xu = io::load(row + l0 + j, n);
              s0 = s0 + xu.v[0];
              if constexpr (io::kParts == 2) s1 = s1 + xu.v[1];
            });
          }
          const double count = static_cast<double>((n1 - n0) * (l1 - l0));
          const acc_t cm = static_cast<acc_t>(static_cast<double>(vec::vec_reduce_all<acc_t>(
                               [](Vec& a, Vec& b) { return a + b; }, s0 + s1)) / count);
          const Vec vm(cm);
          Vec q0(0), q1(0), d0s(0), d1s(0);
          for (int64_t i = n0; i < n1; ++i) {  // pass 2, from cache: d = x - mean (see rows_moments)
            const scalar_t* row = x + (i * C + c) * L;
            for_units<io::kUnit>(l1 - l0, [&](int64_t j, int64_t n) C10_ALWAYS_INLINE_ATTRIBUTE {
              const auto xu = io::load(row + l0 + j, n);
              Vec d0 = xu.v[0] - vm;
              if (n < io::kUnit) d0 = Vec::set(Vec(0), d0, io::valid(n, 0));  // padding lanes hold 0 - mean
              d0s = d0s + d0;
              q0 = vec::fmadd(d0, d0, q0);
              if constexpr (io::kParts == 2) {
                Vec d1 = xu.v[1] - vm;
                if (n < io::kUnit) d1 = Vec::set(Vec(0), d1, io::valid(n, 1));
                d1s = d1s + d1;
                q1 = vec::fmadd(d1, d1, q1);
              }
            });
          }
          const auto add = [](Vec& a, Vec& b) { return a + b; };
          const double sd = static_cast<double>(vec::vec_reduce_all<acc_t>(add, d0s + d1s));
          const double cm2 = std::max(0.0, static_cast<double>(vec::vec_reduce_all<acc_t>(add, q0 + q1)) -
                                               sd * sd / count);
          const double chunk_mean = static_cast<double>(cm) + sd / count;
          if (n_a == 0) {
            mean_a = chunk_mean, m2_a = cm2;
          } else {  // Chan et al., in double: one merge per chunk
            const double total = n_a + count, delta = chunk_mean - mean_a;
            mean_a += delta * count / total;
            m2_a += cm2 + delta * delta * n_a * count / total;
          }
          n_a += count;
        }
      }
      mean[c] = static_cast<acc_t>(mean_a);
      m2[c] = static_cast<acc_t>(m2_a);
    }
  });
}

// ----------------------------------------------------------------------------------------------------
// The passes over the whole tensor.
// ----------------------------------------------------------------------------------------------------

// y = act((x - mean) * scale + shift + r)
template <int64_t ACT, typename scalar_t>
void forward_pass(const scalar_t* x, const scalar_t* r, scalar_t* y, const Shape& s,
                  const Channels<at::opmath_type<scalar_t>>& a) {
  using io = IO<scalar_t>;
  const int64_t C = s.C, L = s.L;
  if (s.rows) {
    at::parallel_for(0, s.N, std::max<int64_t>(1, at::internal::GRAIN_SIZE / C), [&](int64_t r0, int64_t r1) {
      for_row_units<io, false>(r0, r1, C, a, [&](int64_t i, int64_t n, const auto& ch) C10_ALWAYS_INLINE_ATTRIBUTE {
        forward_unit<ACT, io>(x, r, y, i, n, ch);
      });
    });
    return;
  }
  at::parallel_for(0, s.N * C, std::max<int64_t>(1, at::internal::GRAIN_SIZE / L), [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {  // j = n * C + c: one row of L
      const auto ch = ChannelVecs<io, false>::broadcast(a, j % C);
      for_units<io::kUnit>(L, [&](int64_t l, int64_t n) C10_ALWAYS_INLINE_ATTRIBUTE {
        forward_unit<ACT, io>(x, r, y, j * L + l, n, ch);
      });
    }
  });
}

// sum_g = sum(g), sum_gx = sum(g * (x - mean)) per channel, into padded (C,) arrays: short sums in acc_t
// (terms of either sign: the error of a running float sum grows with its length), added up in double.
// Rows: blocks of rows (one task each), each a sum of chunks of kSumRows rows in row order, then the
// blocks in block order. Planes: one channel per task, each row's sum (pieces of kChunk for longer rows)
// added in row order.
template <int64_t ACT, typename scalar_t>
void grad_sums_pass(const GradInputs<scalar_t>& in, const Shape& s, const Channels<at::opmath_type<scalar_t>>& a,
                    at::opmath_type<scalar_t>* sum_g, at::opmath_type<scalar_t>* sum_gx) {
  using io = IO<scalar_t>;
  using acc_t = typename io::acc_t;
  using Vec = typename io::Vec;
  const int64_t C = s.C, L = s.L;
  if (s.rows) {
    const int64_t padded = divup(C, io::kUnit) * io::kUnit;
    const int64_t chunk_rows = std::clamp<int64_t>(kChunk / C, 1, kSumRows);
    const int64_t block_rows = chunk_rows * std::max<int64_t>(1, kBlock / (chunk_rows * C));
    const int64_t blocks = divup(s.N, block_rows);
    c10::SmallVector<double, 512> partial(2 * blocks * padded, 0.0);
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      c10::SmallVector<acc_t, 512> chunk(2 * padded);
      acc_t* const sums[] = {chunk.data(), chunk.data() + padded};
      for (int64_t b = b0; b < b1; ++b) {
        double* pg = partial.data() + 2 * b * padded;
        const int64_t end = std::min(s.N, (b + 1) * block_rows);
        for (int64_t r0 = b * block_rows; r0 < end; r0 += chunk_rows) {
          std::fill(chunk.begin(), chunk.end(), acc_t(0));
          sum_rows<2, io>(r0, std::min(end, r0 + chunk_rows), C, sums,
                          [&](int64_t i, int64_t n, int64_t c) C10_ALWAYS_INLINE_ATTRIBUTE {
                            return grad_terms<ACT, io>(in, i, n, ChannelVecs<io, true>::lanes(a, c));
                          });
          for (int64_t c = 0; c < C; ++c) {
            pg[c] += static_cast<double>(sums[0][c]);
            pg[padded + c] += static_cast<double>(sums[1][c]);
          }
        }
      }
    });
    for (int64_t c = 0; c < C; ++c) {  // the blocks in order, whatever the threads
      double g = 0, gx = 0;
      for (int64_t b = 0; b < blocks; ++b) {
        g += partial[2 * b * padded + c];
        gx += partial[(2 * b + 1) * padded + c];
      }
      sum_g[c] = static_cast<acc_t>(g);
      sum_gx[c] = static_cast<acc_t>(gx);
    }
    return;
  }
  at::parallel_for(0, C, std::max<int64_t>(1, kBlock / std::max<int64_t>(1, s.N * L)), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const auto ch = ChannelVecs<io, true>::broadcast(a, c);
      const auto add = [](Vec& u, Vec& v) { return u + v; };
      double g = 0, gx = 0;
      for (int64_t i = 0; i < s.N; ++i) {
        for (int64_t l0 = 0; l0 < L; l0 += kChunk) {  // a row, or a piece of a long one
          const int64_t at = (i * C + c) * L + l0;
          Vec g0(0), gx0(0);
          for_units<io::kUnit>(std::min(kChunk, L - l0), [&](int64_t l, int64_t n) C10_ALWAYS_INLINE_ATTRIBUTE {
            const auto t = grad_terms<ACT, io>(in, at + l, n, ch);
            for (int p = 0; p < io::kParts; ++p) {
              g0 = g0 + t[0].v[p];
              gx0 = gx0 + t[1].v[p];
            }
          });
          g += static_cast<double>(vec::vec_reduce_all<acc_t>(add, g0));
          gx += static_cast<double>(vec::vec_reduce_all<acc_t>(add, gx0));
        }
      }
      sum_g[c] = static_cast<acc_t>(g);
      sum_gx[c] = static_cast<acc_t>(gx);
    }
  });
}

// dx = g * scale + (x - mean) * b + k, dr = g (dx, dr: null when not wanted).
template <int64_t ACT, typename scalar_t>
void grad_input_pass(const GradInputs<scalar_t>& in, scalar_t* dx, scalar_t* dr, const Shape& s,
                     const Channels<at::opmath_type<scalar_t>>& a) {
  using io = IO<scalar_t>;
  const int64_t C = s.C, L = s.L;
  if (s.rows) {
    at::parallel_for(0, s.N, std::max<int64_t>(1, at::internal::GRAIN_SIZE / C), [&](int64_t r0, int64_t r1) {
      for_row_units<io, true>(r0, r1, C, a, [&](int64_t i, int64_t n, const auto& ch) C10_ALWAYS_INLINE_ATTRIBUTE {
        grad_input_unit<ACT, io>(in, dx, dr, i, n, ch);
      });
    });
    return;
  }
  at::parallel_for(0, s.N * C, std::max<int64_t>(1, at::internal::GRAIN_SIZE / L), [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const auto ch = ChannelVecs<io, true>::broadcast(a, j % C);
      for_units<io::kUnit>(L, [&](int64_t l, int64_t n) C10_ALWAYS_INLINE_ATTRIBUTE {
        grad_input_unit<ACT, io>(in, dx, dr, j * L + l, n, ch);
      });
    }
  });
}

template <typename F>
decltype(auto) dispatch_activation(int64_t activation, const F& f) {
  switch (activation) {
    case kRelu: return f(std::integral_constant<int64_t, kRelu>{});
    case kTanh: return f(std::integral_constant<int64_t, kTanh>{});
    case kSilu: return f(std::integral_constant<int64_t, kSilu>{});
    default: return f(std::integral_constant<int64_t, kNone>{});
  }
}

// ----------------------------------------------------------------------------------------------------
// Argument checks: the messages of fused_ops/batch_norm.py's _check_args, for calls of the ops that do
// not come through fused_ops.batch_norm (opcheck, torch.ops.fused_ops.* directly). Nothing is written
// before they pass.
// ----------------------------------------------------------------------------------------------------
bool float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

void check_channel_tensor(const char* name, const std::optional<Tensor>& t, const Tensor& x) {
  if (!t.has_value()) return;
  const int64_t C = x.size(1);
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == C, "batch_norm: ", name, " must have shape (", C,
                    ",) to match input's C = ", C, ", got ", t->sizes());
  const auto d = t->scalar_type(), xd = x.scalar_type();
  const bool half = xd == at::kBFloat16 || xd == at::kHalf;
  TORCH_CHECK_TYPE(d == xd || (half && d == at::kFloat), "batch_norm: ", name, " must have dtype ", xd,
                   half ? " or Float" : "", " for ", xd, " input, got ", d);
  TORCH_CHECK_VALUE(t->device() == x.device(), "batch_norm: ", name, " is on ", t->device(), " but input is on ",
                    x.device());
}

void check_like_input(const char* name, const Tensor& t, const Tensor& x) {
  TORCH_CHECK_VALUE(t.sizes() == x.sizes(), "batch_norm: ", name, " must have input's shape ", x.sizes(),
                    " (it is added to the normalised input, without broadcasting), got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), "batch_norm: ", name, " must have input's dtype ",
                   x.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == x.device(), "batch_norm: ", name, " is on ", t.device(), " but input is on ",
                    x.device());
}

void check_input(const Tensor& x) {
  TORCH_CHECK_TYPE(float_dtype(x.scalar_type()), "batch_norm: input must be a floating-point tensor "
                   "(fp16/bf16/fp32/fp64), got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2 || x.dim() == 3, "batch_norm: the native op takes input flattened to (M, C) "
                    "rows or (N, C, L) (fused_ops.batch_norm does this), got ", x.dim(), "-D ", x.sizes());
  TORCH_CHECK_VALUE(x.device().is_cpu(), "batch_norm: the native kernels take CPU tensors, got input on ",
                    x.device());
}

void check_args(const Tensor& x, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
                const std::optional<Tensor>& num_batches_tracked, const std::optional<Tensor>& residual,
                const std::optional<Tensor>& momentum_tensor, bool training, int64_t activation) {
  check_input(x);
  TORCH_CHECK_VALUE(running_mean.has_value() == running_var.has_value(),
                    "batch_norm: running_mean and running_var must both be tensors or both be None");
  TORCH_CHECK_VALUE(training || running_mean.has_value(),
                    "batch_norm: running_mean and running_var are required in eval mode (training=False)");
  check_channel_tensor("running_mean", running_mean, x);
  check_channel_tensor("running_var", running_var, x);
  check_channel_tensor("weight", weight, x);
  check_channel_tensor("bias", bias, x);
  if (residual.has_value()) check_like_input("residual", *residual, x);
  if (num_batches_tracked.has_value()) {
    const Tensor& t = *num_batches_tracked;
    TORCH_CHECK_TYPE(t.dim() == 0 && t.scalar_type() == at::kLong && t.device().is_cpu(), "batch_norm: "
                     "num_batches_tracked must be a 0-dim int64 CPU tensor (a module's counter), got ", t.dim(),
                     "-D ", t.scalar_type(), " on ", t.device());
  }
  if (momentum_tensor.has_value()) {
    TORCH_CHECK_TYPE(momentum_tensor->dim() == 0 && momentum_tensor->is_floating_point(),
                     "batch_norm: a momentum tensor must be a 0-dim float tensor, got ", momentum_tensor->dim(),
                     "-D ", momentum_tensor->scalar_type());
    TORCH_CHECK_VALUE(momentum_tensor->device() == x.device(), "batch_norm: momentum is on ",
                      momentum_tensor->device(), " but input is on ", x.device());
  }
  TORCH_CHECK_VALUE(activation >= kNone && activation <= kSilu, "batch_norm: activation must be 0 (None), "
                    "1 (relu), 2 (tanh) or 3 (silu), got ", activation);
  const int64_t count = x.numel() / std::max<int64_t>(x.size(1), 1);
  TORCH_CHECK_VALUE(!(training && count == 1), "batch_norm: expected more than 1 value per channel when "
                    "training, got input size ", x.sizes());
}

// x as the kernels walk it: contiguous (M, C) or (N, C, L); an (N, C, 1) input is (N, C) rows.
Shape shape_of(const Tensor& x) {
  if (x.dim() == 2) return {true, x.size(0), x.size(1), 1};
  if (x.size(2) == 1) return {true, x.size(0), x.size(1), 1};
  return {false, x.size(0), x.size(1), x.size(2)};
}

// t's values as the kernels read them: contiguous in x's (flat) shape; a copy only for other strides.
Tensor dense(const Tensor& t) { return t.is_contiguous() ? t : t.contiguous(); }

// An uninitialised contiguous tensor like x. Buffers of 1 MiB and more (y, dx, dresidual) come from this
// op's ReusingAllocator (common.h), which holds the last few freed: a training step's are the last
// step's, their pages mapped (with torch's allocator, each step faulted them in again: a third of the
// time of a channels_last BatchNorm2d step).
Tensor empty_like_input(const Tensor& x) {
  static ReusingAllocator* buffers = new ReusingAllocator(kHeldBuffers);  // never destroyed: the process owns it
  const size_t bytes = static_cast<size_t>(x.numel()) * x.element_size();
  return bytes >= ReusingAllocator::kMinBytes ? empty_reusing(*buffers, x.sizes(), x.scalar_type())
                                              : Tensor(at::detail::empty_cpu(x.sizes(), x.scalar_type()));
}

// running = (1 - momentum) * running + momentum * batch(c), in double, rounded once to running's dtype
// (written out, not lerp: an infinite batch variance gives inf, as torch's).
template <typename Batch>
void update_running(const Tensor& running, double momentum, const Batch& batch) {
  const int64_t C = running.size(0), s = running.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, running.scalar_type(), "batch_norm_running", [&] {
    scalar_t* p = running.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      p[c * s] = static_cast<scalar_t>((1 - momentum) * static_cast<double>(p[c * s]) + momentum * batch(c));
    }
  });
  torch::autograd::impl::bump_version(running);  // as an in-place ATen op does
}

// The momentum of the running-stat update: momentum_tensor's value when given, else momentum; None is
// the cumulative average, 1 / num_batches_tracked once counted (0 without a counter, as torch's modules).
double momentum_value(std::optional<double> momentum, const std::optional<Tensor>& momentum_tensor,
                      const std::optional<Tensor>& num_batches_tracked) {
  if (!momentum_tensor.has_value()) {
    if (momentum.has_value()) return *momentum;
    if (!num_batches_tracked.has_value()) return 0.0;
    return 1.0 / static_cast<double>(*num_batches_tracked->const_data_ptr<int64_t>());  // CPU memory: no sync
  }
  double value = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, momentum_tensor->scalar_type(), "batch_norm_momentum",
                                  [&] { value = static_cast<double>(*momentum_tensor->const_data_ptr<scalar_t>()); });
  return value;
}

// ----------------------------------------------------------------------------------------------------
// The forward and the backward.
// ----------------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor, Tensor> forward(const Tensor& input, const std::optional<Tensor>& weight,
                                           const std::optional<Tensor>& bias,
                                           const std::optional<Tensor>& running_mean,
                                           const std::optional<Tensor>& running_var,
                                           const std::optional<Tensor>& num_batches_tracked,
                                           const std::optional<Tensor>& residual, std::optional<double> momentum,
                                           const std::optional<Tensor>& momentum_tensor, double eps, bool training,
                                           bool unbiased, int64_t activation) {
  check_args(input, weight, bias, running_mean, running_var, num_batches_tracked, residual, momentum_tensor, training,
             activation);
  if (num_batches_tracked.has_value()) {  // counted once the call is known to be valid, as torch's modules do
    Tensor counter = *num_batches_tracked;
    *counter.mutable_data_ptr<int64_t>() += 1;
    torch::autograd::impl::bump_version(counter);
  }
  const Tensor x = dense(input);
  const Shape s = shape_of(x);
  const int64_t C = s.C, count = s.count();
  const auto stat = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor y = empty_like_input(x);
  Tensor mean = at::detail::empty_cpu({C}, stat), invstd = at::detail::empty_cpu({C}, stat);
  if (count == 0) {  // as PyTorch: an empty output, zero statistics, running stats untouched
    mean.zero_(), invstd.zero_();
    return {y, mean, invstd};
  }
  const Tensor r = residual.has_value() ? dense(*residual) : Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "batch_norm_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using Vec = vec::Vectorized<acc_t>;
    ChannelArrays<acc_t> a(C, IO<scalar_t>::kUnit, 4);  // mean, scale, shift, m2
    acc_t *m = a[0], *scale = a[1], *shift = a[2], *m2 = a[3];
    acc_t* mean_out = mean.mutable_data_ptr<acc_t>();
    acc_t* invstd_out = invstd.mutable_data_ptr<acc_t>();
    read_channels<acc_t>(weight, scale, C, acc_t(1));
    read_channels<acc_t>(bias, shift, C, acc_t(0));
    // var: the variance that normalises (m2 / n, or m2 / (n - 1) with unbiased; eval: running_var)
    acc_t* var = m2;
    if (training) {
      if (s.rows) rows_moments<scalar_t>(x.const_data_ptr<scalar_t>(), s, m, m2);
      else planes_moments<scalar_t>(x.const_data_ptr<scalar_t>(), s, m, m2);
      if (running_mean.has_value()) {  // with the unbiased variance, as torch
        const double mom = momentum_value(momentum, momentum_tensor, num_batches_tracked);
        const double unbias = 1.0 / static_cast<double>(count - 1);
        update_running(*running_mean, mom, [&](int64_t c) { return static_cast<double>(m[c]); });
        update_running(*running_var, mom, [&](int64_t c) { return static_cast<double>(m2[c]) * unbias; });
      }
      const double n_var = static_cast<double>(unbiased ? count - 1 : count);
      vec::map([n = Vec(static_cast<acc_t>(1.0 / n_var))](Vec v) { return v * n; }, var, m2, a.padded);
    } else {  // eval: the running stats (read before anything is written)
      read_channels<acc_t>(running_mean, m, C, acc_t(0));
      read_channels<acc_t>(running_var, var, C, acc_t(1));
    }
    // invstd = 1 / sqrt(var + eps), scale = gamma * invstd, vectorised: per channel in scalar code, the
    // division and square root took half of a makemore-sized forward
    for (int64_t c = 0; c < a.padded; c += Vec::size()) {
      const Vec istd = Vec(1) / (Vec::loadu(var + c) + Vec(static_cast<acc_t>(eps))).sqrt();
      istd.store(var + c);
      (Vec::loadu(scale + c) * istd).store(scale + c);
    }
    std::copy_n(m, C, mean_out);
    std::copy_n(var, C, invstd_out);
    dispatch_activation(activation, [&](auto act) {
      forward_pass<decltype(act)::value, scalar_t>(x.const_data_ptr<scalar_t>(),
                                                   r.defined() ? r.const_data_ptr<scalar_t>() : nullptr,
                                                   y.mutable_data_ptr<scalar_t>(), s,
                                                   Channels<acc_t>{m, scale, shift, nullptr, nullptr});
    });
  });
  return {y, mean, invstd};
}

// (dx, dweight, dbias, dresidual); dx is (0,) unless input_grad, dresidual (0,) unless residual_grad.
std::tuple<Tensor, Tensor, Tensor, Tensor> backward(const Tensor& grad_output, const Tensor& input,
                                                    const std::optional<Tensor>& output,
                                                    const std::optional<Tensor>& residual,
                                                    const std::optional<Tensor>& weight,
                                                    const std::optional<Tensor>& bias, const Tensor& mean,
                                                    const Tensor& invstd, bool training, bool unbiased,
                                                    int64_t activation, bool input_grad, bool residual_grad) {
  check_input(input);
  const int64_t C = input.size(1);
  check_like_input("grad_output", grad_output, input);
  check_channel_tensor("weight", weight, input);
  check_channel_tensor("bias", bias, input);
  const auto stat = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const Tensor* t : {&mean, &invstd}) {
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == C && t->scalar_type() == stat && t->device().is_cpu(),
                      "batch_norm: mean and invstd must be (", C, ",) ", stat, " CPU tensors (the forward's), got ",
                      t->sizes(), " ", t->scalar_type());
  }
  TORCH_CHECK_VALUE(activation >= kNone && activation <= kSilu, "batch_norm: activation must be 0 (None), "
                    "1 (relu), 2 (tanh) or 3 (silu), got ", activation);
  const bool needs_output = activation == kRelu || activation == kTanh;
  TORCH_CHECK_VALUE(!needs_output || output.has_value(), "batch_norm: the backward of relu and tanh needs the "
                    "forward's output");
  if (output.has_value()) check_like_input("output", *output, input);
  if (residual.has_value()) check_like_input("residual", *residual, input);

  const Tensor x = dense(input), dy = dense(grad_output);
  const Tensor y = needs_output ? dense(*output) : Tensor();
  const Tensor r = activation == kSilu && residual.has_value() ? dense(*residual) : Tensor();
  const Shape s = shape_of(x);
  const int64_t count = s.count();
  Tensor dx = input_grad ? empty_like_input(x) : at::detail::empty_cpu({0}, x.scalar_type());
  Tensor dr = residual_grad ? empty_like_input(x) : at::detail::empty_cpu({0}, x.scalar_type());
  Tensor dweight = at::detail::empty_cpu({C}, stat), dbias = at::detail::empty_cpu({C}, stat);
  if (count == 0) {  // empty batch: empty dx, zero dweight and dbias (as PyTorch)
    dweight.zero_(), dbias.zero_();
    return {dx, dweight, dbias, dr};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "batch_norm_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ChannelArrays<acc_t> a(C, IO<scalar_t>::kUnit, 7);  // mean, scale, shift, b, k, sum_g, sum_gx
    acc_t *m = a[0], *scale = a[1], *shift = a[2], *b = a[3], *k = a[4], *sum_g = a[5], *sum_gx = a[6];
    const acc_t* mean_in = mean.const_data_ptr<acc_t>();
    const acc_t* invstd_in = invstd.const_data_ptr<acc_t>();
    read_channels<acc_t>(weight, scale, C, acc_t(1));
    read_channels<acc_t>(bias, shift, C, acc_t(0));
    for (int64_t c = 0; c < C; ++c) {
      m[c] = mean_in[c];
      scale[c] *= invstd_in[c];
    }
    const GradInputs<scalar_t> in{dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                  y.defined() ? y.const_data_ptr<scalar_t>() : nullptr,
                                  r.defined() ? r.const_data_ptr<scalar_t>() : nullptr};
    const Channels<acc_t> channels{m, scale, shift, b, k};  // b and k: set below, before the dx pass
    dispatch_activation(activation, [&](auto act) {
      constexpr int64_t ACT = decltype(act)::value;
      grad_sums_pass<ACT, scalar_t>(in, s, channels, sum_g, sum_gx);
      acc_t* dw = dweight.mutable_data_ptr<acc_t>();
      acc_t* db = dbias.mutable_data_ptr<acc_t>();
      const double inv_n = 1.0 / static_cast<double>(count);
      const double inv_n_var = 1.0 / static_cast<double>(unbiased ? count - 1 : count);
      for (int64_t c = 0; c < C; ++c) {
        const double istd = static_cast<double>(invstd_in[c]), sc = static_cast<double>(scale[c]);
        dw[c] = static_cast<acc_t>(static_cast<double>(sum_gx[c]) * istd);  // sum(g * xhat)
        db[c] = sum_g[c];
        if (training) {  // dx = scale * (g - sum(g)/n - (x - mean) * invstd^2 * sum(g (x - mean)) / n')
          b[c] = static_cast<acc_t>(-sc * istd * istd * static_cast<double>(sum_gx[c]) * inv_n_var);
          k[c] = static_cast<acc_t>(-sc * static_cast<double>(sum_g[c]) * inv_n);
        }  // eval: b = k = 0 (zero-filled)
      }
      if (input_grad || residual_grad) {
        grad_input_pass<ACT, scalar_t>(in, input_grad ? dx.mutable_data_ptr<scalar_t>() : nullptr,
                                       residual_grad ? dr.mutable_data_ptr<scalar_t>() : nullptr, s, channels);
      }
    });
  });
  return {dx, dweight, dbias, dr};
}

// ----------------------------------------------------------------------------------------------------
// The ops' CPU kernels.
// ----------------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor, Tensor> batch_norm_fwd_cpu(const Tensor& input, const std::optional<Tensor>& weight,
                                                      const std::optional<Tensor>& bias,
                                                      const std::optional<Tensor>& running_mean,
                                                      const std::optional<Tensor>& running_var,
                                                      const std::optional<Tensor>& num_batches_tracked,
                                                      const std::optional<Tensor>& residual, bool training,
                                                      int64_t activation, std::optional<double> momentum,
                                                      const std::optional<Tensor>& momentum_tensor, double eps,
                                                      bool unbiased) {
  return forward(input, weight, bias, running_mean, running_var, num_batches_tracked, residual, momentum,
                 momentum_tensor, eps, training, unbiased, activation);
}

Tensor batch_norm_cpu(const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                      const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
                      const std::optional<Tensor>& num_batches_tracked, const std::optional<Tensor>& residual,
                      bool training, int64_t activation, std::optional<double> momentum,
                      const std::optional<Tensor>& momentum_tensor, double eps, bool unbiased) {
  return std::get<0>(forward(input, weight, bias, running_mean, running_var, num_batches_tracked, residual, momentum,
                             momentum_tensor, eps, training, unbiased, activation));
}

std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_bwd_cpu(
    const Tensor& grad_output, const Tensor& input, const std::optional<Tensor>& output,
    const std::optional<Tensor>& residual, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const Tensor& mean, const Tensor& invstd, bool training, bool unbiased, int64_t activation, bool input_grad,
    bool residual_grad) {
  return backward(grad_output, input, output, residual, weight, bias, mean, invstd, training, unbiased, activation,
                  input_grad, residual_grad);
}

// ----------------------------------------------------------------------------------------------------
// Autograd, in C++: one node per call, and no Python on the way.
// ----------------------------------------------------------------------------------------------------
const auto& fwd_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fused_ops::batch_norm_fwd", "")
                             .typed<decltype(batch_norm_fwd_cpu)>();
  return op;
}

const auto& bwd_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fused_ops::batch_norm_bwd", "")
                             .typed<decltype(batch_norm_bwd_cpu)>();
  return op;
}

const char kTwice[] =
    "batch_norm: trying to differentiate twice: the backward of fused_ops.batch_norm is not differentiable "
    "(create_graph=True through it is not supported)";

// The autograd node of one call, written as ATen writes its own (VariableType's generated kernels). It
// saves what fused_ops/batch_norm.py's Function saves: x, gamma, the statistics' mean and invstd; y for
// relu and tanh; beta and the residual for silu (to recompute u).
// backward(dy): the four gradients the next edges want (dresidual is dy itself without an activation),
// with dweight and dbias in the parameters' dtypes. With create_graph=True the gradients come back
// wrapped so that differentiating them raises (as @once_differentiable does in Python).
struct BatchNormBackward final : public torch::autograd::Node {
  torch::autograd::SavedVariable x_, weight_, bias_, mean_, invstd_, y_, residual_;
  bool training_ = false, unbiased_ = false;
  int64_t activation_ = kNone;
  c10::ScalarType weight_dtype_ = at::kFloat, bias_dtype_ = at::kFloat;

  std::string name() const override { return "BatchNormBackward"; }
  void release_variables() override {
    for (auto* v : {&x_, &weight_, &bias_, &mean_, &invstd_, &y_, &residual_}) v->reset_data();
  }

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grad_outputs) override {
    torch::autograd::variable_list grads(4);
    const Tensor& dy = grad_outputs[0];
    if (!dy.defined()) return grads;
    const bool want_dx = should_compute_output(0), want_dweight = should_compute_output(1);
    const bool want_dbias = should_compute_output(2), want_dresidual = should_compute_output(3);
    auto unpack = [this](torch::autograd::SavedVariable& v) {
      Tensor t = v.unpack(getptr());
      return t.defined() ? std::optional<Tensor>(t) : std::nullopt;
    };
    const auto weight = unpack(weight_), bias = unpack(bias_), y = unpack(y_), residual = unpack(residual_);
    Tensor dx, dweight, dbias, dresidual;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(dx, dweight, dbias, dresidual) =
          bwd_op().call(dy, x_.unpack(getptr()), y, residual, weight, bias, mean_.unpack(getptr()),
                        invstd_.unpack(getptr()), training_, unbiased_, activation_, want_dx,
                        want_dresidual && activation_ != kNone);
    }
    if (want_dx) grads[0] = dx;
    if (want_dweight) grads[1] = dweight.scalar_type() == weight_dtype_ ? dweight : dweight.to(weight_dtype_);
    if (want_dbias) grads[2] = dbias.scalar_type() == bias_dtype_ ? dbias : dbias.to(bias_dtype_);
    if (want_dresidual) grads[3] = activation_ == kNone ? dy : dresidual;
    if (at::GradMode::is_enabled() && dy.requires_grad()) {
      // create_graph=True: the gradients come back through an error node, so that differentiating them
      // raises (Python's @once_differentiable does the same, marking them as requiring grad for it)
      for (Tensor& g : grads) {
        if (g.defined()) g = g.detach().requires_grad_(true);
      }
      NodePtr error = make_node<torch::autograd::DelayedError>(std::string(kTwice), int64_t(4));
      return (*error)(std::move(grads));
    }
    return grads;
  }
};

// The Autograd kernel of fused_ops::batch_norm. It runs fused_ops::batch_norm_fwd through the
// dispatcher, below autograd: the CPU kernel in eager mode, the fake kernel under torch.compile.
Tensor batch_norm_autograd(const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                           const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
                           const std::optional<Tensor>& num_batches_tracked, const std::optional<Tensor>& residual,
                           bool training, int64_t activation, std::optional<double> momentum,
                           const std::optional<Tensor>& momentum_tensor, double eps, bool unbiased) {
  auto requires_grad = [](const std::optional<Tensor>& t) { return t.has_value() && t->requires_grad(); };
  const bool record = at::GradMode::is_enabled() && (input.requires_grad() || requires_grad(weight) ||
                                                     requires_grad(bias) || requires_grad(residual));
  Tensor y, mean, invstd;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    std::tie(y, mean, invstd) = fwd_op().call(input, weight, bias, running_mean, running_var, num_batches_tracked,
                                              residual, training, activation, momentum, momentum_tensor, eps, unbiased);
  }
  if (!record) return y;
  NodePtr node = make_node<BatchNormBackward>();
  auto* n = static_cast<BatchNormBackward*>(node.get());
  const Tensor none;
  node->set_next_edges(torch::autograd::collect_next_edges(input, weight.value_or(none), bias.value_or(none),
                                                           residual.value_or(none)));
  torch::autograd::set_history(y, node);
  const bool silu = activation == kSilu;
  n->x_ = torch::autograd::SavedVariable(input, false);
  if (weight.has_value()) n->weight_ = torch::autograd::SavedVariable(*weight, false);
  if (silu && bias.has_value()) n->bias_ = torch::autograd::SavedVariable(*bias, false);
  n->mean_ = torch::autograd::SavedVariable(mean, false);
  n->invstd_ = torch::autograd::SavedVariable(invstd, false);
  if (activation == kRelu || activation == kTanh) n->y_ = torch::autograd::SavedVariable(y, true);
  if (silu && residual.has_value()) n->residual_ = torch::autograd::SavedVariable(*residual, false);
  n->training_ = training;
  n->unbiased_ = unbiased;
  n->activation_ = activation;
  if (weight.has_value()) n->weight_dtype_ = weight->scalar_type();
  if (bias.has_value()) n->bias_dtype_ = bias->scalar_type();
  return y;
}

}  // namespace
}  // namespace fused_ops

// ----------------------------------------------------------------------------------------------------
// Registration. Arguments in the order of how often a call passes them: a call passes only those up to
// the last that differs from its default (the boxed call from Python converts each one it gets).
// ----------------------------------------------------------------------------------------------------
TORCH_LIBRARY_FRAGMENT(fused_ops, m) {
  m.def("batch_norm(Tensor input, Tensor? weight=None, Tensor? bias=None, Tensor(a!)? running_mean=None, "
        "Tensor(b!)? running_var=None, Tensor(c!)? num_batches_tracked=None, Tensor? residual=None, "
        "bool training=False, int activation=0, float? momentum=0.1, Tensor? momentum_tensor=None, "
        "float eps=1e-05, bool unbiased=False) -> Tensor");
  m.def("batch_norm_fwd(Tensor input, Tensor? weight=None, Tensor? bias=None, Tensor(a!)? running_mean=None, "
        "Tensor(b!)? running_var=None, Tensor(c!)? num_batches_tracked=None, Tensor? residual=None, "
        "bool training=False, int activation=0, float? momentum=0.1, Tensor? momentum_tensor=None, "
        "float eps=1e-05, bool unbiased=False) -> (Tensor output, Tensor mean, Tensor invstd)");
  m.def("batch_norm_bwd(Tensor grad_output, Tensor input, Tensor? output, Tensor? residual, Tensor? weight, "
        "Tensor? bias, Tensor mean, Tensor invstd, bool training, bool unbiased, int activation, bool input_grad, "
        "bool residual_grad) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias, Tensor grad_residual)");
}

TORCH_LIBRARY_IMPL(fused_ops, CPU, m) {
  m.impl("batch_norm", &fused_ops::batch_norm_cpu);
  m.impl("batch_norm_fwd", &fused_ops::batch_norm_fwd_cpu);
  m.impl("batch_norm_bwd", &fused_ops::batch_norm_bwd_cpu);
}

TORCH_LIBRARY_IMPL(fused_ops, Autograd, m) {
  m.impl("batch_norm", &fused_ops::batch_norm_autograd);
  // the statistics and gradients as data: not differentiable themselves, and no warning about it
  m.impl("batch_norm_fwd", torch::CppFunction::makeFallthrough());
  m.impl("batch_norm_bwd", torch::CppFunction::makeFallthrough());
}
