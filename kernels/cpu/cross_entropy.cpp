// Native CPU cross-entropy: the kernel, the ops that run it, and its autograd.
//
// Shapes: input (C,), (N, C) or (N, C, d1, ..., dK) logits; target class indices of shape (), (N,) or
// (N, d1, ..., dK) (int64, int32 or uint8), or class probabilities with input's shape and dtype;
// weight (C,) or none. Every call works on M rows of C logits, class dim last.
//
// The math (fused_ops/cross_entropy.py has the derivation): with q the weighted, smoothed target
// distribution of a row, loss_i = -sum_c q_ic * logp_ic and
//     d(loss_i)/d(z_ic) = softmax_ic * sum_c q_ic - q_ic,
// times the reduction scale s ("mean": 1 / sum_i w[y_i] over non-ignored rows, or 1 / M for
// probability targets; else 1). z_loss adds z_loss * lse_i^2 per counted row (its gradient
// 2 * z_loss * lse_i * softmax_ic folds into sum_q); softcap runs all of it on
// z = softcap * tanh(x / softcap) and chains dx = dz * (1 - tanh^2).
//
// One pass per row: the forward writes the loss and, when asked, the gradient for a unit upstream
// gradient; the backward only scales it by grad_output (nothing at all when grad_output == 1).
// Statistics accumulate in float32 (float64 for float64 logits) and the gradient is rounded once.
// Rows are split among threads with at::parallel_for; a row's arithmetic is the same on every thread
// and the reductions over rows run serially in row order, so results do not depend on the thread count.
//
// Registered ops (namespace fused_ops; fake kernels in cross_entropy.py beside this file):
//   cross_entropy(...) -> Tensor                   the loss; differentiable (the Autograd kernel below)
//   cross_entropy_fwd(...) -> (Tensor, Tensor)     the loss and d(loss)/d(input) for grad_output = 1

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <c10/util/SmallVector.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <optional>
#include <tuple>

#include "common.h"

namespace fused_ops {
namespace {

using at::Tensor;
namespace vec = at::vec;

constexpr int64_t kReductionNone = 0;  // at::Reduction::None, Mean, Sum
constexpr int64_t kReductionMean = 1;
constexpr int64_t kReductionSum = 2;

// ----------------------------------------------------------------------------------------------------
// Row helpers on acc_t (float, or double for double logits).
// ----------------------------------------------------------------------------------------------------

// src[0, n) as acc_t: src itself when it already is, else converted into buf.
template <typename scalar_t, typename acc_t>
const acc_t* as_acc(const scalar_t* src, acc_t* buf, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    using bVec = vec::Vectorized<scalar_t>;
    using fVec = vec::Vectorized<float>;
    int64_t c = 0;
    for (; c + bVec::size() <= n; c += bVec::size()) {
      auto [lo, hi] = vec::convert_to_float<scalar_t>(bVec::loadu(src + c));
      lo.store(buf + c);
      hi.store(buf + c + fVec::size());
    }
    for (; c < n; ++c) {
      buf[c] = static_cast<float>(src[c]);
    }
    return buf;
  }
}

// exp(d) for d = z - max <= 0. On long rows ATen's exp_u20 (within 20 ulp; ATen's CPU flash attention
// uses it for its softmax) costs half of exp() and makes the pass memory-bound instead of exp-bound.
// Short rows (C < kFastExpMinClasses, e.g. makemore's 27) keep the 1-ulp exp(), as torch's
// log_softmax: their time is the call, not the exp, and their loss stays within an ulp of torch's.
// exp_u20 does not propagate nan, so a row whose max is not finite (a nan or +inf logit: the row is
// nan, as in torch; or all -inf) takes exp() too.
constexpr int64_t kFastExpMinClasses = 1024;

template <typename acc_t>
vec::Vectorized<acc_t> exp_shifted(const vec::Vectorized<acc_t>& d, bool fast) {
  return fast ? d.exp_u20() : d.exp();
}

template <typename acc_t>
acc_t vec_sum(const vec::Vectorized<acc_t>& v) {
  return vec::vec_reduce_all<acc_t>([](auto& a, auto& b) { return a + b; }, v);
}

// Rows per block of the kernel's row loop, and the scratch bytes (acc_t) a block may take.
constexpr int64_t kBlockRows = 16;
constexpr int64_t kBlockBytes = 16 * 1024;

// Short rows (the 1-ulp exp) take their exps a block of rows at a time: the kernel writes z_c - m of
// every row of the block into e, contiguous, and exp_block takes exp() of all of it in one loop. Per
// row, the exp pass would call exp() on a vector or two with its accumulators live: perf at (4096, 27)
// showed them spilled around each call and most of the row's time in reloading them.
inline bool exped(int64_t C) { return C < kFastExpMinClasses; }

// e[c] = z[c] - m (<= 0), c < C.
template <typename acc_t>
void shift_row(const acc_t* z, acc_t m, acc_t* e, int64_t C) {
  using Vec = vec::Vectorized<acc_t>;
  const Vec vm(m);
  int64_t c = 0;
  for (; c + Vec::size() <= C; c += Vec::size()) (Vec::loadu(z + c) - vm).store(e + c);
  if (c < C) (Vec::loadu(z + c, C - c) - vm).store(e + c, C - c);
}

// e[i] = exp(e[i]), i < n: exp(z_c - m) for a block of rows, with exp_shifted's slow (1-ulp) exp.
template <typename acc_t>
void exp_block(acc_t* e, int64_t n) {
  vec::map([](const vec::Vectorized<acc_t>& d) { return exp_shifted<acc_t>(d, false); }, e, e, n);
}

// What a row needs besides its logits; the same for every row of a call.
template <typename acc_t>
struct RowConstants {
  int64_t C;
  const acc_t* weight;  // (C,) class weights, or nullptr (all 1)
  acc_t weight_total;   // sum_c w_c (C without weights)
  acc_t eps;            // label smoothing
  acc_t z_loss;
  acc_t softcap;  // 0: off
};

// What one row's pass over its logits gives.
template <typename acc_t>
struct RowStats {
  acc_t loss;    // the row's loss, before the reduction scale
  acc_t sum_q;   // sum_c q_ic (+ 2 * z_loss * lse_i): the softmax factor of the gradient
  acc_t inv_s;   // 1 / sum_c exp(z_ic - max_i)
};

// The row loops keep four independent accumulators: one would chain every vector's max or add to the
// previous one's latency (perf: the max pass then took as long as the exp pass). Each pass is a
// template on its options, so that the accumulators stay in registers; the accumulators are summed in a
// fixed order, so a row's result is the same on every call.
template <typename F>
decltype(auto) dispatch_flag(bool flag, F&& f) {  // f(std::true_type) or f(std::false_type)
  return flag ? f(std::true_type{}) : f(std::false_type{});
}

template <typename acc_t>
acc_t row_max(const acc_t* z, int64_t C) {  // propagates nan, as torch's max
  using Vec = vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  auto max = [](const Vec& a, const Vec& b) { return vec::maximum(a, b); };
  if (C < V) {
    return vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return vec::maximum(a, b); }, Vec::loadu(z, C), C);
  }
  Vec m0 = Vec::loadu(z), m1 = m0, m2 = m0, m3 = m0;  // any element is a neutral start for max
  int64_t c = 0;
  for (; c + 4 * V <= C; c += 4 * V) {
    m0 = max(m0, Vec::loadu(z + c));
    m1 = max(m1, Vec::loadu(z + c + V));
    m2 = max(m2, Vec::loadu(z + c + 2 * V));
    m3 = max(m3, Vec::loadu(z + c + 3 * V));
  }
  for (; c + V <= C; c += V) m0 = max(m0, Vec::loadu(z + c));
  if (c < C) m1 = max(m1, Vec::loadu(z + C - V));  // the last V elements, overlapping: max does not mind
  return vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return vec::maximum(a, b); },
                                    max(max(m0, m1), max(m2, m3)));
}

