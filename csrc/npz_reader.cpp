// Plans each member (view / copy / inflate), then runs the reading on a few threads.
#include "npz_reader.h"

#include <sys/mman.h>
#include <zlib.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <exception>
#include <memory>
#include <thread>
#include <unordered_map>

#include "crc32.h"
#include "mapped_file.h"
#include "npy_header.h"
#include "npz_error.h"
#include "zip_directory.h"

namespace vitcore {

namespace {

constexpr uint64_t kChunk = 4ull << 20;       // stored members are split into tasks of this size
constexpr uint64_t kSubChunk = 256ull << 10;  // CRC then copy this much while it is in cache
constexpr uint64_t kHugePage = 2ull << 20;
constexpr uint64_t kHugePageAdviceBytes = 4ull << 20;  // numpy's threshold for the same advice
constexpr uint64_t kParallelBytes = 16ull << 20;  // below this, threads cost more than they save
constexpr uint64_t kMaxDeflateRatio = 1032;       // deflate cannot expand by more (258 bytes / 2 bits)

// kCopy: fresh memory, filled by a byte-swapping copy (or empty); kView: views the mapping.
enum class Plan { kView, kCopy, kInflate };

struct Job {
  const ZipMember* member;
  std::string key;
  uint64_t offset = 0;  // of the member's data in the file
  Plan plan = Plan::kView;
  NpyHeader header;
  at::Tensor tensor;
  uint32_t crc = 0;                   // set by the inflate task
  std::vector<uint32_t> chunk_crcs;   // set by the stored-member tasks, in order
  std::vector<uint64_t> chunk_sizes;
};

struct Task {
  size_t job;
  size_t chunk;
  uint64_t begin, end;  // member-relative byte range (stored members)
};

// Allocates the tensor a copy or an inflation fills. Like numpy for its own large arrays, advise
// transparent huge pages on the 2 MiB-aligned interior of big buffers: on VMs, first-touch faults
// of 4 KiB pages otherwise cost more than the copy itself.
at::Tensor allocate(const NpyHeader& h) {
  at::Tensor t = at::empty_strided(h.shape, npy_strides(h), at::TensorOptions().dtype(h.dtype));
#ifdef MADV_HUGEPAGE  // Linux only
  if (h.nbytes >= kHugePageAdviceBytes) {
    const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
    const uintptr_t last = (begin + h.nbytes) & ~(kHugePage - 1);
    if (last > first) ::madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // advice only
  }
#endif
  return t;
}

// Copies n bytes of byte-swapped T items (dst may equal src).
template <typename T>
void copy_swapped_as(uint8_t* dst, const uint8_t* src, uint64_t n) {
  for (uint64_t i = 0; i + sizeof(T) <= n; i += sizeof(T)) {
    T v;
    std::memcpy(&v, src + i, sizeof v);
    if constexpr (sizeof(T) == 2) v = __builtin_bswap16(v);
    if constexpr (sizeof(T) == 4) v = __builtin_bswap32(v);
    if constexpr (sizeof(T) == 8) v = __builtin_bswap64(v);
    std::memcpy(dst + i, &v, sizeof v);
  }
}

void copy_swapped(uint8_t* dst, const uint8_t* src, uint64_t n, int64_t itemsize) {
  switch (itemsize) {
    case 2: return copy_swapped_as<uint16_t>(dst, src, n);
    case 4: return copy_swapped_as<uint32_t>(dst, src, n);
    case 8: return copy_swapped_as<uint64_t>(dst, src, n);
    default: std::memmove(dst, src, n);  // single bytes have no order (parse_npy_header never asks)
  }
}

// The array bytes after the header must be exactly what the shape and dtype need.
void check_data_size(const NpyHeader& h, const ZipMember& m, const Where& where) {
  NPZ_CHECK(where, m.size - h.header_size == h.nbytes,
            "npy shape (" + c10::Join(", ", h.shape) + ") of " + c10::toString(h.dtype) + " needs " +
                std::to_string(h.nbytes) + " bytes but the member holds " + std::to_string(m.size - h.header_size));
}

void check_method(const ZipMember& m, const Where& where) {
  NPZ_CHECK(where, m.method == kZipStored || m.method == kZipDeflated,
            "unsupported zip compression method " + std::to_string(m.method) +
                " (numpy writes 0 = stored or 8 = deflated)");
}

// The npy header of a stored member, read straight from the mapping (nothing past it is touched).
NpyHeader stored_header(const uint8_t* base, uint64_t offset, const ZipMember& m, const Where& where) {
  NPZ_CHECK(where, m.compressed_size == m.size,
            "stored member's compressed size " + std::to_string(m.compressed_size) + " differs from its size " +
                std::to_string(m.size) + " (corrupt)");
  NpyHeader h = parse_npy_header(base + offset, m.size, where);
  check_data_size(h, m, where);
  return h;
}

// Plans a stored member: its npy header is read straight from the mapping.
void plan_stored(Job& job, const std::shared_ptr<MappedFile>& map, const Where& where) {
  job.header = stored_header(map->data(), job.offset, *job.member, where);
  const NpyHeader& h = job.header;
  if (h.byteswap || h.nbytes == 0) {
    // Foreign byte order: swap into fresh memory. (An empty tensor needs no view of the file.)
    job.plan = Plan::kCopy;
    job.tensor = allocate(h);
    return;
  }
  // np.savez leaves most members at offsets that are not a multiple of the element size (the zip
  // and npy headers before them have arbitrary lengths), and a mapping keeps the file's offsets
  // modulo the page size, so it cannot be realigned. torch's CPU kernels use unaligned loads
  // (as torch.from_numpy of an unaligned array relies on), so such views are still valid tensors;
  // this is what makes loading an official checkpoint O(1) with verify=False.
  job.plan = Plan::kView;
  auto keep = map;  // the deleter owns a reference: the mapping outlives every view
  job.tensor = at::from_blob(map->writable_data() + job.offset + h.header_size, h.shape, npy_strides(h),
                             [keep](void*) {}, at::TensorOptions().dtype(h.dtype));
}

// CRC and/or byte-swapping copy of one chunk of a stored member, a sub-chunk at a time: the CRC
// pulls the sub-chunk into cache, and the copy takes it from there.
void run_stored_chunk(Job& job, const Task& t, const uint8_t* base, bool verify) {
  const uint8_t* src = base + job.offset;
  const NpyHeader& h = job.header;
  uint8_t* dst = job.plan == Plan::kCopy ? static_cast<uint8_t*>(job.tensor.data_ptr()) : nullptr;
  uint32_t crc = 0;
  uint64_t pos = t.begin;
  if (pos < h.header_size) {  // the npy header: CRC only
    const uint64_t stop = std::min(t.end, h.header_size);
    if (verify) crc = crc32_update(crc, src + pos, stop - pos);
    pos = stop;
  }
  while (pos < t.end) {
    const uint64_t n = std::min(kSubChunk, t.end - pos);
    if (verify) crc = crc32_update(crc, src + pos, n);
    if (dst != nullptr) copy_swapped(dst + (pos - h.header_size), src + pos, n, h.itemsize);
    pos += n;
  }
  job.chunk_crcs[t.chunk] = crc;
}

// Raw-deflate stream over the mapped member, read out in pieces of any size.
class Inflater {
 public:
  Inflater(const uint8_t* src, uint64_t n, const Where& where) : in_(src), in_left_(n), where_(where) {
    std::memset(&zs_, 0, sizeof zs_);
    NPZ_CHECK(where_, inflateInit2(&zs_, -MAX_WBITS) == Z_OK, "zlib could not start inflating (out of memory?)");
  }
  ~Inflater() { inflateEnd(&zs_); }
  Inflater(const Inflater&) = delete;
  Inflater& operator=(const Inflater&) = delete;

