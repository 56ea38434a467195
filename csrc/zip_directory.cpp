// Zip parsing per PKWARE's APPNOTE (sections 4.3.7 local header, 4.3.12 central directory,
// 4.3.14-16 ZIP64 end records and end of central directory, 4.5.3 ZIP64 extra field).
#include "zip_directory.h"

#include <cstring>

namespace vitcore {

namespace {

constexpr uint32_t kLocalSig = 0x04034b50;
constexpr uint32_t kCentralSig = 0x02014b50;
constexpr uint32_t kEndSig = 0x06054b50;
constexpr uint32_t kZip64EndSig = 0x06064b50;
constexpr uint32_t kZip64LocatorSig = 0x07064b50;
constexpr uint64_t kLocalFixed = 30;
constexpr uint64_t kCentralFixed = 46;
constexpr uint64_t kEndFixed = 22;
constexpr uint64_t kZip64EndFixed = 56;
constexpr uint64_t kZip64LocatorSize = 20;
constexpr uint64_t kMaxComment = 0xFFFF;

// `[offset, offset + length)` lies inside `[0, limit)`, without overflow.
bool fits(uint64_t offset, uint64_t length, uint64_t limit) { return offset <= limit && length <= limit - offset; }

std::string hex(uint64_t v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

// Strict UTF-8 (no overlongs, surrogates or code points past U+10FFFF): names become Python str,
// and zipfile writes non-ASCII names as UTF-8, so anything else is damage.
bool valid_utf8(const std::string& s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const auto* end = p + s.size();
  while (p < end) {
    const unsigned c = *p++;
    if (c < 0x80) continue;
    int more;
    unsigned cp;
    if (c >= 0xC2 && c <= 0xDF) {
      more = 1;
      cp = c & 0x1F;
    } else if (c >= 0xE0 && c <= 0xEF) {
      more = 2;
      cp = c & 0x0F;
    } else if (c >= 0xF0 && c <= 0xF4) {
      more = 3;
      cp = c & 0x07;
    } else {
      return false;
    }
    if (end - p < more) return false;
    for (int i = 0; i < more; ++i) {
      if ((p[i] & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (p[i] & 0x3F);
    }
    p += more;
    if ((more == 2 && cp < 0x800) || (more == 3 && cp < 0x10000) || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
      return false;
  }
  return true;
}

// The end-of-central-directory record: the last signature whose comment ends exactly at the end
// of the file; failing that (a damaged comment length), the last one whose comment fits.
uint64_t find_end_record(const uint8_t* data, uint64_t file_size, const Where& where) {
  NPZ_CHECK(where, file_size >= kEndFixed,
            "not a zip file: " + std::to_string(file_size) + " bytes is too short for an end-of-central-directory record");
  const uint64_t last = file_size - kEndFixed;
  const uint64_t first = last > kMaxComment ? last - kMaxComment : 0;
  bool have_loose = false;
  uint64_t loose = 0;
  for (uint64_t pos = last + 1; pos-- > first;) {
    if (read_le32(data + pos) != kEndSig) continue;
    const uint64_t comment = read_le16(data + pos + 20);
    if (pos + kEndFixed + comment == file_size) return pos;
    if (!have_loose && pos + kEndFixed + comment <= file_size) {
      have_loose = true;
      loose = pos;
    }
  }
  NPZ_CHECK(where, have_loose,
            "not a zip file (or truncated): no end-of-central-directory record in the last " +
                std::to_string(file_size - first) + " bytes");
  return loose;
}

struct Directory {
  uint64_t disk_entries;  // on this disk: must equal `entries` (no spanned archives)
  uint64_t entries;
  uint64_t size;
  uint64_t offset;
  uint64_t end;  // where the central directory must end (start of the end records)
};

Directory locate_directory(const uint8_t* data, uint64_t file_size, const Where& where) {
  const uint64_t eocd = find_end_record(data, file_size, where);
  const uint8_t* e = data + eocd;
  Directory dir{read_le16(e + 8), read_le16(e + 10), read_le32(e + 12), read_le32(e + 16), eocd};
  const bool has_locator = eocd >= kZip64LocatorSize && read_le32(data + eocd - kZip64LocatorSize) == kZip64LocatorSig;
  if (has_locator) {
    const uint64_t locator = eocd - kZip64LocatorSize;
    const uint64_t rec = read_le64(data + locator + 8);
    NPZ_CHECK(where, fits(rec, kZip64EndFixed, locator),
              "ZIP64 end-of-central-directory offset " + std::to_string(rec) + " is outside the file (truncated or corrupt)");
    const uint8_t* r = data + rec;
    NPZ_CHECK(where, read_le32(r) == kZip64EndSig,
              "no ZIP64 end-of-central-directory record at offset " + std::to_string(rec) + " (corrupt)");
    dir = Directory{read_le64(r + 24), read_le64(r + 32), read_le64(r + 40), read_le64(r + 48), rec};
  } else {
    NPZ_CHECK(where, dir.size != 0xFFFFFFFFu && dir.offset != 0xFFFFFFFFu,
              "the end-of-central-directory record asks for ZIP64 but there is no ZIP64 locator (corrupt)");
  }
  // Writers put the end records right after the directory (zipfile relies on it to detect
  // prepended data); holding them to it also catches a damaged count or size that would
  // otherwise describe a smaller, valid-looking directory.
  NPZ_CHECK(where, fits(dir.offset, dir.size, dir.end) && dir.offset + dir.size == dir.end,
            "central directory (offset " + std::to_string(dir.offset) + ", " + std::to_string(dir.size) +
                " bytes) does not end where the end records begin, at " + std::to_string(dir.end) +
                " (truncated, corrupt, or data prepended to the zip)");
  NPZ_CHECK(where, dir.disk_entries == dir.entries,
            "the end record counts " + std::to_string(dir.disk_entries) + " entries on this disk but " +
                std::to_string(dir.entries) + " in all (a spanned archive, or corrupt)");
  // Bounds the entry count (and so the vector below) by the directory's real size.
  NPZ_CHECK(where, dir.entries <= dir.size / kCentralFixed,
            "central directory claims " + std::to_string(dir.entries) + " entries in " + std::to_string(dir.size) +
                " bytes (corrupt)");
  return dir;
}

// Applies the ZIP64 extended-information extra field (id 1): it holds, in this order, only those
// of size / compressed size / local offset whose 32-bit central field is 0xFFFFFFFF.
void apply_zip64_extra(const uint8_t* extra, uint64_t length, ZipMember& m, bool need_size, bool need_csize,
                       bool need_offset, const Where& where) {
  uint64_t pos = 0;
  while (pos + 4 <= length) {
    const uint16_t id = read_le16(extra + pos);
    const uint64_t len = read_le16(extra + pos + 2);
    NPZ_CHECK(where, pos + 4 + len <= length, "extra field runs past the end of its central directory entry");
    if (id == 0x0001) {
      const uint8_t* f = extra + pos + 4;
      uint64_t used = 0;
      auto take = [&](uint64_t& out, const char* what) {
        NPZ_CHECK(where, used + 8 <= len, std::string("ZIP64 extra field lacks the ") + what);
        out = read_le64(f + used);
        used += 8;
      };
      if (need_size) take(m.size, "uncompressed size");
      if (need_csize) take(m.compressed_size, "compressed size");
      if (need_offset) take(m.local_header_offset, "local header offset");
      return;
    }
    pos += 4 + len;
  }
  NPZ_CHECK(where, !(need_size || need_csize || need_offset),
            "sizes or offset are 0xFFFFFFFF but there is no ZIP64 extra field (corrupt)");
}

}  // namespace

std::vector<ZipMember> read_central_directory(const uint8_t* data, uint64_t file_size, const Where& where) {
  const Directory dir = locate_directory(data, file_size, where);
  std::vector<ZipMember> members;
  members.reserve(dir.entries);
  uint64_t pos = dir.offset;
  const uint64_t end = dir.offset + dir.size;
  for (uint64_t i = 0; i < dir.entries; ++i) {
    NPZ_CHECK(where, fits(pos, kCentralFixed, end),
              "central directory entry " + std::to_string(i) + " runs past the directory's end (truncated or corrupt)");
    const uint8_t* c = data + pos;
    NPZ_CHECK(where, read_le32(c) == kCentralSig,
              "bad signature for central directory entry " + std::to_string(i) + " at offset " + std::to_string(pos));
    const uint64_t name_len = read_le16(c + 28);
    const uint64_t extra_len = read_le16(c + 30);
    const uint64_t comment_len = read_le16(c + 32);
    NPZ_CHECK(where, fits(pos + kCentralFixed, name_len + extra_len + comment_len, end),
              "central directory entry " + std::to_string(i) + "'s name or extra field runs past the directory");
    ZipMember m;
    m.name.assign(reinterpret_cast<const char*>(c + kCentralFixed), name_len);
    m.flags = read_le16(c + 8);
    m.method = read_le16(c + 10);
    m.crc32 = read_le32(c + 16);
    m.compressed_size = read_le32(c + 20);
    m.size = read_le32(c + 24);
    m.local_header_offset = read_le32(c + 42);
    NPZ_CHECK(where, valid_utf8(m.name),
              "central directory entry " + std::to_string(i) + "'s name is not valid UTF-8 (corrupt)");
    const Where at = where.with(m.name);
    apply_zip64_extra(c + kCentralFixed + name_len, extra_len, m, m.size == 0xFFFFFFFFu,
                      m.compressed_size == 0xFFFFFFFFu, m.local_header_offset == 0xFFFFFFFFu, at);
    members.push_back(std::move(m));
    pos += kCentralFixed + name_len + extra_len + comment_len;
  }
  // A damaged entry count would otherwise drop members silently.
  NPZ_CHECK(where, pos == end,
            "the central directory's " + std::to_string(dir.entries) + " entries fill " +
                std::to_string(pos - dir.offset) + " bytes, not its size " + std::to_string(dir.size) + " (corrupt)");
  return members;
}

uint64_t member_data_offset(const uint8_t* data, uint64_t file_size, const ZipMember& m, const Where& where) {
  const uint64_t lho = m.local_header_offset;
  NPZ_CHECK(where, fits(lho, kLocalFixed, file_size),
            "local header offset " + std::to_string(lho) + " is outside the file (" + std::to_string(file_size) +
                " bytes; truncated or corrupt)");
  const uint8_t* l = data + lho;
  NPZ_CHECK(where, read_le32(l) == kLocalSig, "no local header signature at offset " + std::to_string(lho) + " (corrupt)");
  const uint64_t name_len = read_le16(l + 26);
  const uint64_t extra_len = read_le16(l + 28);
  NPZ_CHECK(where, fits(lho + kLocalFixed, name_len + extra_len, file_size),
            "local header's name and extra field run past the end of the file (truncated)");
  NPZ_CHECK(where,
            name_len == m.name.size() && std::memcmp(l + kLocalFixed, m.name.data(), name_len) == 0,
            "the local header's name differs from the central directory's (corrupt)");
  const uint64_t offset = lho + kLocalFixed + name_len + extra_len;
  NPZ_CHECK(where, fits(offset, m.compressed_size, file_size),
            "data (offset " + std::to_string(offset) + ", " + std::to_string(m.compressed_size) +
                " bytes) runs past the end of the file (" + std::to_string(file_size) + " bytes; truncated?)");
  NPZ_CHECK(where, (m.flags & 0x1) == 0, "the member is encrypted (zip flags " + hex(m.flags) + ")");
  return offset;
}

}  // namespace vitcore