template <typename acc_t>
struct Sums {
  acc_t s;      // sum_c exp(z_c - m)
  acc_t other;  // index targets: sum_c w_c (m - z_c) (with smoothing); probabilities: sum_c q_c (m - z_c)
  acc_t q;      // probabilities: sum_c q_c
};

// The exp pass of an index-target row: s, and with SMOOTH sum_c w_c (m - z_c) (w: weights or nullptr);
// with STORE, e[c] = exp(z_c - m). With EXPED, e already holds exp(z_c - m) (exp_block): the same
// values, summed in the same order.
template <bool FAST, bool STORE, bool SMOOTH, bool EXPED, typename acc_t>
Sums<acc_t> index_exp_pass(const acc_t* z, acc_t* e, const acc_t* w, acc_t m, int64_t C) {
  using Vec = vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const Vec vm(m);
  Vec s0(0), s1(0), s2(0), s3(0), o0(0), o1(0), o2(0), o3(0);
  auto step = [&](int64_t c, int64_t n, Vec& s, Vec& o) C10_ALWAYS_INLINE_ATTRIBUTE {
    const Vec zc = n == V ? Vec::loadu(z + c) : Vec::loadu(z + c, n);
    Vec ex;
    if constexpr (EXPED) {
      ex = n == V ? Vec::loadu(e + c) : Vec::loadu(e + c, n);  // padding lanes load as 0
    } else {
      ex = exp_shifted<acc_t>(zc - vm, FAST);  // exp(z_c - m), z_c - m <= 0
      if (n < V) ex = Vec::set(Vec(0), ex, n);
    }
    s += ex;
    if constexpr (STORE) {
      if (n == V) ex.store(e + c); else ex.store(e + c, n);
    }
    if constexpr (SMOOTH) {  // w_c (m - z_c)
      Vec term = vm - zc;
      if (w != nullptr) term = term * (n == V ? Vec::loadu(w + c) : Vec::loadu(w + c, n));
      o += n == V ? term : Vec::set(Vec(0), term, n);
    }
  };
  int64_t c = 0;
  for (; c + 4 * V <= C; c += 4 * V) {
    step(c, V, s0, o0);
    step(c + V, V, s1, o1);
    step(c + 2 * V, V, s2, o2);
    step(c + 3 * V, V, s3, o3);
  }
  for (; c + V <= C; c += V) step(c, V, s0, o0);
  if (c < C) step(c, C - c, s1, o1);
  return {vec_sum((s0 + s1) + (s2 + s3)), vec_sum((o0 + o1) + (o2 + o3)), 0};
}

// The pass of a probability-target row, q_c = w_c ((1 - eps) p_c + eps / C): s, sum_c q_c (m - z_c)
// and sum_c q_c; with STORE, e[c] = exp(z_c - m).
template <bool FAST, bool STORE, bool EXPED, typename acc_t>
Sums<acc_t> prob_exp_pass(const acc_t* z, const acc_t* p, acc_t* e, const acc_t* w, acc_t m, acc_t eps,
                          int64_t C) {
  using Vec = vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const Vec vm(m), keep(1 - eps), spread(eps / C);
  Vec s0(0), s1(0), s2(0), s3(0), o0(0), o1(0), o2(0), o3(0), q0(0), q1(0), q2(0), q3(0);
  auto step = [&](int64_t c, int64_t n, Vec& s, Vec& o, Vec& qs) C10_ALWAYS_INLINE_ATTRIBUTE {
    const Vec zc = n == V ? Vec::loadu(z + c) : Vec::loadu(z + c, n);
    Vec q = vec::fmadd(keep, n == V ? Vec::loadu(p + c) : Vec::loadu(p + c, n), spread);
    if (w != nullptr) q = q * (n == V ? Vec::loadu(w + c) : Vec::loadu(w + c, n));
    Vec ex;
    if constexpr (EXPED) {
      ex = n == V ? Vec::loadu(e + c) : Vec::loadu(e + c, n);  // padding lanes load as 0
    } else {
      ex = exp_shifted<acc_t>(zc - vm, FAST);
      if (n < V) ex = Vec::set(Vec(0), ex, n);
    }
    if (n < V) q = Vec::set(Vec(0), q, n);
    s += ex;
    qs += q;
    o = vec::fmadd(q, vm - zc, o);  // padding lanes: 0 * (m - 0), finite unless m is not
    if constexpr (STORE) {
      if (n == V) ex.store(e + c); else ex.store(e + c, n);
    }
  };
  int64_t c = 0;
  for (; c + 4 * V <= C; c += 4 * V) {
    step(c, V, s0, o0, q0);
    step(c + V, V, s1, o1, q1);
    step(c + 2 * V, V, s2, o2, q2);
    step(c + 3 * V, V, s3, o3, q3);
  }
  for (; c + V <= C; c += V) step(c, V, s0, o0, q0);
  if (c < C) step(c, C - c, s1, o1, q1);
  return {vec_sum((s0 + s1) + (s2 + s3)), vec_sum((o0 + o1) + (o2 + o3)), vec_sum((q0 + q1) + (q2 + q3))};
}