  // Inflates up to n bytes into dst; returns how many came (fewer only at the stream's end).
  uint64_t read(uint8_t* dst, uint64_t n) {
    uint64_t produced = 0;
    while (produced < n && !ended_) {
      if (zs_.avail_in == 0 && in_left_ > 0) {
        const uInt piece = static_cast<uInt>(std::min<uint64_t>(in_left_, 1u << 30));
        zs_.next_in = const_cast<Bytef*>(in_);
        zs_.avail_in = piece;
        in_ += piece;
        in_left_ -= piece;
      }
      const uInt room = static_cast<uInt>(std::min<uint64_t>(n - produced, 1u << 30));
      zs_.next_out = dst + produced;
      zs_.avail_out = room;
      const uInt had_in = zs_.avail_in;
      const int rc = inflate(&zs_, Z_NO_FLUSH);
      produced += room - zs_.avail_out;
      if (rc == Z_STREAM_END) {
        ended_ = true;
      } else if (rc != Z_OK && rc != Z_BUF_ERROR) {
        fail(where_, std::string("corrupt deflate stream: ") + (zs_.msg != nullptr ? zs_.msg : "zlib error"));
      } else if (room == zs_.avail_out && had_in == zs_.avail_in) {
        // No progress although there was room: input is fed whenever it runs dry, so the
        // compressed data ended early. Failing here (never retrying) also rules out a hang.
        NPZ_CHECK(where_, zs_.avail_in != 0 || in_left_ != 0,
                  "deflated data ends before the end of its stream (truncated or corrupt)");
        fail(where_, "deflate stream makes no progress (corrupt)");
      }
    }
    return produced;
  }

