// The zip container: end-of-central-directory (with ZIP64), central directory, local headers.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "npz_error.h"

namespace vitcore {

constexpr uint16_t kZipStored = 0;
constexpr uint16_t kZipDeflated = 8;

// One member as the central directory describes it (ZIP64 extra fields already applied).
struct ZipMember {
  std::string name;
  uint16_t flags = 0;
  uint16_t method = 0;
  uint32_t crc32 = 0;
  uint64_t compressed_size = 0;
  uint64_t size = 0;  // uncompressed
  uint64_t local_header_offset = 0;
};

// Reads the central directory of the zip archive in [data, data + file_size). Every offset and
// length is checked against the file before it is followed; a bad one throws NpzFailure.
std::vector<ZipMember> read_central_directory(const uint8_t* data, uint64_t file_size, const Where& where);

// Offset of the member's data, taken from its *local* header: numpy's savez writes local ZIP64
// extra fields that the central directory lacks, so the two extra lengths differ. Also checks
// that the local header matches the central entry and that the data lies inside the file.
uint64_t member_data_offset(const uint8_t* data, uint64_t file_size, const ZipMember& member, const Where& where);

}  // namespace vitcore
