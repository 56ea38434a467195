// load_npz: the whole reader, from a path to named tensors.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "npy_header.h"

namespace vitcore {

// Reads the `.npy` members of the npz at `path` (all, or those named by `keys`, without ".npy")
// as CPU tensors, in file order (or `keys` order). Stored, aligned, native-order members view a
// private mapping of the file (see MappedFile); the others are copied or inflated. With
// `verify`, every member read is checked against its CRC-32. Runs without the GIL: call it from
// C++ or with the GIL released. Throws NpzFailure (bad input) or OsFailure (cannot open).
std::vector<std::pair<std::string, at::Tensor>> load_npz(const std::string& path,
                                                         const std::optional<std::vector<std::string>>& keys,
                                                         bool verify);

// The arrays' names (file order, as load_npz gives them) and npy headers, read without their
// data: a stored member's header straight from the mapping, a deflated member's by inflating
// only the header's bytes. Every check load_npz makes on what this reads applies (zip structure,
// local headers, compression method, header syntax, dtype, data size the header implies vs the
// zip's size); CRCs and the deflated data past the header are not checked. Runs without the GIL.
std::vector<std::pair<std::string, NpyHeader>> npz_index(const std::string& path);

}  // namespace vitcore
