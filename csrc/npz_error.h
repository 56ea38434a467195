// Error types of the npz reader. The module's exception translator turns NpzFailure into
// vitcore.errors.NpzError and OsFailure into OSError (FileNotFoundError, PermissionError...).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace vitcore {

// Bad or unsupported input. The message already names the file and the member.
class NpzFailure : public std::runtime_error {
 public:
  explicit NpzFailure(const std::string& msg) : std::runtime_error(msg) {}
};

// The operating system refused to open or map the file; `code` is the errno.
class OsFailure : public std::runtime_error {
 public:
  OsFailure(int code, std::string path) : std::runtime_error(path), code(code), path(std::move(path)) {}
  int code;
  std::string path;
};

// Where an error happened: the file, and the member when there is one.
struct Where {
  const std::string& file;
  const std::string* member = nullptr;

  Where with(const std::string& m) const { return Where{file, &m}; }
};

// File bytes quoted in a message, with anything but printable ASCII escaped as \xNN: damaged
// headers must not make the message itself undecodable.
inline std::string printable(const std::string& raw) {
  static const char digits[] = "0123456789abcdef";
  std::string out;
  for (unsigned char c : raw) {
    if (c >= 0x20 && c < 0x7f) {
      out += static_cast<char>(c);
    } else {
      out += "\\x";
      out += digits[c >> 4];
      out += digits[c & 15];
    }
  }
  return out;
}

[[noreturn]] inline void fail(const Where& where, const std::string& what) {
  std::string msg = where.file;
  if (where.member != nullptr) msg += ": member '" + *where.member + "'";
  throw NpzFailure(msg + ": " + what);
}

// NPZ_CHECK(where, cond, "message " + std::to_string(x)): throws NpzFailure when cond is false.
// A macro so that the message is only built on failure.
#define NPZ_CHECK(where, cond, msg) \
  do {                              \
    if (!(cond)) ::vitcore::fail((where), (msg)); \
  } while (0)

// Little-endian field readers: zip and npy headers are little-endian whatever the host.
inline uint16_t read_le16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }
inline uint32_t read_le32(const uint8_t* p) {
  return static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8) | (static_cast<uint32_t>(p[2]) << 16) |
         (static_cast<uint32_t>(p[3]) << 24);
}
inline uint64_t read_le64(const uint8_t* p) {
  return static_cast<uint64_t>(read_le32(p)) | (static_cast<uint64_t>(read_le32(p + 4)) << 32);
}

}  // namespace vitcore
