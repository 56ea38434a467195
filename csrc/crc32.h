// CRC-32 (the zip polynomial) over large buffers.
#pragma once

#include <cstdint>

namespace vitcore {

// crc32 of [p, p + n) continuing from `crc` (0 to start), as zlib's crc32() computes it.
uint32_t crc32_update(uint32_t crc, const uint8_t* p, uint64_t n);

// CRC of A followed by B, given crc(A), crc(B) and B's length (chunks CRC'd in parallel).
uint32_t crc32_concat(uint32_t crc_a, uint32_t crc_b, uint64_t len_b);

}  // namespace vitcore
