// The functions moonfast's CPU extension exposes to Python (bound in bindings.cpp). Each takes and returns CPU tensors;
// "channels-last" means a 4-d tensor whose memory is N, H, W, C. Shapes and dtypes are checked with TORCH_CHECK.
#pragma once
#include <ATen/core/Tensor.h>
#include <optional>
#include <vector>

// maxpool.cpp: stride-1 k×k max pool with padding p; forward returns (y, window positions as uint8)
std::vector<at::Tensor> maxpool_forward(const at::Tensor& x, int64_t k, int64_t p);
at::Tensor maxpool_backward(const at::Tensor& gy, const at::Tensor& ix, int64_t H, int64_t W, int64_t k, int64_t p);
// and the k×k pool with stride k, no padding (windows that do not overlap)
std::vector<at::Tensor> maxpool_strided_forward(const at::Tensor& x, int64_t k);
at::Tensor maxpool_strided_backward(const at::Tensor& gy, const at::Tensor& ix, int64_t H, int64_t W, int64_t k);

// batchnorm.cpp: training-mode batch norm (+ ReLU) and batch norm + residual + ReLU, per-column constants a, b, mu
std::vector<at::Tensor> bn_stats(const at::Tensor& x);
at::Tensor bn_apply(const at::Tensor& x, const at::Tensor& a, const at::Tensor& b, bool relu);
std::vector<at::Tensor> bn_grad_sums(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
                                     const at::Tensor& mu, bool relu);
at::Tensor bn_grad_input(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
                         const at::Tensor& ga, const at::Tensor& gb, const at::Tensor& gc, bool relu);
at::Tensor bn_add_relu_apply(const at::Tensor& x, const at::Tensor& r, const at::Tensor& a, const at::Tensor& b);
std::vector<at::Tensor> bn_add_relu_grad_sums(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& y, const at::Tensor& mu);
std::vector<at::Tensor> bn_add_relu_grad_input(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& y,
                                               const at::Tensor& ga, const at::Tensor& gb, const at::Tensor& gc);
// the whole forward / backward of a training-mode batch norm (+ ReLU, + residual) in one call each
std::vector<at::Tensor> bn_forward(const at::Tensor& x, const c10::optional<at::Tensor>& r, const c10::optional<at::Tensor>& weight,
                                   const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
                                   const c10::optional<at::Tensor>& running_var, double momentum, double eps, bool relu);
std::vector<at::Tensor> bn_backward(const at::Tensor& dy, const at::Tensor& x, const c10::optional<at::Tensor>& y,
                                    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                                    const at::Tensor& mean, const at::Tensor& invstd, bool relu,
                                    bool need_dx, bool need_dw, bool need_db);

// upcat.cpp: a 2×2 stride-2 transposed conv's products placed on the doubled grid, + bias, beside a skip
at::Tensor upcat_forward(const at::Tensor& z, const at::Tensor& bias, const at::Tensor& skip);
std::vector<at::Tensor> upcat_backward(const at::Tensor& g, int64_t Co);

// conv3.cpp: 3×3 convolution, stride 1, padding 1, of channels-last float32 tensors, vectorised along image rows
int64_t conv3_lanes();
at::Tensor conv3_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b);
at::Tensor conv3_backward_input(const at::Tensor& dy, const at::Tensor& w);
std::vector<at::Tensor> conv3_backward_weight(const at::Tensor& dy, const at::Tensor& x, bool bias);
// and the K×K one (K = 3, 5, 7) with stride 2 and padding K/2: output and weight (+ bias) gradients
at::Tensor convs2_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b);
std::vector<at::Tensor> convs2_backward_weight(const at::Tensor& dy, const at::Tensor& x, int64_t K, bool bias);
// conv3_bf16.cpp: the 3×3 stride-1 convolution's weight (and bias) gradient (fp32) from bf16 channels-last tensors, AVX-512 BF16 only
bool conv3_bf16_available();
std::vector<at::Tensor> conv3_bf16_backward_weight(const at::Tensor& dy, const at::Tensor& x, bool bias);
// and its output (bf16; b: empty for none) and input gradient (bf16), for an even number of channels computed
at::Tensor conv3_bf16_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b);
at::Tensor conv3_bf16_backward_input(const at::Tensor& dy, const at::Tensor& w);
// and the ResNet stem's forward: 7×7, stride 2, padding 3, 3 input channels, at most 24 output channels (b: empty for none)
at::Tensor stem_bf16_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b);
// and the K×K (K odd, at most 7) stride-2 padding-K/2 convolution's weight (and bias) gradient, fp32 (the stem's included)
std::vector<at::Tensor> convs2_bf16_backward_weight(const at::Tensor& dy, const at::Tensor& x, int64_t K, bool bias);
// winograd.cpp: Winograd F(2×2, 3×3) transforms for the 3×3 stride-1 padding-1 convolution of channels-last tensors, bf16
// (AVX-512 BF16 only) and fp32 (any build); the 16 tile products between them are torch.bmm's: input tiles Bᵀ d B, output
// tiles Aᵀ M A (+ bias), the output transform's adjoint A dy Aᵀ, the weight's G w Gᵀ (flip: for the input gradient; bf16
// or fp32) and its gradient Gᵀ dU G
bool winograd_bf16_available();
at::Tensor winograd_bf16_input(const at::Tensor& x);
at::Tensor winograd_bf16_output(const at::Tensor& m, const at::Tensor& bias, int64_t N, int64_t H, int64_t W);
at::Tensor winograd_bf16_adjoint(const at::Tensor& dy);
at::Tensor winograd_f32_input(const at::Tensor& x);
at::Tensor winograd_f32_output(const at::Tensor& m, const at::Tensor& bias, int64_t N, int64_t H, int64_t W);
at::Tensor winograd_f32_adjoint(const at::Tensor& dy);
at::Tensor winograd_weight(const at::Tensor& w, bool flip, bool bf16);
at::Tensor winograd_weight_grad(const at::Tensor& du);

// affine_grid.cpp: the sampling grid of a batch of 3×3 (affine or perspective) maps, and the resampling through it in one
// pass (bilinear or nearest; padding 0 zeros, 1 border, 2 reflection)
at::Tensor affine_grid(const at::Tensor& m, const at::Tensor& us, const at::Tensor& vs);
at::Tensor affine_sample(const at::Tensor& x, const at::Tensor& m, const at::Tensor& us, const at::Tensor& vs, bool nearest,
                         int64_t pad, bool align_corners);