// One row of index-target cross-entropy, in two steps. index_sums: z, the row's (soft-capped) logits
// as acc_t, and m = max_c z_c give s and, with smoothing, sum_c w_c (m - z_c); when e is not null,
// e[c] = exp(z_c - m) is stored there for the gradient pass (which then needs no second exp).
// index_stats: with log_s = log(s), the row's loss and gradient factors, for target class y with
// w_y = w[y] (the row is not ignored: ignored rows never get here, so whatever they hold, nan or inf,
// cannot reach the loss or the gradient). The kernel takes the logs of a block of rows between the two.
//
// Byte model: z is read from memory once (the row is then in L1/L2 for the passes below).
//   pass 1: m = max_c z_c
//   pass 2: s = sum_c exp(z_c - m);  with smoothing also sum_c w_c (m - z_c) >= 0
//   loss_i = (1 - eps) w_y (lse - z_y) + eps / C * sum_c w_c (lse - z_c) + z_loss * lse^2,
//   lse - z_c = log(s) + (m - z_c): every term is >= 0, so nothing cancels (lse * W - sum w_c z_c would).
template <typename acc_t>
Sums<acc_t> index_sums(const acc_t* z, acc_t* e, acc_t m, const RowConstants<acc_t>& k) {
  if (exped(k.C)) {
    return dispatch_flag(k.eps > 0, [&](auto smoothed) {
      return index_exp_pass<false, false, smoothed.value, true>(z, e, k.weight, m, k.C);
    });
  }
  return dispatch_flag(k.C >= kFastExpMinClasses && std::isfinite(m), [&](auto fast) {
    return dispatch_flag(e != nullptr, [&](auto store) {
      return dispatch_flag(k.eps > 0, [&](auto smoothed) {
        return index_exp_pass<fast.value, store.value, smoothed.value, false>(z, e, k.weight, m, k.C);
      });
    });
  });
}

template <typename acc_t>
RowStats<acc_t> index_stats(acc_t m, const Sums<acc_t>& sums, acc_t log_s, acc_t z_y, acc_t w_y,
                            const RowConstants<acc_t>& k) {
  const bool smooth = k.eps > 0;
  const acc_t lse = m + log_s;
  const acc_t nll = (m - z_y) + log_s;  // -logp_iy
  acc_t loss = smooth ? (1 - k.eps) * w_y * nll : w_y * nll;
  acc_t sum_q = smooth ? (1 - k.eps) * w_y : w_y;
  if (smooth) {  // torch adds the smoothing term only for eps > 0 (a -inf logit is finite at eps = 0)
    loss += k.eps / k.C * (k.weight_total * log_s + sums.other);
    sum_q += k.eps / k.C * k.weight_total;
  }
  if (k.z_loss != 0) {  // skipped at 0: the default results stay bit for bit those without the option
    loss += k.z_loss * lse * lse;
    sum_q += 2 * k.z_loss * lse;  // d(z_loss * lse^2)/dz_c = 2 * z_loss * lse * softmax_c
  }
  return {loss, sum_q, 1 / sums.s};
}

// One row of probability-target cross-entropy, q_c = w_c ((1 - eps) p_c + eps / C), in the same two
// steps: prob_sums gives s, sum_c q_c (m - z_c) and sum_q; then
//   loss_i = sum_c q_c (lse - z_c) = sum_q * log(s) + sum_c q_c (m - z_c)  (+ z_loss * lse^2).
// Byte model: z and p are each read from memory once.
template <typename acc_t>
Sums<acc_t> prob_sums(const acc_t* z, const acc_t* p, acc_t* e, acc_t m, const RowConstants<acc_t>& k) {
  if (exped(k.C)) return prob_exp_pass<false, false, true>(z, p, e, k.weight, m, k.eps, k.C);
  return dispatch_flag(k.C >= kFastExpMinClasses && std::isfinite(m), [&](auto fast) {
    return dispatch_flag(e != nullptr, [&](auto store) {
      return prob_exp_pass<fast.value, store.value, false>(z, p, e, k.weight, m, k.eps, k.C);
    });
  });
}

template <typename acc_t>
RowStats<acc_t> prob_stats(acc_t m, const Sums<acc_t>& sums, acc_t log_s, const RowConstants<acc_t>& k) {
  const acc_t lse = m + log_s;
  acc_t sum_q = sums.q;
  acc_t loss = sum_q * log_s + sums.other;
  if (k.z_loss != 0) {
    loss += k.z_loss * lse * lse;
    sum_q += 2 * k.z_loss * lse;
  }
  return {loss, sum_q, 1 / sums.s};
}

// The gradient of one row, in place over e (which holds exp(z_c - m) from the row pass):
//   g_c = (softmax_c * sum_q - q_c) * scale = e_c * (sum_q / s * scale) - q_c * scale,
// q_c = eps / C * w_c for index targets (the target class is fixed up by the caller), and
// w_c ((1 - eps) p_c + eps / C) for probability targets; softcap: g_c *= (1 - t_c)(1 + t_c).
// Byte model: e (and p, t) are in cache; the row of the gradient is written once.
template <typename acc_t>
void grad_row(acc_t* e, const acc_t* p, const acc_t* t, const RowStats<acc_t>& r, acc_t scale,
              const RowConstants<acc_t>& k) {
  using Vec = vec::Vectorized<acc_t>;
  const int64_t C = k.C;
  const Vec a(r.sum_q * r.inv_s * scale), keep(1 - k.eps), spread(k.eps / C), vscale(scale);
  const bool has_q = p != nullptr || k.eps > 0;
  for (int64_t c = 0; c < C; c += Vec::size()) {
    const int64_t n = std::min<int64_t>(Vec::size(), C - c);
    auto load = [n](const acc_t* ptr) { return n == Vec::size() ? Vec::loadu(ptr) : Vec::loadu(ptr, n); };
    Vec g = load(e + c) * a;
    if (has_q) {
      Vec q = p != nullptr ? vec::fmadd(keep, load(p + c), spread) : spread;
      if (k.weight) q = q * load(k.weight + c);
      g = g - q * vscale;
    }
    if (t != nullptr) {
      const Vec tc = load(t + c);
      g = g * ((Vec(1) - tc) * (Vec(1) + tc));  // dx = dz * (1 - tanh^2)
    }
    if (n == Vec::size()) g.store(e + c); else g.store(e + c, n);
  }
}

