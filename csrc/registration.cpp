// Every op's schema, in one place. Kernels are registered per device next to each family's
// op file (losses/losses_op.cpp); autograd and fake kernels in python/fastloss/ops/.
#include <torch/library.h>

TORCH_LIBRARY(fastloss, m) {
  // Row losses over logits [N, C] with targets [N]. The forward returns the weighted loss of
  // each row (float32 [N], 0 for ignored rows) and two float32 [N] statistics its backward
  // reuses; the backward takes d(total)/d(row loss) and returns d(total)/d(logits).
  m.def("cross_entropy_forward(Tensor logits, Tensor target, Tensor? weight, int ignore_index, "
        "float label_smoothing, float lse_square_scale, float softcap) -> (Tensor, Tensor, Tensor)");
  m.def("cross_entropy_backward(Tensor grad_loss, Tensor logits, Tensor target, Tensor? weight, "
        "Tensor stat0, Tensor stat1, int ignore_index, float label_smoothing, "
        "float lse_square_scale, float softcap) -> Tensor");
  m.def("comp_sum_forward(Tensor logits, Tensor target, Tensor? weight, int ignore_index, "
        "float tau) -> (Tensor, Tensor, Tensor)");
  m.def("comp_sum_backward(Tensor grad_loss, Tensor logits, Tensor target, Tensor? weight, "
        "Tensor stat0, Tensor stat1, int ignore_index, float tau) -> Tensor");
  m.def("ldr_forward(Tensor logits, Tensor target, Tensor? weight, int ignore_index, float lam, "
        "float margin, bool adaptive, float alpha) -> (Tensor, Tensor, Tensor)");
  m.def("ldr_backward(Tensor grad_loss, Tensor logits, Tensor target, Tensor? weight, "
        "Tensor stat0, Tensor stat1, int ignore_index, float lam, float margin, bool adaptive, "
        "float alpha) -> Tensor");
  m.def("spherical_z_forward(Tensor logits, Tensor target, Tensor? weight, int ignore_index, "
        "float a, float b, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("spherical_z_backward(Tensor grad_loss, Tensor logits, Tensor target, Tensor? weight, "
        "Tensor stat0, Tensor stat1, int ignore_index, float a, float b, float eps) -> Tensor");
  m.def("stablemax_forward(Tensor logits, Tensor target, Tensor? weight, int ignore_index) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("stablemax_backward(Tensor grad_loss, Tensor logits, Tensor target, Tensor? weight, "
        "Tensor stat0, Tensor stat1, int ignore_index) -> Tensor");
}
