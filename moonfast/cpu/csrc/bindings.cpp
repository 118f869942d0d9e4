// The Python module of moonfast's CPU kernels (built by moonfast.cpu.build with torch.utils.cpp_extension.load).
#include <torch/python.h>   // pybind11 and its tensor casters (not <torch/extension.h>: the whole C++ frontend besides)
#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "moonfast's CPU kernels for channels-last tensors with few channels";
  m.def("maxpool_forward", &maxpool_forward, "stride-1 max pool: (y, window positions)");
  m.def("maxpool_backward", &maxpool_backward, "stride-1 max pool: input gradient");
  m.def("maxpool_strided_forward", &maxpool_strided_forward, "k×k max pool with stride k: (y, window positions)");
  m.def("maxpool_strided_backward", &maxpool_strided_backward, "its input gradient");
  m.def("bn_stats", &bn_stats, "batch norm: per-channel mean and biased variance (float64)");
  m.def("bn_apply", &bn_apply, "batch norm: y = relu?(x·a + b)");
  m.def("bn_grad_sums", &bn_grad_sums, "batch norm: per-channel Σg and Σg·(x − mean)");
  m.def("bn_grad_input", &bn_grad_input, "batch norm: input gradient");
  m.def("bn_add_relu_apply", &bn_add_relu_apply, "batch norm + residual + ReLU: y = relu(x·a + b + r)");
  m.def("bn_add_relu_grad_sums", &bn_add_relu_grad_sums, "batch norm + residual + ReLU: per-channel sums");
  m.def("bn_add_relu_grad_input", &bn_add_relu_grad_input, "batch norm + residual + ReLU: input and residual gradients");
  m.def("bn_forward", &bn_forward, "batch norm (+ ReLU, + residual): statistics, running statistics, output; (y, mean, invstd)");
  m.def("bn_backward", &bn_backward, "its backward: (dx, dresidual, dweight, dbias)");
  m.def("upcat_forward", &upcat_forward, "2×2 stride-2 transposed conv placement + bias + skip concatenation");
  m.def("upcat_backward", &upcat_backward, "its gradients: products, bias (float64), skip");
  m.def("conv3_lanes", &conv3_lanes, "3×3 conv: fp32 lanes a vector of this build");
  m.def("conv3_forward", &conv3_forward, "3×3 conv, stride 1, padding 1: output (channels-last)");
  m.def("conv3_backward_input", &conv3_backward_input, "its input gradient");
  m.def("conv3_backward_weight", &conv3_backward_weight, "its weight and bias gradients");
  m.def("convs2_forward", &convs2_forward, "K×K conv (K = 3, 5, 7), stride 2, padding K/2: output (channels-last)");
  m.def("convs2_backward_weight", &convs2_backward_weight, "its weight and bias gradients");
  m.def("conv3_bf16_available", &conv3_bf16_available, "whether this build has the AVX-512 BF16 kernels");
  m.def("conv3_bf16_backward_weight", &conv3_bf16_backward_weight, "3×3 conv weight and bias gradients (fp32) of bf16 tensors");
  m.def("conv3_bf16_forward", &conv3_bf16_forward, "3×3 conv, stride 1, padding 1, of bf16 tensors: output (bf16, channels-last)");
  m.def("conv3_bf16_backward_input", &conv3_bf16_backward_input, "its input gradient (bf16, channels-last)");
  m.def("stem_bf16_forward", &stem_bf16_forward, "7×7 stride-2 conv of 3 channels (a ResNet stem), bf16 in and out");
  m.def("convs2_bf16_backward_weight", &convs2_bf16_backward_weight, "K×K stride-2 conv weight and bias gradients (fp32) of bf16 tensors");
  m.def("winograd_bf16_available", &winograd_bf16_available, "whether this build has the bf16 Winograd transforms");
  m.def("winograd_bf16_input", &winograd_bf16_input, "Winograd F(2x2, 3x3): input tiles (16, tiles, C) of a bf16 channels-last x");
  m.def("winograd_bf16_output", &winograd_bf16_output, "Winograd F(2x2, 3x3): output (bf16, channels-last) from the tile products");
  m.def("winograd_bf16_adjoint", &winograd_bf16_adjoint, "Winograd F(2x2, 3x3): the output transform's adjoint of dy, (16, tiles, Co)");
  m.def("winograd_f32_input", &winograd_f32_input, "Winograd F(2x2, 3x3): input tiles (16, tiles, C) of an fp32 channels-last x");
  m.def("winograd_f32_output", &winograd_f32_output, "Winograd F(2x2, 3x3): output (fp32, channels-last) from the tile products");
  m.def("winograd_f32_adjoint", &winograd_f32_adjoint, "Winograd F(2x2, 3x3): the output transform's adjoint of an fp32 dy, (16, tiles, Co)");
  m.def("winograd_weight", &winograd_weight, "Winograd F(2x2, 3x3): weight tiles (16, C, Co), bf16 or fp32 (flip: (16, Co, C), taps reversed)");
  m.def("winograd_weight_grad", &winograd_weight_grad, "Winograd F(2x2, 3x3): weight gradient (Co, C, 3, 3) fp32 from (16, C, Co)");
  m.def("affine_grid", &affine_grid, "sampling grid of (N, 3, 3) maps");
  m.def("affine_sample", &affine_sample, "grid_sample through the grid of (N, 3, 3) maps, in one pass");
}