// z = softcap * tanh(x / softcap) into z, tanh(x / softcap) into t.
template <typename acc_t>
void soft_cap_row(const acc_t* x, acc_t* z, acc_t* t, const RowConstants<acc_t>& k) {
  using Vec = vec::Vectorized<acc_t>;
  const Vec cap(k.softcap);
  for (int64_t c = 0; c < k.C; c += Vec::size()) {
    const int64_t n = std::min<int64_t>(Vec::size(), k.C - c);
    const Vec tc = ((n == Vec::size() ? Vec::loadu(x + c) : Vec::loadu(x + c, n)) / cap).tanh();
    const Vec zc = tc * cap;
    if (n == Vec::size()) {
      tc.store(t + c);
      zc.store(z + c);
    } else {
      tc.store(t + c, n);
      zc.store(z + c, n);
    }
  }
}

// ----------------------------------------------------------------------------------------------------
// The kernel: every row, then the reduction.
// ----------------------------------------------------------------------------------------------------
struct Options {
  int64_t ignore_index;
  int64_t reduction;
  double label_smoothing;
  double z_loss;
  std::optional<double> softcap;
};

// Rows: x (M, C) logits with row stride stride_xm and unit column stride; p (M, C) probability
// targets (stride_pm), or nullptr for index targets y (M,) with w_y (M,) = w[y_i] (0 if ignored);
// weight (C,) acc_t or nullptr. Writes row_loss (M,) and, when g is not null, g (M, C) contiguous.
template <typename scalar_t>
void cross_entropy_fwd_kernel(const scalar_t* x, int64_t stride_xm, const scalar_t* p_base,
                              int64_t stride_pm, const int64_t* y, const at::opmath_type<scalar_t>* w_y,
                              const at::opmath_type<scalar_t>* weight, int64_t M, int64_t C,
                              const Options& opt, at::opmath_type<scalar_t> scale,
                              at::opmath_type<scalar_t>* row_loss, scalar_t* g_base) {
  using acc_t = at::opmath_type<scalar_t>;  // float for float/bfloat16/half, double for double
  constexpr bool kSameType = std::is_same_v<scalar_t, acc_t>;
  const bool index = p_base == nullptr;
  RowConstants<acc_t> k{C, weight, static_cast<acc_t>(C), static_cast<acc_t>(opt.label_smoothing),
                        static_cast<acc_t>(opt.z_loss), static_cast<acc_t>(opt.softcap.value_or(0.0))};
  if (weight != nullptr) {
    k.weight_total = 0;
    for (int64_t c = 0; c < C; ++c) k.weight_total += weight[c];  // fixed order
  }
  const bool softcap = opt.softcap.has_value();

  // A few hundred KB of rows per task: (32, 27) runs inline, a (4096, 32000) call splits by rows.
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / C);
  // Rows go in blocks of up to kBlockRows that fit in L1 together, each step of the row pass running
  // over the whole block before the next: the rows' chains (max, exp, sum, log) are independent, so the
  // core overlaps them. A short row is all latency (perf at (4096, 27): the horizontal reductions and
  // logf of one row waited on each other). Rows of kBlockBytes and more go one at a time, as before.
  const int64_t row_bytes = C * static_cast<int64_t>(sizeof(acc_t));
  const int64_t R = std::clamp<int64_t>(kBlockBytes / row_bytes, 1, kBlockRows);
  at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    // Per-task scratch rows, in cache: converted logits and targets, tanh, and (for half/bfloat16 or
    // softcap) the float gradient before its single rounding.
    const bool need_z = !kSameType || softcap;
    const int64_t RC = std::min(R, end - begin) * C;
    std::unique_ptr<acc_t[]> z_buf(need_z ? new acc_t[RC] : nullptr);
    std::unique_ptr<acc_t[]> t_buf(softcap ? new acc_t[RC] : nullptr);
    std::unique_ptr<acc_t[]> p_buf(!index && !kSameType ? new acc_t[RC] : nullptr);
    // e: the gradient's rows themselves for float/double; scratch for half/bfloat16, and for short
    // rows without a gradient (exp_block needs somewhere to put the exps)
    const bool e_scratch = g_base != nullptr ? !kSameType : exped(C);
    std::unique_ptr<acc_t[]> e_buf(e_scratch ? new acc_t[RC] : nullptr);
    const acc_t* zs[kBlockRows];  // per row of the block: its logits, probabilities and exp/gradient
    const acc_t* ps[kBlockRows];
    acc_t* es[kBlockRows];
    acc_t ms[kBlockRows];
    Sums<acc_t> sums[kBlockRows];
    acc_t log_s[kBlockRows];
    for (int64_t b = begin; b < end; b += R) {
      const int64_t n = std::min(R, end - b);
      // The block's e rows, contiguous: rows b..b+n of the gradient, or the scratch rows.
      acc_t* e_block = e_scratch          ? e_buf.get()
                       : g_base != nullptr ? reinterpret_cast<acc_t*>(g_base) + b * C
                                           : nullptr;
      // Short rows: each row's max, e = z - m; then e = exp(e) over the whole block (exp_block).
      for (int64_t r = 0; r < n && exped(C); ++r) {
        const int64_t i = b + r;
        if (index && y[i] == opt.ignore_index) {
          std::fill_n(e_block + r * C, C, acc_t(0));  // exp_block's input: anything finite
          continue;
        }
        zs[r] = as_acc<scalar_t, acc_t>(x + i * stride_xm, z_buf.get() + r * C, C);
        if (softcap) {
          soft_cap_row<acc_t>(zs[r], z_buf.get() + r * C, t_buf.get() + r * C, k);
          zs[r] = z_buf.get() + r * C;
        }
        ms[r] = row_max(zs[r], C);
        shift_row(zs[r], ms[r], e_block + r * C, C);
      }
      if (exped(C)) exp_block(e_block, n * C);
      for (int64_t r = 0; r < n; ++r) {  // m, s and the other sums of each row; e = exp(z - m)
        const int64_t i = b + r;
        if (index && y[i] == opt.ignore_index) {  // ignored: contributes exactly nothing, whatever it holds
          sums[r] = {1, 0, 0};
          continue;
        }
        if (exped(C)) {  // z, m and e are ready
          es[r] = e_block + r * C;
          ps[r] = index ? nullptr
                        : as_acc<scalar_t, acc_t>(p_base + i * stride_pm, p_buf.get() + r * C, C);
          sums[r] = index ? index_sums<acc_t>(zs[r], es[r], ms[r], k)
                          : prob_sums<acc_t>(zs[r], ps[r], es[r], ms[r], k);
          continue;
        }
        const acc_t* z = as_acc<scalar_t, acc_t>(x + i * stride_xm, z_buf.get() + r * C, C);
        if (softcap) {
          soft_cap_row<acc_t>(z, z_buf.get() + r * C, t_buf.get() + r * C, k);
          z = z_buf.get() + r * C;
        }
        acc_t* e = nullptr;  // exp(z - m), then the gradient, in acc_t
        if (g_base != nullptr) {
          if constexpr (kSameType) e = g_base + i * C; else e = e_buf.get() + r * C;
        }
        const acc_t* p =
            index ? nullptr : as_acc<scalar_t, acc_t>(p_base + i * stride_pm, p_buf.get() + r * C, C);
        zs[r] = z;
        ps[r] = p;
        es[r] = e;
        ms[r] = row_max(z, C);
        sums[r] = index ? index_sums<acc_t>(z, e, ms[r], k) : prob_sums<acc_t>(z, p, e, ms[r], k);
      }
      for (int64_t r = 0; r < n; ++r) log_s[r] = std::log(sums[r].s);
      for (int64_t r = 0; r < n; ++r) {  // the loss and the gradient of each row
        const int64_t i = b + r;
        scalar_t* g_row = g_base != nullptr ? g_base + i * C : nullptr;
        if (index && y[i] == opt.ignore_index) {
          row_loss[i] = 0;
          if (g_row != nullptr) std::fill_n(g_row, C, scalar_t(0));
          continue;
        }
        const RowStats<acc_t> st = index ? index_stats<acc_t>(ms[r], sums[r], log_s[r], zs[r][y[i]], w_y[i], k)
                                         : prob_stats<acc_t>(ms[r], sums[r], log_s[r], k);
        row_loss[i] = st.loss;
        if (g_row == nullptr) continue;
        acc_t* e = es[r];
        const acc_t* t = softcap ? t_buf.get() + r * C : nullptr;
        const acc_t e_y = index ? e[y[i]] : acc_t(0);
        grad_row<acc_t>(e, ps[r], t, st, scale, k);
        if (index) {  // the target class, in one expression: (softmax_y * sum_q - q_y) * scale, with
          // q_y = (1 - eps) w_y + eps / C * w_y (w_y = w[y]), times softcap's chain factor
          const acc_t q_y = (1 - k.eps) * w_y[i] + k.eps / C * w_y[i];
          acc_t g_y = (e_y * st.inv_s * st.sum_q - q_y) * scale;
          if (softcap) g_y *= (1 - t[y[i]]) * (1 + t[y[i]]);
          e[y[i]] = g_y;
        }
        if constexpr (!kSameType) {
          vec::convert(e, g_row, C);  // the float gradient, rounded once
        }
      }
    }
  });
}

