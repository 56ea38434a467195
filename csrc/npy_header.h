// The .npy header: magic, version, and the dict literal {'descr', 'fortran_order', 'shape'}.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "npz_error.h"

namespace vitcore {

struct NpyHeader {
  at::ScalarType dtype = at::kFloat;
  int64_t itemsize = 4;
  bool byteswap = false;  // stored in the other byte order than this machine's
  bool fortran_order = false;
  std::vector<int64_t> shape;
  uint64_t header_size = 0;  // bytes from the member's start to its array data
  uint64_t nbytes = 0;       // bytes of array data the shape and dtype need (overflow-checked)
};

// Bytes of the fixed preamble that npy_header_size() needs: magic, version, header length.
constexpr uint64_t kNpyPreamble = 12;
// Headers larger than this are refused before anything is allocated for them (numpy writes
// tens of bytes; its own reader refuses more than 10000 unless told otherwise).
constexpr uint64_t kMaxNpyHeader = 1 << 20;

// Total header size (preamble + dict + padding) from the first `avail` bytes (at least 10),
// checked against the `member_size` bytes the member holds and against kMaxNpyHeader.
uint64_t npy_header_size(const uint8_t* p, uint64_t avail, uint64_t member_size, const Where& where);

// Parses the header at the start of [p, p + avail) (sized as by npy_header_size). Never evaluates code:
// the dict is read by a small parser that accepts only strings, booleans, integers and tuples.
NpyHeader parse_npy_header(const uint8_t* p, uint64_t avail, const Where& where);

// Row-major or column-major strides (in elements) for `shape`.
std::vector<int64_t> npy_strides(const NpyHeader& h);

}  // namespace vitcore
