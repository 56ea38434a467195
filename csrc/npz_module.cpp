// PLACEHOLDER: replaced by the npz reader (foundation issue).
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.doc() = "vitcore native extension"; }