// The target's batch shape, and the loss's for reduction "none": input's without the class dim.
c10::SmallVector<int64_t, 5> batch_shape(const Tensor& input) {
  c10::SmallVector<int64_t, 5> shape;
  if (input.dim() > 1) {
    shape.push_back(input.size(0));
    for (int64_t d = 2; d < input.dim(); ++d) shape.push_back(input.size(d));
  }
  return shape;
}

// ----------------------------------------------------------------------------------------------------
// Argument checks: the messages of fused_ops/cross_entropy.py's _check_args, for calls of the ops that
// do not come through fused_ops.cross_entropy (opcheck, torch.ops.fused_ops.* directly). Nothing is
// written before they pass.
// ----------------------------------------------------------------------------------------------------
int64_t check_args(const Tensor& input, const Tensor& target, const std::optional<Tensor>& weight,
                   const Options& opt) {
  const auto dtype = input.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
                   "cross_entropy: input must be float16, bfloat16, float32 or float64, got ", dtype);
  TORCH_CHECK_VALUE(input.dim() > 0, "cross_entropy: input must have shape (C,), (N, C) or (N, C, d1, ...), "
                    "got a 0-dim tensor");
  const int64_t C = input.dim() == 1 ? input.size(0) : input.size(1);
  TORCH_CHECK_VALUE(C > 0, "cross_entropy: input has no classes (C = 0), shape ", input.sizes());
  TORCH_CHECK_VALUE(opt.reduction >= kReductionNone && opt.reduction <= kReductionSum,
                    "cross_entropy: reduction must be 0 (none), 1 (mean) or 2 (sum), got ", opt.reduction);
  TORCH_CHECK_VALUE(opt.label_smoothing >= 0.0 && opt.label_smoothing <= 1.0,
                    "cross_entropy: label_smoothing must be in [0, 1], got ", opt.label_smoothing);
  TORCH_CHECK_VALUE(std::isfinite(opt.z_loss) && opt.z_loss >= 0.0,
                    "cross_entropy: z_loss must be a finite float >= 0, got ", opt.z_loss);
  TORCH_CHECK_VALUE(!opt.softcap.has_value() || (std::isfinite(*opt.softcap) && *opt.softcap > 0.0),
                    "cross_entropy: softcap must be a finite float > 0 or None, got ", opt.softcap.value_or(0.0));
  TORCH_CHECK_VALUE(input.device().is_cpu(), "cross_entropy: the native kernels take CPU tensors, got input on ",
                    input.device());
  TORCH_CHECK_VALUE(target.device() == input.device(), "cross_entropy: target is on ", target.device(),
                    " but input is on ", input.device(), "; all tensors must be on the same device");
  if (target.is_floating_point()) {
    const auto index_shape = batch_shape(input);
    TORCH_CHECK_TYPE(target.sizes() == input.sizes() || target.sizes() != at::IntArrayRef(index_shape),
                     "cross_entropy: target has dtype ", target.scalar_type(), " and shape ", target.sizes(),
                     ", the shape of class indices: class indices need an integer dtype (target.long()); a float "
                     "target is read as class probabilities, of the input's shape ", input.sizes());
    TORCH_CHECK_VALUE(target.sizes() == input.sizes(), "cross_entropy: a probability target (float dtype) must ",
                      "have the input's shape ", input.sizes(), ", got target of shape ", target.sizes());
    TORCH_CHECK_TYPE(target.scalar_type() == dtype, "cross_entropy: a probability target must have the input's "
                     "dtype ", dtype, ", got ", target.scalar_type());
    TORCH_CHECK_VALUE(opt.ignore_index < 0, "cross_entropy: ignore_index=", opt.ignore_index,
                      " is not supported for probability targets (float dtype); leave it at a negative value "
                      "such as the default -100");
  } else {
    const auto t = target.scalar_type();
    TORCH_CHECK_TYPE(t == at::kLong || t == at::kInt || t == at::kByte, "cross_entropy: target must hold class "
                     "indices (int64, int32 or uint8) or class probabilities (the input's float dtype), got ", t);
    const auto expected = batch_shape(input);
    if (input.dim() > 1 && target.dim() >= 1) {
      TORCH_CHECK_VALUE(target.size(0) == input.size(0), "cross_entropy: batch size mismatch: input has N=",
                        input.size(0), ", target has ", target.size(0));
    }
    TORCH_CHECK_VALUE(target.sizes() == at::IntArrayRef(expected), "cross_entropy: for input of shape ",
                      input.sizes(), " an index target must have shape ", at::IntArrayRef(expected), ", got ",
                      target.sizes());
  }
  if (weight.has_value()) {
    const Tensor& w = *weight;
    TORCH_CHECK_TYPE(w.is_floating_point(), "cross_entropy: weight must be a float tensor, got ", w.scalar_type());
    TORCH_CHECK_VALUE(w.dim() == 1 && w.size(0) == C, "cross_entropy: weight must have shape (C,) = (", C,
                      ",), like input's class dimension, got ", w.sizes());
    TORCH_CHECK_VALUE(w.device() == input.device(), "cross_entropy: weight is on ", w.device(),
                      " but input is on ", input.device(), "; all tensors must be on the same device");
  }
  return C;
}

