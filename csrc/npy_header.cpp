// .npy header parsing (numpy's format.py documents the layout; NEP 1).
#include "npy_header.h"

#include <cstring>
#include <string>

namespace vitcore {

namespace {

constexpr uint8_t kMagic[6] = {0x93, 'N', 'U', 'M', 'P', 'Y'};
constexpr bool kLittleEndianHost = __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__;

// A recursive-descent reader for the Python literal subset numpy writes.
class DictParser {
 public:
  DictParser(const char* begin, const char* end, const Where& where) : p_(begin), end_(end), where_(where) {}

  NpyHeader parse() {
    NpyHeader h;
    bool seen_descr = false, seen_fortran = false, seen_shape = false;
    expect('{');
    while (true) {
      skip_space();
      if (peek() == '}') break;
      const std::string key = string_literal();
      expect(':');
      skip_space();
      if (key == "descr") {
        NPZ_CHECK(where_, !seen_descr, "npy header repeats 'descr'");
        seen_descr = true;
        NPZ_CHECK(where_, peek() == '\'' || peek() == '"',
                  "npy header's descr is not a string: structured dtypes are not supported");
        set_dtype(h, string_literal());
      } else if (key == "fortran_order") {
        NPZ_CHECK(where_, !seen_fortran, "npy header repeats 'fortran_order'");
        seen_fortran = true;
        h.fortran_order = boolean();
      } else if (key == "shape") {
        NPZ_CHECK(where_, !seen_shape, "npy header repeats 'shape'");
        seen_shape = true;
        h.shape = tuple();
      } else {
        fail(where_, "npy header has an unexpected key '" + printable(key) + "'");
      }
      skip_space();
      if (peek() == ',') {
        ++p_;
        continue;
      }
      NPZ_CHECK(where_, peek() == '}', "npy header: expected ',' or '}' at '" + rest() + "'");
    }
    ++p_;
    // numpy pads with spaces and ends with '\n'; anything else after the dict is damage.
    skip_space();
    NPZ_CHECK(where_, p_ == end_, "npy header has junk after its dict: '" + rest() + "'");
    NPZ_CHECK(where_, seen_descr && seen_fortran && seen_shape,
              "npy header lacks one of 'descr', 'fortran_order', 'shape'");
    return h;
  }

 private:
  char peek() const { return p_ < end_ ? *p_ : '\0'; }
  std::string rest() const { return printable(std::string(p_, std::min<size_t>(end_ - p_, 40))); }
  void skip_space() {
    while (p_ < end_ && (*p_ == ' ' || *p_ == '\n' || *p_ == '\t' || *p_ == '\r')) ++p_;
  }
  void expect(char c) {
    skip_space();
    NPZ_CHECK(where_, peek() == c, std::string("npy header: expected '") + c + "' at '" + rest() + "'");
    ++p_;
  }
  std::string string_literal() {
    skip_space();
    const char quote = peek();
    NPZ_CHECK(where_, quote == '\'' || quote == '"', "npy header: expected a string at '" + rest() + "'");
    const char* start = ++p_;
    while (p_ < end_ && *p_ != quote) {
      NPZ_CHECK(where_, *p_ != '\\', "npy header: escapes in strings are not supported");
      ++p_;
    }
    NPZ_CHECK(where_, p_ < end_, "npy header: unterminated string");
    return std::string(start, p_++);
  }
  bool boolean() {
    auto word = [&](const char* w) {
      const size_t n = std::strlen(w);
      if (static_cast<size_t>(end_ - p_) >= n && std::memcmp(p_, w, n) == 0) {
        p_ += n;
        return true;
      }
      return false;
    };
    if (word("True")) return true;
    if (word("False")) return false;
    fail(where_, "npy header: fortran_order is not True or False at '" + rest() + "'");
  }
  int64_t integer() {
    skip_space();
    NPZ_CHECK(where_, peek() >= '0' && peek() <= '9', "npy header: expected a dimension at '" + rest() + "'");
    int64_t v = 0;
    while (peek() >= '0' && peek() <= '9') {
      NPZ_CHECK(where_, !__builtin_mul_overflow(v, 10, &v) && !__builtin_add_overflow(v, *p_ - '0', &v),
                "npy header: a dimension overflows 64 bits");
      ++p_;
    }
    if (peek() == 'L') ++p_;  // Python 2 longs, as files written by numpy on Python 2 have
    return v;
  }
  std::vector<int64_t> tuple() {
    std::vector<int64_t> dims;
    bool comma = false;
    expect('(');
    while (true) {
      skip_space();
      if (peek() == ')') break;
      NPZ_CHECK(where_, dims.size() < 64, "npy header: more than 64 dimensions");
      dims.push_back(integer());
      skip_space();
      comma = peek() == ',';
      if (comma) {
        ++p_;
        continue;
      }
      NPZ_CHECK(where_, peek() == ')', "npy header: expected ',' or ')' in shape at '" + rest() + "'");
    }
    ++p_;
    // In Python "(3)" is the integer 3, not a shape: numpy refuses it, and so do we.
    NPZ_CHECK(where_, dims.size() != 1 || comma, "npy header: shape (" + std::to_string(dims[0]) + ") is not a tuple");
    return dims;
  }

