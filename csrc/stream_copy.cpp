// stream_copy: AVX2 streaming stores, plain memcpy elsewhere.
#include "stream_copy.h"

#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace vitcore {

namespace {

constexpr uint64_t kStreamMin = 4096;  // below this, memcpy (and the cache) win

#if defined(__x86_64__)
__attribute__((target("avx2"))) void stream_copy_avx2(uint8_t* dst, const uint8_t* src, uint64_t n) {
  // Streaming stores need 32-byte aligned destinations: copy the ragged head normally.
  const uint64_t head = (32 - (reinterpret_cast<uintptr_t>(dst) & 31)) & 31;
  std::memcpy(dst, src, head);
  dst += head;
  src += head;
  n -= head;
  uint64_t i = 0;
  for (; i + 128 <= n; i += 128) {
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i + 32));
    const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i + 64));
    const __m256i d = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i + 96));
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i), a);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i + 32), b);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i + 64), c);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i + 96), d);
  }
  std::memcpy(dst + i, src + i, n - i);
  _mm_sfence();
}

bool have_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2");
  return ok;
}
#endif

}  // namespace

void stream_copy(uint8_t* dst, const uint8_t* src, uint64_t n) {
#if defined(__x86_64__)
  if (n >= kStreamMin && have_avx2()) return stream_copy_avx2(dst, src, n);
#endif
  std::memcpy(dst, src, n);
}

}  // namespace vitcore
