// The gated SAEs' elementwise chain (sagsae/saes/gated_chain.py) as one pass over [B, H] in each direction, for CPU.
// Forward reads u and writes the codes and the gate codes; backward reads u and both codes' gradients and writes
// u's gradient. The gate, π and the magnitude are recomputed from u, so nothing else is kept between the two.
// Per-latent sums run over row blocks in float, added to per-thread double totals, then across threads.
// Storage is fp32 or bf16 (as raw 16 bits); everything is computed in fp32, as the eager chain does.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t BLOCK_ROWS = 64;  // rows summed in float before a double total takes them

inline float load(float value) { return value; }
inline float load(uint16_t bits) {
  uint32_t wide = uint32_t(bits) << 16;
  float value;
  std::memcpy(&value, &wide, sizeof value);
  return value;
}

// A float rounded to bf16 (nearest even, as torch's cast; NaN stays NaN), kept in 32-bit lanes so that the rounding
// vectorizes without packing to 16 bits.
inline float bf16_rounded(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u;
  rounded = (bits & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC00000u : rounded;
  float out;
  std::memcpy(&out, &rounded, sizeof out);
  return out;
}

template <typename S> inline S store(float value);
template <> inline float store<float>(float value) { return value; }
template <> inline uint16_t store<uint16_t>(float value) {
  uint32_t bits;
  float rounded = bf16_rounded(value);
  std::memcpy(&bits, &rounded, sizeof bits);
  return uint16_t(bits >> 16);
}

struct Latents {  // per-latent parameters, each [H] fp32
  const float* b_gate;
  const float* rescale;  // exp(r)
  const float* b_mag;
  const float* theta_pos;
  const float* theta_neg;
};

// Each thread takes a contiguous range of rows and fills its own `sums` totals (count × H doubles).
template <typename RowBlock>
void over_row_ranges(int64_t rows, int64_t width, int64_t count, std::vector<double>& totals, RowBlock row_block) {
  int64_t ranges = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows / BLOCK_ROWS));
  std::vector<double> partial(ranges * count * width, 0.0);
  at::parallel_for(0, ranges, 1, [&](int64_t first, int64_t last) {
    std::vector<float> block(count * width);
    for (int64_t range = first; range < last; ++range) {
      double* sums = partial.data() + range * count * width;
      int64_t begin = rows * range / ranges, end = rows * (range + 1) / ranges;
      for (int64_t start = begin; start < end; start += BLOCK_ROWS) {
        std::fill(block.begin(), block.end(), 0.0f);
        row_block(start, std::min(end, start + BLOCK_ROWS), block.data());
        for (int64_t i = 0; i < count * width; ++i) sums[i] += block[i];
      }
    }
  });
  totals.assign(count * width, 0.0);
  for (int64_t range = 0; range < ranges; ++range)
    for (int64_t i = 0; i < count * width; ++i) totals[i] += partial[range * count * width + i];
}

template <typename S, bool SOFT, bool SIGN>
void forward_kernel(const S* u, S* codes, S* gate_codes, Latents p, int64_t rows, int64_t width,
                    std::vector<double>& l1) {
  over_row_ranges(rows, width, 1, l1, [&](int64_t begin, int64_t end, float* __restrict__ block) {
    for (int64_t row = begin; row < end; ++row) {
      const S* __restrict__ x = u + row * width;
      S* __restrict__ code_row = codes + row * width;
      S* __restrict__ gate_row = gate_codes + row * width;
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) {
        float value = load(x[j]);
        float pi = value + p.b_gate[j];
        float theta_pos = p.theta_pos[j], theta_neg = p.theta_neg[j];  // loaded before any select: vectorizable
        bool open = (pi > theta_pos) | (pi < -theta_neg);
        float magnitude = value * p.rescale[j] + p.b_mag[j];
        bool keep = SIGN ? open & ((pi > 0.0f) == (magnitude > 0.0f)) : open;
        float gate_code = SOFT ? (open ? pi - (pi > 0.0f ? theta_pos : -theta_neg) : 0.0f) : (open ? pi : 0.0f);
        code_row[j] = store<S>(keep ? magnitude : 0.0f);
        gate_row[j] = store<S>(gate_code);
        block[j] += std::fabs(gate_code);
      }
    }
  });
}

enum Sum { B_GATE, B_MAG, RESCALED, POS, NEG, SUMS };