  void set_dtype(NpyHeader& h, const std::string& descr) {
    const std::string supported = " (supported: f2 f4 f8 i1 i2 i4 i8 u1 b1, any byte order)";
    std::string body = descr;
    char order = '|';
    if (!body.empty() && std::strchr("<>|=", body[0]) != nullptr) {
      order = body[0];
      body.erase(0, 1);
    }
    NPZ_CHECK(where_, body.empty() || body[0] != 'O',
              "object arrays are pickles, which load_npz refuses to execute (descr '" + printable(descr) +
                  "'); re-save the array with a numeric dtype");
    struct Known {
      const char* code;
      at::ScalarType type;
    };
    static const Known known[] = {{"f2", at::kHalf},  {"f4", at::kFloat}, {"f8", at::kDouble}, {"i1", at::kChar},
                                  {"i2", at::kShort}, {"i4", at::kInt},   {"i8", at::kLong},   {"u1", at::kByte},
                                  {"b1", at::kBool}};
    for (const Known& k : known) {
      if (body == k.code) {
        h.dtype = k.type;
        h.itemsize = body[1] - '0';
        // '=' and '|' mean native order; only an explicit opposite order needs swapping.
        const char foreign = kLittleEndianHost ? '>' : '<';
        h.byteswap = h.itemsize > 1 && order == foreign;
        return;
      }
    }
    fail(where_, "unsupported dtype '" + printable(descr) + "'" + supported);
  }

  const char* p_;
  const char* end_;
  const Where& where_;
};

}  // namespace

uint64_t npy_header_size(const uint8_t* p, uint64_t avail, uint64_t member_size, const Where& where) {
  NPZ_CHECK(where, avail >= 10, "npy data is " + std::to_string(avail) + " bytes, too short for an npy header");
  NPZ_CHECK(where, std::memcmp(p, kMagic, sizeof kMagic) == 0, "not an npy array: bad magic (corrupt?)");
  const int major = p[6], minor = p[7];
  NPZ_CHECK(where, (major >= 1 && major <= 3) && minor == 0,
            "unsupported npy format version " + std::to_string(major) + "." + std::to_string(minor) +
                " (supported: 1.0, 2.0, 3.0)");
  uint64_t size;
  if (major == 1) {
    size = 10 + static_cast<uint64_t>(read_le16(p + 8));
  } else {
    NPZ_CHECK(where, avail >= 12, "npy data is too short for a version 2/3 header");
    size = 12 + static_cast<uint64_t>(read_le32(p + 8));
  }
  NPZ_CHECK(where, size <= member_size,
            "npy header claims " + std::to_string(size) + " bytes but the member holds " + std::to_string(member_size));
  NPZ_CHECK(where, size <= kMaxNpyHeader, "npy header of " + std::to_string(size) + " bytes is implausibly large");
  return size;
}

NpyHeader parse_npy_header(const uint8_t* p, uint64_t avail, const Where& where) {
  const uint64_t size = npy_header_size(p, avail, avail, where);
  const uint64_t dict_start = p[6] == 1 ? 10 : 12;
  const char* begin = reinterpret_cast<const char*>(p + dict_start);
  NpyHeader h = DictParser(begin, begin + (size - dict_start), where).parse();
  h.header_size = size;
  uint64_t count = 1;
  for (int64_t d : h.shape) {
    NPZ_CHECK(where, !__builtin_mul_overflow(count, static_cast<uint64_t>(d), &count) && count <= (1ull << 62),
              "npy shape's element count overflows");
  }
  NPZ_CHECK(where, !__builtin_mul_overflow(count, static_cast<uint64_t>(h.itemsize), &h.nbytes) &&
                       h.nbytes <= (1ull << 62),
            "npy shape's byte count overflows");
  return h;
}

std::vector<int64_t> npy_strides(const NpyHeader& h) {
  const size_t n = h.shape.size();
  std::vector<int64_t> strides(n, 1);
  if (h.fortran_order) {
    for (size_t i = 1; i < n; ++i) strides[i] = strides[i - 1] * std::max<int64_t>(h.shape[i - 1], 1);
  } else {
    for (size_t i = n; i-- > 1;) strides[i - 1] = strides[i] * std::max<int64_t>(h.shape[i], 1);
  }
  return strides;
}

}  // namespace vitcore
