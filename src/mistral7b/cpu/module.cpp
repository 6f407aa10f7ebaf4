// The Python module of the CPU extension: one build per CPU capability (build.py), loaded by mistral7b.cpu.
#include <torch/extension.h>

#include "ops.h"
#include "threads.h"

namespace {

#define STRINGIFY_(x) #x
#define STRINGIFY(x) STRINGIFY_(x)

at::Tensor int4_dequantize_py(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& mins,
                              py::object dtype) {
  const auto type = torch::python::detail::py_object_to_dtype(std::move(dtype));
  py::gil_scoped_release release;
  return mistral7b::int4_dequantize(qweight, scales, mins, type);
}

}  // namespace

// The ops run without the GIL (they touch no Python object): the server's HTTP thread runs while the engine's
// computes, and Python threads can call them at once (the pool runs a second caller's job inline).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace mistral7b;
  using nogil = py::call_guard<py::gil_scoped_release>;
  m.attr("CAPABILITY") = STRINGIFY(CPU_CAPABILITY);  // the ATen CPU capability this build is for
  m.attr("EXACT_BF16_ATTENTION") = decode_attention_exact_bf16();
  m.def("decode_attention", &decode_attention, nogil(),
        "one-query paged attention read in place: float32 pools, or bf16 with the PyTorch path's bits (AVX-512)");
  m.def("add_rms_norm", &add_rms_norm, nogil(),
        "(x + delta, RMSNorm(x + delta)) of float32 or bf16 rows, F.rms_norm's bits", py::arg("x"),
        py::arg("delta"), py::arg("weight"), py::arg("eps"));
  m.def("rotate_store", &rotate_store, nogil(), "RoPE of q and k (apply_rotary's bits), k and v stored in their slots");
  m.def("silu_mul", &silu_mul, nogil(), "silu(gate) * up of the fused w13 output, F.silu(gate) * up's bits");
  m.def("argmax_rows", &argmax_rows, nogil(), "torch.argmax(logits, -1) of float32 rows (NaN first), vectorised");
  m.def("masked_logits", &masked_logits, nogil(),
        "x where the packed bitmask [rows, ceil(vocab / 32)] int32 allows (bit j of word w: id 32 w + j), else -inf; "
        "a new tensor", py::arg("x"), py::arg("mask"));
  m.def("top_p_threshold", &top_p_threshold, nogil(),
        "per row of float32 probabilities, the largest value t with sum(probs[probs >= t]) >= top_p, by a radix "
        "select (no sort)", py::arg("probs"), py::arg("top_p"));
  m.def("draw_above", &draw_above, nogil(),
        "per row, a draw among the values >= limit, each with probability value / their sum, from u in [0, 1): "
        "the kept value where their running sum in vocabulary order first exceeds u * sum; -1 for a row that keeps "
        "no positive value",
        py::arg("probs"), py::arg("limit"), py::arg("u"));
  m.def("penalize", &penalize, nogil(),
        "rows x with the repetition (divide positive, multiply negative), presence and frequency penalties of "
        "their slots' output counts and prompt marks: engine/sampler.py's ops, the same bits, in one pass",
        py::arg("x"), py::arg("counts"), py::arg("seen"), py::arg("slots"), py::arg("repetition"),
        py::arg("presence"), py::arg("frequency"));
  m.def("int4_linear", &int4_linear, nogil(),
        "x @ w.T for int4 weights (q * scale + min per group), x as int16 per 32", py::arg("x"),
        py::arg("qweight"), py::arg("scales"), py::arg("mins"));
  m.def("int4_dequantize", &int4_dequantize_py, "the float weights of int4_linear's layout", py::arg("qweight"),
        py::arg("scales"), py::arg("mins"), py::arg("dtype"));
  m.def("int8_linear", &int8_linear, nogil(),
        "x @ (q * scale).T for int8 weights with a float16 scale per block of 32 (GGUF Q8_0)", py::arg("x"),
        py::arg("weight"), py::arg("scales"));
  py::class_<DecodeStack>(m, "DecodeStack", "a decode step's transformer blocks in one call (blocks.cpp)")
      .def(py::init<const std::vector<std::vector<at::Tensor>>&, const std::vector<std::vector<int64_t>>&, int64_t,
                    int64_t, int64_t, double, std::vector<int64_t>>(),
           py::arg("tensors"), py::arg("kinds"), py::arg("n_heads"), py::arg("n_kv_heads"), py::arg("head_dim"),
           py::arg("eps"), py::arg("dense_rows"))
      .def("forward", &DecodeStack::forward, nogil(), py::arg("h"), py::arg("k_caches"), py::arg("v_caches"),
           py::arg("freqs"), py::arg("slots"), py::arg("block_tables"), py::arg("first_blocks"),
           py::arg("seq_lens"), py::arg("window"));
  m.def("set_threads", &set_threads, "the thread pool's threads (0: follow torch.set_num_threads)", py::arg("n"));
}