// (M, C) rows of x with unit column stride: x itself where it already is (no copy, no dispatch),
// else a copy, class dim last. Returns (data tensor, row stride).
std::pair<Tensor, int64_t> as_rows(const Tensor& x, int64_t C) {
  if (x.dim() == 1) {
    Tensor rows = x.stride(0) == 1 || C == 1 ? x : x.contiguous();
    return {rows, C};
  }
  if (x.dim() == 2) {
    Tensor rows = x.stride(1) == 1 || C == 1 ? x : x.contiguous();
    return {rows, rows.size(0) <= 1 ? C : rows.stride(0)};
  }
  return {x.movedim(1, -1).contiguous(), C};
}

// An empty tensor of input's shape whose memory is M contiguous rows of C, class dim last: contiguous
// for (C,) and (N, C); for (N, C, d...), (N, d..., C) memory seen as (N, C, d...). Gradients of 1 MiB
// and more come from this op's ReusingAllocator (common.h): last step's buffer, pages mapped.
Tensor empty_rows_like(const Tensor& input) {
  c10::SmallVector<int64_t, 5> shape{input.sizes().begin(), input.sizes().end()};
  if (input.dim() > 2) {  // (N, C, d...) -> (N, d..., C)
    shape.erase(shape.begin() + 1);
    shape.push_back(input.size(1));
  }
  const size_t bytes = static_cast<size_t>(input.numel()) * input.element_size();
  static ReusingAllocator* gradients = new ReusingAllocator();  // never destroyed: the process owns it
  Tensor rows = bytes >= ReusingAllocator::kMinBytes ? empty_reusing(*gradients, shape, input.scalar_type())
                                                      : Tensor(at::detail::empty_cpu(shape, input.scalar_type()));
  return input.dim() > 2 ? rows.movedim(-1, 1) : rows;
}

// Index targets -> y (M,) int64 and w_y (M,) = w[y_i] (0 for ignored rows); returns sum_i w_y, the
// "mean" denominator, summed in row order. A target outside [0, C) that is not ignore_index raises
// IndexError (as torch on the CPU), before anything is written.
template <typename acc_t, typename Ints, typename Accs>
double target_pass(const Tensor& target, const acc_t* weight, int64_t C, int64_t ignore_index, Ints& y,
                   Accs& w_y) {
  const Tensor t = target.dim() <= 1 ? target : target.contiguous();
  const int64_t M = t.numel();
  const int64_t stride = t.dim() == 1 ? t.stride(0) : 1;
  y.resize(M);
  w_y.resize(M);
  auto read = [&](const auto* data) {
    for (int64_t i = 0; i < M; ++i) y[i] = static_cast<int64_t>(data[i * stride]);
  };
  switch (t.scalar_type()) {  // check_args admitted these three
    case at::kLong: read(t.const_data_ptr<int64_t>()); break;
    case at::kInt: read(t.const_data_ptr<int32_t>()); break;
    default: read(t.const_data_ptr<uint8_t>()); break;
  }
  double denom = 0;
  for (int64_t i = 0; i < M; ++i) {
    const int64_t yi = y[i];
    if (yi == ignore_index) {
      w_y[i] = 0;
      continue;
    }
    TORCH_CHECK_INDEX(yi >= 0 && yi < C, "cross_entropy: target holds ", yi, ", outside [0, ", C,
                      ") and not ignore_index=", ignore_index);
    w_y[i] = weight != nullptr ? weight[yi] : acc_t(1);
    denom += static_cast<double>(w_y[i]);
  }
  return denom;
}

