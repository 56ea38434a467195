// The Python bindings: vitcore._C.load_npz and npz_index, with errors translated to vitcore's exceptions.
#include <torch/extension.h>

#include <cerrno>
#include <stdexcept>
#include <tuple>

#include "npz_error.h"
#include "npz_reader.h"

namespace py = pybind11;

namespace {

std::vector<std::pair<std::string, at::Tensor>> load_npz_py(const std::string& path,
                                                            const std::optional<std::vector<std::string>>& keys,
                                                            bool verify) {
  // Mapping, parsing, CRC and inflation touch no Python object: let other threads run.
  py::gil_scoped_release no_gil;
  return vitcore::load_npz(path, keys, verify);
}

// torch's name for each dtype parse_npy_header accepts (getattr(torch, name) is the dtype).
const char* torch_dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return "float16";
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kChar: return "int8";
    case at::kShort: return "int16";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    case at::kByte: return "uint8";
    case at::kBool: return "bool";
    default: throw std::logic_error("npz_index: unexpected dtype from the npy header parser");
  }
}

std::vector<std::tuple<std::string, std::vector<int64_t>, std::string>> npz_index_py(const std::string& path) {
  std::vector<std::pair<std::string, vitcore::NpyHeader>> headers;
  {
    py::gil_scoped_release no_gil;
    headers = vitcore::npz_index(path);
  }
  std::vector<std::tuple<std::string, std::vector<int64_t>, std::string>> out;
  out.reserve(headers.size());
  for (auto& [key, h] : headers) out.emplace_back(std::move(key), std::move(h.shape), torch_dtype_name(h.dtype));
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "vitcore native extension: the npz/zip/npy checkpoint reader";
  m.def("load_npz", &load_npz_py, py::arg("path"), py::arg("keys") = py::none(), py::arg("verify") = true,
        "Read the arrays of an .npz as (key, tensor) pairs; see vitcore.load_npz.");
  m.def("npz_index", &npz_index_py, py::arg("path"),
        "(key, shape, dtype name) of each array of an .npz, from the npy headers only; see vitcore.npz.npz_index.");

  // Registered after torch's own translators, so tried first; other exceptions fall through.
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const vitcore::NpzFailure& e) {
      // Imported at raise time (not at module init) so that _C does not import vitcore.
      PyObject* cls = PyExc_ValueError;
      py::object npz_error;
      try {
        npz_error = py::module_::import("vitcore.errors").attr("NpzError");
        cls = npz_error.ptr();
      } catch (const py::error_already_set&) {
      }
      // Messages quote names (valid UTF-8) and escaped header bytes; decode defensively anyway.
      const std::string msg = e.what();
      py::object text = py::reinterpret_steal<py::object>(
          PyUnicode_DecodeUTF8(msg.data(), static_cast<Py_ssize_t>(msg.size()), "backslashreplace"));
      if (text) {
        PyErr_SetObject(cls, text.ptr());
      } else {
        PyErr_Clear();
        PyErr_SetString(cls, "load_npz failed (undecodable message)");
      }
    } catch (const vitcore::OsFailure& e) {
      errno = e.code;
      PyErr_SetFromErrnoWithFilename(PyExc_OSError, e.path.c_str());
    }
  });
}
