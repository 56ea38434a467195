// A whole file mapped into memory, private and copy-on-write.
#pragma once

#include <cstdint>
#include <string>

namespace vitcore {

// Maps `path` with PROT_READ|PROT_WRITE and MAP_PRIVATE. Why writable: tensors that view the
// mapping are ordinary torch tensors, and an in-place op on them (w.mul_(2)) must not kill the
// process with SIGSEGV as a PROT_READ mapping would. With MAP_PRIVATE such a write copies that
// one page for this process only; the file on disk is never modified and untouched pages stay
// shared with the page cache. Tensors hold a shared_ptr to this object, so the mapping lives
// as long as any of them (deleting the file meanwhile is fine: the inode lives on).
class MappedFile {
 public:
  explicit MappedFile(const std::string& path);  // throws OsFailure / NpzFailure
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return data_; }
  uint8_t* writable_data() const { return data_; }  // copy-on-write, see above
  uint64_t size() const { return size_; }

 private:
  uint8_t* data_ = nullptr;
  uint64_t size_ = 0;
};

}  // namespace vitcore