// The forward: the loss, and d(loss)/d(input) for grad_output = 1 when with_grad (else undefined).
std::tuple<Tensor, Tensor> forward(const Tensor& input, const Tensor& target, const std::optional<Tensor>& weight,
                                   const Options& opt, std::optional<at::ScalarType> loss_dtype, bool with_grad) {
  const int64_t C = check_args(input, target, weight, opt);
  const bool index = !target.is_floating_point();
  const auto [x, stride_xm] = as_rows(input, C);
  const int64_t M = input.numel() / C;
  Tensor prob;
  int64_t stride_pm = 0;
  if (!index) std::tie(prob, stride_pm) = as_rows(target, C);
  Tensor grad = with_grad ? empty_rows_like(input) : Tensor();
  const auto out_dtype = loss_dtype.value_or(input.scalar_type());
  // at::detail::empty_cpu, not at::empty: this kernel only ever runs on CPU tensors, and the dispatcher
  // round trip of at::empty is a tenth of a makemore-sized call
  Tensor loss = at::detail::empty_cpu(opt.reduction == kReductionNone ? batch_shape(input)
                                                                      : c10::SmallVector<int64_t, 5>{},
                                      out_dtype);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "cross_entropy_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr auto kAcc = c10::CppTypeToScalarType<acc_t>::value;
    Tensor w;
    if (weight.has_value()) w = (weight->scalar_type() == kAcc ? *weight : weight->to(kAcc)).contiguous();
    const acc_t* w_ptr = w.defined() ? w.const_data_ptr<acc_t>() : nullptr;
    c10::SmallVector<int64_t, 128> y;  // per row: no heap allocation up to 128 rows
    c10::SmallVector<acc_t, 128> w_y;
    double denom = static_cast<double>(M);  // probability targets: "mean" divides by M
    if (index) denom = target_pass<acc_t>(target, w_ptr, C, opt.ignore_index, y, w_y);
    // The reduction scale; "mean" with a zero denominator gives nan, as torch (0 / 0 without smoothing).
    double scale = 1.0;
    if (opt.reduction == kReductionMean) {
      scale = denom == 0 ? std::numeric_limits<double>::quiet_NaN() : 1.0 / denom;
    }
    c10::SmallVector<acc_t, 128> row_loss(M);
    cross_entropy_fwd_kernel<scalar_t>(
        x.const_data_ptr<scalar_t>(), stride_xm, index ? nullptr : prob.const_data_ptr<scalar_t>(), stride_pm,
        index ? y.data() : nullptr, index ? w_y.data() : nullptr, w_ptr, M, C, opt, static_cast<acc_t>(scale),
        row_loss.data(), with_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out_dtype, "cross_entropy_loss", [&] {
      scalar_t* out = loss.mutable_data_ptr<scalar_t>();
      if (opt.reduction == kReductionNone) {
        for (int64_t i = 0; i < M; ++i) out[i] = static_cast<scalar_t>(row_loss[i]);
        return;
      }
      double total = 0;  // row order, in double: deterministic whatever the thread count
      for (int64_t i = 0; i < M; ++i) total += static_cast<double>(row_loss[i]);
      out[0] = static_cast<scalar_t>(opt.reduction == kReductionSum ? total : total * scale);
    });
  });
  return {loss, grad};
}

Options options(int64_t ignore_index, int64_t reduction, double label_smoothing, double z_loss,
                std::optional<double> softcap) {
  return {ignore_index, reduction, label_smoothing, z_loss, softcap};
}

// ----------------------------------------------------------------------------------------------------
// The ops' CPU kernels.
// ----------------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor> cross_entropy_fwd_cpu(const Tensor& input, const Tensor& target,
                                                 const std::optional<Tensor>& weight, int64_t ignore_index,
                                                 int64_t reduction, double label_smoothing, double z_loss,
                                                 std::optional<double> softcap,
                                                 std::optional<at::ScalarType> loss_dtype) {
  return forward(input, target, weight, options(ignore_index, reduction, label_smoothing, z_loss, softcap),
                 loss_dtype, /*with_grad=*/true);
}

Tensor cross_entropy_cpu(const Tensor& input, const Tensor& target, const std::optional<Tensor>& weight,
                         int64_t ignore_index, int64_t reduction, double label_smoothing, double z_loss,
                         std::optional<double> softcap, std::optional<at::ScalarType> loss_dtype) {
  return std::get<0>(forward(input, target, weight,
                             options(ignore_index, reduction, label_smoothing, z_loss, softcap), loss_dtype,
                             /*with_grad=*/false));
}

// ----------------------------------------------------------------------------------------------------
// Autograd, in C++: one node per call, and no Python on the way.
// ----------------------------------------------------------------------------------------------------

// True for a real CPU tensor that no tracer, transform or dispatch mode is watching: its values may be
// read to skip work (never under torch.compile, make_fx, functionalization or torch.func).
bool is_plain_cpu_tensor(const Tensor& t) {
  const auto keys = t.key_set();
  return t.device().is_cpu() && t.layout() == at::kStrided && t.has_storage() &&
         !keys.has(c10::DispatchKey::Python) && !keys.has(c10::DispatchKey::Functionalize) &&
         !keys.has(c10::DispatchKey::FuncTorchBatched) && !keys.has(c10::DispatchKey::FuncTorchGradWrapper) &&
         c10::impl::TorchDispatchModeTLS::stack_len() == 0 &&
         !c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::Functionalize);
}

// grad_output == 1 everywhere (loss.backward() of a "mean"/"sum" loss, or of loss.sum() for "none").
bool is_unit(const Tensor& grad_output) {
  if (!is_plain_cpu_tensor(grad_output)) return false;
  if (grad_output.numel() != 1) return grad_output.numel() > 0 && grad_output.eq(1).all().item<bool>();
  bool unit = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_output.scalar_type(), "cross_entropy_unit", [&] {
    unit = static_cast<double>(*grad_output.const_data_ptr<scalar_t>()) == 1.0;
  });
  return unit;
}

const auto& fwd_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fused_ops::cross_entropy_fwd", "")
                             .typed<decltype(cross_entropy_fwd_cpu)>();
  return op;
}

