// The Python module of the CPU extension: one build per CPU capability (build.py), loaded by mistral7b.cpu.
#include <torch/extension.h>

#include "ops.h"

namespace {

#define STRINGIFY_(x) #x
#define STRINGIFY(x) STRINGIFY_(x)

at::Tensor int4_dequantize_py(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& mins,
                              py::object dtype) {
  return mistral7b::int4_dequantize(qweight, scales, mins,
                                    torch::python::detail::py_object_to_dtype(std::move(dtype)));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace mistral7b;
  m.attr("CAPABILITY") = STRINGIFY(CPU_CAPABILITY);  // the ATen CPU capability this build is for
  m.attr("EXACT_BF16_ATTENTION") = decode_attention_exact_bf16();
  m.def("decode_attention", &decode_attention,
        "one-query paged attention read in place: float32 pools, or bf16 with the PyTorch path's bits (AVX-512)");
  m.def("add_rms_norm", &add_rms_norm, "(x + delta, RMSNorm(x + delta)) of float32 or bf16 rows, F.rms_norm's bits",
        py::arg("x"), py::arg("delta"), py::arg("weight"), py::arg("eps"));
  m.def("rotate_store", &rotate_store, "RoPE of q and k (apply_rotary's bits), k and v stored in their slots");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of the fused w13 output, F.silu(gate) * up's bits");
  m.def("int4_linear", &int4_linear, "x @ w.T for int4 weights (q * scale + min per group), x as int16 per 32",
        py::arg("x"), py::arg("qweight"), py::arg("scales"), py::arg("mins"));
  m.def("int4_dequantize", &int4_dequantize_py, "the float weights of int4_linear's layout",
        py::arg("qweight"), py::arg("scales"), py::arg("mins"), py::arg("dtype"));
  m.def("int8_linear", &int8_linear, "x @ (q * scale).T for int8 weights with a float16 scale per block of 32 (GGUF Q8_0)",
        py::arg("x"), py::arg("weight"), py::arg("scales"));
}
