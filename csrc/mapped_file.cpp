// Opening and mapping the checkpoint file (POSIX).
#include "mapped_file.h"

#include <cerrno>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "npz_error.h"

namespace vitcore {

namespace {
// Closes the descriptor on every path: the mapping does not need it once made.
struct FdGuard {
  int fd;
  ~FdGuard() {
    if (fd >= 0) ::close(fd);
  }
};
}  // namespace

MappedFile::MappedFile(const std::string& path) {
  FdGuard fd{::open(path.c_str(), O_RDONLY | O_CLOEXEC)};
  if (fd.fd < 0) throw OsFailure(errno, path);
  struct stat st {};
  if (::fstat(fd.fd, &st) != 0) throw OsFailure(errno, path);
  const Where where{path};
  NPZ_CHECK(where, S_ISREG(st.st_mode), "not a regular file");
  NPZ_CHECK(where, st.st_size > 0, "not a zip file: the file is empty");
  size_ = static_cast<uint64_t>(st.st_size);
  void* p = ::mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd.fd, 0);
  if (p == MAP_FAILED) throw OsFailure(errno, path);
  data_ = static_cast<uint8_t*>(p);
}

MappedFile::~MappedFile() {
  if (data_ != nullptr) ::munmap(data_, size_);
}

}  // namespace vitcore