// One row of the backward on fp32 values; ROUND: the codes were stored in bf16, so their signs and values are read
// as stored (the eager chain saves the rounded codes).
template <bool ROUND, bool SOFT, bool SIGN>
inline void backward_row(const float* __restrict__ x, const float* __restrict__ code_grads,
                         const float* __restrict__ gate_grads, const float* __restrict__ grad_l1,
                         float* __restrict__ out, const Latents& p, float half_band, int64_t width,
                         float* __restrict__ block) {
  float* __restrict__ b_gate_sum = block + B_GATE * width;
  float* __restrict__ b_mag_sum = block + B_MAG * width;
  float* __restrict__ rescaled_sum = block + RESCALED * width;
  float* __restrict__ pos_sum = block + POS * width;
  float* __restrict__ neg_sum = block + NEG * width;
#pragma omp simd
  for (int64_t j = 0; j < width; ++j) {
    float value = x[j];
    float pi = value + p.b_gate[j];
    float theta_pos = p.theta_pos[j], theta_neg = p.theta_neg[j];
    bool open = (pi > theta_pos) | (pi < -theta_neg);
    float magnitude = value * p.rescale[j] + p.b_mag[j];
    bool keep = SIGN ? open & ((pi > 0.0f) == (magnitude > 0.0f)) : open;
    float gate_code = SOFT ? (open ? pi - (pi > 0.0f ? theta_pos : -theta_neg) : 0.0f) : (open ? pi : 0.0f);
    float code = keep ? magnitude : 0.0f;
    if (ROUND) {
      gate_code = bf16_rounded(gate_code);
      code = bf16_rounded(code);
    }
    float sign = float(gate_code > 0.0f) - float(gate_code < 0.0f);
    float gate_grad = gate_grads[j] + sign * grad_l1[j];
    float grad = open ? gate_grad : 0.0f;
    b_gate_sum[j] += grad;
    float kept_grad = keep ? code_grads[j] : 0.0f;
    grad += kept_grad * p.rescale[j];
    b_mag_sum[j] += kept_grad;
    rescaled_sum[j] += kept_grad * code;
    out[j] = grad;
    bool positive = pi > 0.0f, negative = pi < 0.0f;
    bool at_pos = SOFT ? open & positive : positive & (pi > theta_pos - half_band) & (pi < theta_pos + half_band);
    bool at_neg = SOFT ? open & negative : negative & (pi > -theta_neg - half_band) & (pi < -theta_neg + half_band);
    pos_sum[j] += at_pos ? gate_grad : 0.0f;
    neg_sum[j] += at_neg ? gate_grad : 0.0f;
  }
}

inline void widen(const uint16_t* __restrict__ from, float* __restrict__ to, int64_t width) {
#pragma omp simd
  for (int64_t j = 0; j < width; ++j) to[j] = load(from[j]);
}

template <typename S, bool SOFT, bool SIGN>
void backward_kernel(const S* u, const S* grad_codes, const S* grad_gate_codes, const float* grad_l1, S* grad_u,
                     Latents p, float half_band, int64_t rows, int64_t width, std::vector<double>& sums) {
  over_row_ranges(rows, width, SUMS, sums, [&](int64_t begin, int64_t end, float* __restrict__ block) {
    if constexpr (std::is_same_v<S, float>) {
      for (int64_t row = begin; row < end; ++row) {
        int64_t at = row * width;
        backward_row<false, SOFT, SIGN>(u + at, grad_codes + at, grad_gate_codes + at, grad_l1, grad_u + at, p,
                                        half_band, width, block);
      }
    } else {  // bf16 rows widened into fp32 scratch first: the fused loop vectorizes only on fp32 operands
      std::vector<float> scratch(4 * width);
      float *x = scratch.data(), *code_grads = x + width, *gate_grads = x + 2 * width, *out = x + 3 * width;
      for (int64_t row = begin; row < end; ++row) {
        int64_t at = row * width;
        widen(u + at, x, width);
        widen(grad_codes + at, code_grads, width);
        widen(grad_gate_codes + at, gate_grads, width);
        backward_row<true, SOFT, SIGN>(x, code_grads, gate_grads, grad_l1, out, p, half_band, width, block);
        S* __restrict__ narrow = grad_u + at;
#pragma omp simd
        for (int64_t j = 0; j < width; ++j) narrow[j] = store<S>(out[j]);
      }
    }
  });
}

Latents latents(const torch::Tensor& b_gate, const torch::Tensor& rescale, const torch::Tensor& b_mag,
                const torch::Tensor& theta_pos, const torch::Tensor& theta_neg) {
  return {b_gate.data_ptr<float>(), rescale.data_ptr<float>(), b_mag.data_ptr<float>(), theta_pos.data_ptr<float>(),
          theta_neg.data_ptr<float>()};
}

torch::Tensor row_of_sums(const std::vector<double>& sums, int64_t index, int64_t width) {
  auto out = torch::empty({width}, torch::kFloat32);
  float* data = out.data_ptr<float>();
  for (int64_t j = 0; j < width; ++j) data[j] = float(sums[index * width + j]);
  return out;
}