  bool ended() const { return ended_; }

 private:
  z_stream zs_;
  const uint8_t* in_;
  uint64_t in_left_;
  bool ended_ = false;
  const Where& where_;
};

void check_deflate_ratio(const ZipMember& m, const Where& where) {
  NPZ_CHECK(where, m.size / kMaxDeflateRatio <= m.compressed_size,
            "claims " + std::to_string(m.size) + " bytes inflated from " + std::to_string(m.compressed_size) +
                ", more than deflate can expand (corrupt)");
}

// Inflates a deflated member's npy header, and no more than that (plus, for a header shorter
// than the preamble's 12 bytes, the few array bytes read with it), into `head`.
NpyHeader inflate_header(Inflater& inflater, const ZipMember& m, std::vector<uint8_t>& head, const Where& where) {
  const std::string short_msg = "inflates to fewer bytes than the zip's size " + std::to_string(m.size);
  head.assign(std::min<uint64_t>(kNpyPreamble, m.size), 0);
  NPZ_CHECK(where, inflater.read(head.data(), head.size()) == head.size(), short_msg);
  const uint64_t header_size = npy_header_size(head.data(), head.size(), m.size, where);
  const uint64_t have = head.size();
  if (header_size > have) {
    head.resize(header_size);
    NPZ_CHECK(where, inflater.read(head.data() + have, header_size - have) == header_size - have, short_msg);
  }
  NpyHeader h = parse_npy_header(head.data(), header_size, where);
  check_data_size(h, m, where);
  return h;
}

// Inflates a deflated member: its npy header first (to size the tensor), then straight into
// the tensor's memory.
void run_inflate(Job& job, const uint8_t* base, bool verify, const Where& where) {
  const ZipMember& m = *job.member;
  check_deflate_ratio(m, where);
  Inflater inflater(base + job.offset, m.compressed_size, where);
  std::vector<uint8_t> head;
  job.header = inflate_header(inflater, m, head, where);
  const NpyHeader& h = job.header;
  const uint64_t header_size = h.header_size;
  // head.size() may exceed the header if the member is tiny (fewer than 12 bytes of array data).
  uint32_t crc = verify ? crc32_update(0, head.data(), std::min<uint64_t>(head.size(), header_size)) : 0;
  at::Tensor t = allocate(h);
  uint8_t* dst = static_cast<uint8_t*>(t.data_ptr());
  uint64_t got = 0;
  if (head.size() > header_size) {  // array bytes already read with the preamble
    got = head.size() - header_size;
    NPZ_CHECK(where, got <= h.nbytes, "npy data is shorter than the bytes after its header (corrupt)");
    std::memcpy(dst, head.data() + header_size, got);
  }
  got += inflater.read(dst + got, h.nbytes - got);
  NPZ_CHECK(where, got == h.nbytes,
            "inflated size " + std::to_string(h.header_size + got) + " differs from the zip's size " +
                std::to_string(m.size) + " (truncated or corrupt)");
  uint8_t extra;
  NPZ_CHECK(where, inflater.read(&extra, 1) == 0,
            "inflates to more than the zip's size " + std::to_string(m.size) + " (corrupt)");
  NPZ_CHECK(where, inflater.ended(), "deflate stream does not end after the zip's size (corrupt)");
  if (verify) crc = crc32_update(crc, dst, h.nbytes);
  if (h.byteswap) copy_swapped(dst, dst, h.nbytes, h.itemsize);
  job.crc = crc;
  job.tensor = std::move(t);
}

// Member index by key ("name" for "name.npy"); the last of duplicate names wins, as in zipfile.
struct KeyIndex {
  std::vector<std::string> order;
  std::unordered_map<std::string, size_t> member_of;
};

KeyIndex index_keys(const std::vector<ZipMember>& members) {
  KeyIndex index;
  for (size_t i = 0; i < members.size(); ++i) {
    const std::string& name = members[i].name;
    if (name.size() < 4 || name.compare(name.size() - 4, 4, ".npy") != 0) continue;  // not an array
    std::string key = name.substr(0, name.size() - 4);
    auto [it, inserted] = index.member_of.emplace(key, i);
    if (inserted) {
      index.order.push_back(std::move(key));
    } else {
      it->second = i;
    }
  }
  return index;
}

std::vector<std::string> select_keys(const KeyIndex& index, const std::optional<std::vector<std::string>>& keys,
                                     const Where& where) {
  if (!keys.has_value()) return index.order;
  std::vector<std::string> chosen;
  for (const std::string& k : *keys) {
    if (index.member_of.count(k) == 0) {
      std::string avail;
      const size_t show = std::min<size_t>(index.order.size(), 8);
      for (size_t i = 0; i < show; ++i) avail += (i ? ", '" : "'") + index.order[i] + "'";
      if (index.order.size() > show) avail += ", ... (" + std::to_string(index.order.size()) + " in all)";
      fail(where, "no array named '" + k + "'; available: " + (avail.empty() ? "none" : avail));
    }
    if (std::find(chosen.begin(), chosen.end(), k) == chosen.end()) chosen.push_back(k);
  }
  return chosen;
}

void run_tasks(std::vector<Job>& jobs, const std::vector<Task>& tasks, const MappedFile& file, bool verify,
               uint64_t total_bytes, const Where& where, std::vector<std::exception_ptr>& errors) {
  std::atomic<size_t> next{0};
  auto worker = [&]() {
    for (size_t i; (i = next.fetch_add(1)) < tasks.size();) {
      const Task& t = tasks[i];
      Job& job = jobs[t.job];
      try {
        if (job.plan == Plan::kInflate) {
          run_inflate(job, file.data(), verify, where.with(job.member->name));
        } else {
          run_stored_chunk(job, t, file.data(), verify);
        }
      } catch (...) {
        errors[i] = std::current_exception();
      }
    }
  };
  size_t threads = 1;
  if (total_bytes >= kParallelBytes) {
    threads = std::min<size_t>({std::max(1u, std::thread::hardware_concurrency()), 8, tasks.size()});
  }
  std::vector<std::thread> pool;
  for (size_t i = 1; i < threads; ++i) pool.emplace_back(worker);
  worker();
  for (std::thread& th : pool) th.join();
}

// The mapped file, its central directory, and where each member's data starts.
struct Archive {
  std::shared_ptr<MappedFile> map;
  std::vector<ZipMember> members;
  std::vector<uint64_t> offsets;  // of each member's data, from its local header
};

Archive open_archive(const std::string& path, const Where& where) {
  Archive a;
  a.map = std::make_shared<MappedFile>(path);
  a.members = read_central_directory(a.map->data(), a.map->size(), where);
  // Every member's local header is checked, not only the chosen ones': a damaged name that no
  // longer ends in ".npy" must not make an array silently disappear from the result.
  a.offsets.resize(a.members.size());
  for (size_t i = 0; i < a.members.size(); ++i) {
    a.offsets[i] = member_data_offset(a.map->data(), a.map->size(), a.members[i], where.with(a.members[i].name));
  }
  return a;
}

}  // namespace

std::vector<std::pair<std::string, at::Tensor>> load_npz(const std::string& path,
                                                         const std::optional<std::vector<std::string>>& keys,
                                                         bool verify) {
  const Where where{path};
  const Archive archive = open_archive(path, where);
  const std::shared_ptr<MappedFile>& map = archive.map;
  const std::vector<ZipMember>& members = archive.members;
  const std::vector<uint64_t>& offsets = archive.offsets;
  const KeyIndex index = index_keys(members);
  const std::vector<std::string> chosen = select_keys(index, keys, where);

  // Plan every member in order (headers of stored members are parsed here), then list the work.
  std::vector<Job> jobs(chosen.size());
  std::vector<Task> tasks;
  uint64_t total_bytes = 0;
  for (size_t j = 0; j < chosen.size(); ++j) {
    Job& job = jobs[j];
    job.key = chosen[j];
    const size_t m = index.member_of.at(job.key);
    job.member = &members[m];
    job.offset = offsets[m];
    const Where at = where.with(job.member->name);
    check_method(*job.member, at);
    if (job.member->method == kZipDeflated) {
      job.plan = Plan::kInflate;
      tasks.push_back(Task{j, 0, 0, job.member->compressed_size});
      total_bytes += job.member->size;
      continue;
    }
    plan_stored(job, map, at);
    if (!verify && job.plan == Plan::kView) continue;  // nothing to read until the tensor is used
    const uint64_t size = job.member->size;
    const uint64_t first_end = std::min(size, job.header.header_size + kChunk);
    for (uint64_t b = 0, e = first_end; b < size; b = e, e = std::min(size, e + kChunk)) {
      tasks.push_back(Task{j, job.chunk_crcs.size(), b, e});
      job.chunk_crcs.push_back(0);
      job.chunk_sizes.push_back(e - b);
    }
    total_bytes += size;
  }
  // Inflations are indivisible: start the largest first so that they do not finish last.
  std::stable_sort(tasks.begin(), tasks.end(), [&](const Task& a, const Task& b) {
    const bool ia = jobs[a.job].plan == Plan::kInflate, ib = jobs[b.job].plan == Plan::kInflate;
    if (ia != ib) return ia;
    return ia && jobs[a.job].member->compressed_size > jobs[b.job].member->compressed_size;
  });

  std::vector<std::exception_ptr> errors(tasks.size());
  if (!tasks.empty()) run_tasks(jobs, tasks, *map, verify, total_bytes, where, errors);

  // Report the first failure in member order, so that errors do not depend on thread timing.
  std::vector<std::exception_ptr> job_error(jobs.size());
  for (size_t i = 0; i < tasks.size(); ++i) {
    if (errors[i] && !job_error[tasks[i].job]) job_error[tasks[i].job] = errors[i];
  }
  std::vector<std::pair<std::string, at::Tensor>> out;
  out.reserve(jobs.size());
  for (size_t j = 0; j < jobs.size(); ++j) {
    Job& job = jobs[j];
    if (job_error[j]) std::rethrow_exception(job_error[j]);
    if (verify) {
      uint32_t crc = job.crc;
      if (job.plan != Plan::kInflate) {
        crc = 0;
        for (size_t c = 0; c < job.chunk_crcs.size(); ++c) crc = crc32_concat(crc, job.chunk_crcs[c], job.chunk_sizes[c]);
      }
      char msg[128];
      std::snprintf(msg, sizeof msg, "CRC-32 mismatch: the zip says %08x, the data gives %08x (corrupt file)",
                    job.member->crc32, crc);
      NPZ_CHECK(where.with(job.member->name), crc == job.member->crc32, msg);
    }
    out.emplace_back(std::move(job.key), std::move(job.tensor));
  }
  return out;
}

std::vector<std::pair<std::string, NpyHeader>> npz_index(const std::string& path) {
  const Where where{path};
  const Archive archive = open_archive(path, where);
  const KeyIndex index = index_keys(archive.members);
  std::vector<std::pair<std::string, NpyHeader>> out;
  out.reserve(index.order.size());
  for (const std::string& key : index.order) {
    const size_t i = index.member_of.at(key);
    const ZipMember& m = archive.members[i];
    const Where at = where.with(m.name);
    check_method(m, at);
    if (m.method == kZipStored) {
      out.emplace_back(key, stored_header(archive.map->data(), archive.offsets[i], m, at));
    } else {
      check_deflate_ratio(m, at);
      Inflater inflater(archive.map->data() + archive.offsets[i], m.compressed_size, at);
      std::vector<uint8_t> head;
      out.emplace_back(key, inflate_header(inflater, m, head, at));
    }
  }
  return out;
}

}  // namespace vitcore
