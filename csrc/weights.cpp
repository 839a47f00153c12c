#include "weights.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <exception>
#include <map>
#include <mutex>
#include <stdexcept>
#include <thread>

namespace qwen {

float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);  // inf / nan
  } else if (exp != 0) {
    u = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    u = sign;
  } else {  // subnormal: renormalise
    int e = -1;
    do { ++e; man <<= 1; } while (!(man & 0x400u));
    u = sign | uint32_t(112 - e) << 23 | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

DType parse_dtype(const TensorSource& s) {
  if (s.dtype == "F32") return DType::F32;
  if (s.dtype == "BF16") return DType::BF16;
  if (s.dtype == "F16") return DType::F16;
  throw std::invalid_argument("tensor " + s.name + " has dtype " + s.dtype +
                              "; supported checkpoint dtypes are BF16, F16 and F32");
}

namespace {

struct File {
  int fd = -1;
  explicit File(const std::string& path) {
    fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw std::runtime_error("cannot open " + path + ": " + std::strerror(errno));
  }
  ~File() { if (fd >= 0) ::close(fd); }
  File(const File&) = delete;
  File& operator=(const File&) = delete;
};

void pread_all(int fd, const std::string& path, void* buf, int64_t n, int64_t off) {
  char* p = static_cast<char*>(buf);
  while (n > 0) {
    ssize_t got = ::pread(fd, p, size_t(std::min<int64_t>(n, int64_t(1) << 30)), off);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0)
      throw std::runtime_error("reading " + path + " failed at byte " + std::to_string(off) +
                               (got == 0 ? ": the file is shorter than its header says (truncated?)"
                                         : std::string(": ") + std::strerror(errno)));
    p += got; n -= got; off += got;
  }
}

}  // namespace

void check_files(const std::vector<TensorSource>& sources) {
  std::map<std::string, int64_t> sizes;
  for (const auto& s : sources) {
    auto it = sizes.find(s.path);
    if (it == sizes.end()) {
      struct stat st;
      if (::stat(s.path.c_str(), &st) != 0)
        throw std::runtime_error("cannot open " + s.path + ": " + std::strerror(errno));
      it = sizes.emplace(s.path, int64_t(st.st_size)).first;
    }
    if (s.offset < 0 || s.nbytes < 0 || s.offset > it->second || s.nbytes > it->second - s.offset)
      throw std::runtime_error("tensor " + s.name + " lies outside " + s.path + " (bytes " +
                               std::to_string(s.offset) + ".." + std::to_string(s.offset + s.nbytes) + " of a " +
                               std::to_string(it->second) + "-byte file): the file is truncated or corrupt");
  }
}

void read_tensors(Backend& backend, const std::vector<TensorTarget>& targets, int threads) {
  // Group by file so that each worker opens a file once; files are handed out whole.
  std::map<std::string, std::vector<const TensorTarget*>> by_file;
  for (const auto& t : targets) by_file[t.src->path].push_back(&t);
  std::vector<const std::vector<const TensorTarget*>*> files;
  for (auto& kv : by_file) files.push_back(&kv.second);
  // Many tensors, few files: split each file's tensor list so both threads have work on a one-file checkpoint.
  std::vector<std::vector<const TensorTarget*>> jobs;
  for (auto* f : files) {
    size_t parts = size_t(std::max(1, threads));
    for (size_t p = 0; p < parts; ++p) {
      std::vector<const TensorTarget*> job;
      for (size_t i = p; i < f->size(); i += parts) job.push_back((*f)[i]);
      if (!job.empty()) jobs.push_back(std::move(job));
    }
  }

  std::atomic<size_t> next{0};
  std::exception_ptr error;
  std::mutex error_mu;
  auto worker = [&] {
    constexpr int64_t kChunk = int64_t(8) << 20;  // bounce buffer for converting reads
    std::vector<char> bounce;
    try {
      for (size_t j; (j = next.fetch_add(1)) < jobs.size();) {
        File file(jobs[j].front()->src->path);
        for (const TensorTarget* t : jobs[j]) {
          const TensorSource& s = *t->src;
          const int64_t esize = int64_t(dtype_size(t->src_dtype));
          char* direct = static_cast<char*>(backend.host_data(t->dst));
          if (direct && t->dst.dtype == t->src_dtype && t->dst.contiguous()) {
            pread_all(file.fd, s.path, direct + t->at * esize, s.nbytes, s.offset);
            continue;
          }
          if (bounce.empty()) bounce.resize(size_t(kChunk));
          for (int64_t done = 0; done < s.nbytes; done += kChunk) {
            int64_t n = std::min(kChunk, s.nbytes - done);
            pread_all(file.fd, s.path, bounce.data(), n, s.offset + done);
            backend.upload(t->dst, t->at + done / esize, bounce.data(), t->src_dtype, n / esize);
          }
        }
        std::lock_guard<std::mutex> lock(error_mu);
        if (error) return;
      }
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mu);
      if (!error) error = std::current_exception();
      next = jobs.size();
    }
  };
  std::vector<std::thread> pool;
  for (int i = 1; i < threads && size_t(i) < jobs.size(); ++i) pool.emplace_back(worker);
  worker();
  for (auto& th : pool) th.join();
  if (error) std::rethrow_exception(error);
}

}  // namespace qwen