template <typename S>
std::vector<torch::Tensor> forward_typed(const torch::Tensor& u, Latents p, bool sign_consistency, bool soft) {
  int64_t rows = u.size(0), width = u.size(1);
  auto codes = torch::empty_like(u), gate_codes = torch::empty_like(u);
  const S* x = reinterpret_cast<const S*>(u.data_ptr());
  S* c = reinterpret_cast<S*>(codes.data_ptr());
  S* g = reinterpret_cast<S*>(gate_codes.data_ptr());
  std::vector<double> l1;
  if (soft && sign_consistency) forward_kernel<S, true, true>(x, c, g, p, rows, width, l1);
  else if (soft) forward_kernel<S, true, false>(x, c, g, p, rows, width, l1);
  else if (sign_consistency) forward_kernel<S, false, true>(x, c, g, p, rows, width, l1);
  else forward_kernel<S, false, false>(x, c, g, p, rows, width, l1);
  return {codes, gate_codes, row_of_sums(l1, 0, width)};
}

template <typename S>
std::vector<torch::Tensor> backward_typed(const torch::Tensor& grad_codes, const torch::Tensor& grad_gate_codes,
                                          const torch::Tensor& grad_l1, const torch::Tensor& u, Latents p,
                                          double bandwidth, bool sign_consistency, bool soft) {
  int64_t rows = u.size(0), width = u.size(1);
  auto grad_u = torch::empty_like(u);
  const S* x = reinterpret_cast<const S*>(u.data_ptr());
  const S* gc = reinterpret_cast<const S*>(grad_codes.data_ptr());
  const S* gg = reinterpret_cast<const S*>(grad_gate_codes.data_ptr());
  const float* gl = grad_l1.data_ptr<float>();
  S* out = reinterpret_cast<S*>(grad_u.data_ptr());
  float half = float(bandwidth / 2);
  std::vector<double> sums;
  if (soft && sign_consistency) backward_kernel<S, true, true>(x, gc, gg, gl, out, p, half, rows, width, sums);
  else if (soft) backward_kernel<S, true, false>(x, gc, gg, gl, out, p, half, rows, width, sums);
  else if (sign_consistency) backward_kernel<S, false, true>(x, gc, gg, gl, out, p, half, rows, width, sums);
  else backward_kernel<S, false, false>(x, gc, gg, gl, out, p, half, rows, width, sums);
  std::vector<torch::Tensor> result{grad_u};
  for (int64_t index = 0; index < SUMS; ++index) result.push_back(row_of_sums(sums, index, width));
  return result;
}

void check_inputs(const torch::Tensor& u, std::initializer_list<torch::Tensor> per_latent) {
  TORCH_CHECK(u.device().is_cpu() && u.dim() == 2 && u.is_contiguous(), "u must be a contiguous [B, H] CPU tensor");
  TORCH_CHECK(u.scalar_type() == torch::kFloat32 || u.scalar_type() == torch::kBFloat16, "u must be fp32 or bf16");
  for (const auto& tensor : per_latent)
    TORCH_CHECK(tensor.scalar_type() == torch::kFloat32 && tensor.is_contiguous() && tensor.numel() == u.size(1),
                "per-latent parameters must be contiguous fp32 [H]");
}

}  // namespace

// (codes, gate codes, gate codes' per-latent L1)
std::vector<torch::Tensor> chain_forward(torch::Tensor u, torch::Tensor b_gate, torch::Tensor rescale,
                                         torch::Tensor b_mag, torch::Tensor theta_pos, torch::Tensor theta_neg,
                                         bool sign_consistency, bool soft) {
  check_inputs(u, {b_gate, rescale, b_mag, theta_pos, theta_neg});
  Latents p = latents(b_gate, rescale, b_mag, theta_pos, theta_neg);
  if (u.scalar_type() == torch::kBFloat16) return forward_typed<uint16_t>(u, p, sign_consistency, soft);
  return forward_typed<float>(u, p, sign_consistency, soft);
}

// (u's gradient, then per latent: Σ gate gradient, Σ kept code gradient, Σ kept gradient · code, and the θ⁺ and θ⁻
// sides' sums, over the open gate (soft) or the kernel's band (BiJump), before θ's factors)
std::vector<torch::Tensor> chain_backward(torch::Tensor grad_codes, torch::Tensor grad_gate_codes,
                                          torch::Tensor grad_l1, torch::Tensor u, torch::Tensor b_gate,
                                          torch::Tensor rescale, torch::Tensor b_mag, torch::Tensor theta_pos,
                                          torch::Tensor theta_neg, double bandwidth, bool sign_consistency,
                                          bool soft) {
  check_inputs(u, {b_gate, rescale, b_mag, theta_pos, theta_neg, grad_l1});
  for (const auto& grad : {grad_codes, grad_gate_codes})
    TORCH_CHECK(grad.sizes() == u.sizes() && grad.scalar_type() == u.scalar_type() && grad.is_contiguous(),
                "the codes' gradients must be contiguous and shaped and typed as u");
  Latents p = latents(b_gate, rescale, b_mag, theta_pos, theta_neg);
  if (u.scalar_type() == torch::kBFloat16)
    return backward_typed<uint16_t>(grad_codes, grad_gate_codes, grad_l1, u, p, bandwidth, sign_consistency, soft);
  return backward_typed<float>(grad_codes, grad_gate_codes, grad_l1, u, p, bandwidth, sign_consistency, soft);
}