const auto& loss_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fused_ops::cross_entropy", "")
                             .typed<decltype(cross_entropy_cpu)>();
  return op;
}

// The autograd node of one call, written as ATen writes its own (VariableType's generated kernels):
// a torch::autograd::Node holding the one saved tensor, the gradient for a unit grad_output (never the
// logits). torch::autograd::Function would do as well, at twice the per-call cost (its context map,
// output wrapping and input bookkeeping), which at makemore sizes is the whole cost of the op.
//
// backward(grad_output): where grad_output == 1 and the graph is not retained, the saved gradient
// itself, handed over (no N x C pass at all: the node frees its reference before AccumulateGrad
// runs, which then moves it into .grad); otherwise stored * grad_output, out of place, so that a
// retained graph can run backward again. Double backward raises.
struct CrossEntropyBackward final : public torch::autograd::Node {
  torch::autograd::SavedVariable grad_;

  std::string name() const override { return "CrossEntropyBackward"; }
  void release_variables() override { grad_.reset_data(); }

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grad_outputs) override {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "cross_entropy: double backward (create_graph=True through cross_entropy) is not supported");
    torch::autograd::variable_list grad_inputs(1);
    const Tensor& grad_output = grad_outputs[0];
    if (!grad_output.defined()) return grad_inputs;
    Tensor grad = grad_.unpack();  // raises if a backward already freed it (without retain_graph)
    if (!torch::autograd::get_current_graph_task_keep_graph() && is_unit(grad_output)) {
      grad_inputs[0] = std::move(grad);
      return grad_inputs;
    }
    // "none" over (N, C, d...): grad_output (N, d...) scales the class dim's rows
    const Tensor scale = grad_output.dim() > 0 && grad.dim() > 1 ? grad_output.unsqueeze(1) : grad_output;
    Tensor grad_input = grad * scale;  // dx = stored * grad_output
    grad_inputs[0] = grad_input.scalar_type() == grad.scalar_type() ? grad_input : grad_input.to(grad.scalar_type());
    return grad_inputs;
  }
};

// The Autograd kernel of fused_ops::cross_entropy. It runs fused_ops::cross_entropy_fwd through the
// dispatcher, below autograd: the CPU kernel in eager mode, the fake kernel under torch.compile
// (AOTAutograd then traces it, and the backward's aten ops, into its joint graph).
Tensor cross_entropy_autograd(const Tensor& input, const Tensor& target, const std::optional<Tensor>& weight,
                              int64_t ignore_index, int64_t reduction, double label_smoothing, double z_loss,
                              std::optional<double> softcap, std::optional<at::ScalarType> loss_dtype) {
  if (!(at::GradMode::is_enabled() && input.requires_grad())) {
    at::AutoDispatchBelowADInplaceOrView guard;  // no node to record: the loss alone
    return loss_op().call(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
                          loss_dtype);
  }
  TORCH_CHECK_VALUE(!target.requires_grad(), "cross_entropy: target requires grad, but gradients with respect "
                    "to probability targets are not computed; pass target.detach()");
  TORCH_CHECK_VALUE(!(weight.has_value() && weight->requires_grad()), "cross_entropy: weight requires grad, but "
                    "gradients with respect to weight are not computed (torch's nll_loss refuses them too); pass "
                    "weight.detach()");
  Tensor loss, grad;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    std::tie(loss, grad) = fwd_op().call(input, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                                         softcap, loss_dtype);
  }
  NodePtr node = make_node<CrossEntropyBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(input));
  torch::autograd::set_history(loss, node);
  static_cast<CrossEntropyBackward*>(node.get())->grad_ = torch::autograd::SavedVariable(grad, /*is_output=*/false);
  return loss;
}

// fused_ops::cross_entropy_mean: fused_ops::cross_entropy with every option at its default, the common
// call. Two arguments for the boxed call from Python to convert instead of nine: 0.8 us of a 4 us call
// at makemore's size.
Tensor cross_entropy_mean_cpu(const Tensor& input, const Tensor& target) {
  return cross_entropy_cpu(input, target, std::nullopt, -100, kReductionMean, 0.0, 0.0, std::nullopt, std::nullopt);
}

Tensor cross_entropy_mean_autograd(const Tensor& input, const Tensor& target) {
  return cross_entropy_autograd(input, target, std::nullopt, -100, kReductionMean, 0.0, 0.0, std::nullopt,
                                std::nullopt);
}

}  // namespace
}  // namespace fused_ops

// ----------------------------------------------------------------------------------------------------
// Registration. A fragment: the fused_ops namespace also holds ops defined in Python
// (fused_ops::check_targets) and, later, the other native ops, one .cpp each.
// ----------------------------------------------------------------------------------------------------
TORCH_LIBRARY_FRAGMENT(fused_ops, m) {
  m.def("cross_entropy(Tensor input, Tensor target, Tensor? weight=None, int ignore_index=-100, "
        "int reduction=1, float label_smoothing=0.0, float z_loss=0.0, float? softcap=None, "
        "ScalarType? loss_dtype=None) -> Tensor");
  m.def("cross_entropy_fwd(Tensor input, Tensor target, Tensor? weight=None, int ignore_index=-100, "
        "int reduction=1, float label_smoothing=0.0, float z_loss=0.0, float? softcap=None, "
        "ScalarType? loss_dtype=None) -> (Tensor loss, Tensor grad)");
  m.def("cross_entropy_mean(Tensor input, Tensor target) -> Tensor");
}

TORCH_LIBRARY_IMPL(fused_ops, CPU, m) {
  m.impl("cross_entropy", &fused_ops::cross_entropy_cpu);
  m.impl("cross_entropy_fwd", &fused_ops::cross_entropy_fwd_cpu);
  m.impl("cross_entropy_mean", &fused_ops::cross_entropy_mean_cpu);
}

TORCH_LIBRARY_IMPL(fused_ops, Autograd, m) {
  m.impl("cross_entropy", &fused_ops::cross_entropy_autograd);
  m.impl("cross_entropy_mean", &fused_ops::cross_entropy_mean_autograd);
  // cross_entropy_fwd returns a gradient as data: not differentiable itself, and no warning about it
  m.impl("cross_entropy_fwd", torch::CppFunction::makeFallthrough());
}
