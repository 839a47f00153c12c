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
#include <memory>
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

uint16_t f32_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return uint16_t(sign | 0x7e00u);               // NaN
  if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);              // beyond the largest f16 after rounding: inf
  if (a >= 0x38800000u) {                                             // normal: rebias, round to nearest even
    const uint32_t m = a + 0xfffu + ((a >> 13) & 1u) - (uint32_t(112) << 23);
    return uint16_t(sign | (m >> 13));
  }
  // subnormal f16 (or zero): shift the mantissa with its implicit bit, rounding to nearest even
  const int e = int(a >> 23);
  if (e < 102) return uint16_t(sign);
  const uint32_t mant = (a & 0x7fffffu) | 0x800000u;
  const int shift = 126 - e;  // 14 .. 24
  uint32_t q = mant >> shift;
  const uint32_t rem = mant & ((1u << shift) - 1u), half = 1u << (shift - 1);
  if (rem > half || (rem == half && (q & 1u))) ++q;
  return uint16_t(sign | q);
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
  std::string path;
  explicit File(const std::string& p) : path(p) {
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
  // Work in pieces, largest first, taken by whichever thread is free: whole tensors handed out in turn left one
  // thread quantizing for seconds after the other had finished (a 1.5B's tensors split about 3:1). About 64 pieces
  // a thread, at most 32 MB each; a piece of a weight stored by rows (quantized, panels) is whole 32-row runs.
  int64_t total = 0;
  for (const auto& t : targets) total += t.src->nbytes;
  const int64_t piece = std::min<int64_t>(int64_t(32) << 20, total / (64 * std::max(1, threads)));
  struct Piece {
    const TensorTarget* t;
    int64_t begin, end;  // bytes of the tensor's source
  };
  // Quantized and panel-stored weights take whole rows; a plain one any run of elements.
  auto by_rows = [](const TensorTarget& t) { return is_quantized(t.dst.format) || t.dst.panels; };
  std::vector<Piece> pieces;
  for (const auto& t : targets) {
    const int64_t esize = int64_t(dtype_size(t.src_dtype)), n = t.src->nbytes;
    const int64_t unit = by_rows(t) ? 32 * t.dst.cols() * esize : esize;
    const int64_t step = std::max<int64_t>(1, piece / unit) * unit;
    for (int64_t b = 0; b < n || b == 0; b += step) pieces.push_back(Piece{&t, b, std::min(n, b + step)});
  }
  std::stable_sort(pieces.begin(), pieces.end(),
                   [](const Piece& a, const Piece& b) { return a.end - a.begin > b.end - b.begin; });

  std::atomic<size_t> next{0};
  std::exception_ptr error;
  std::mutex error_mu;
  auto worker = [&] {
    constexpr int64_t kChunk = int64_t(8) << 20;  // bounce buffer for converting reads
    std::vector<char> bounce;
    std::unique_ptr<File> file;
    try {
      for (size_t j; (j = next.fetch_add(1)) < pieces.size();) {
        const TensorTarget* t = pieces[j].t;
        const TensorSource& s = *t->src;
        if (!file || file->path != s.path) file = std::make_unique<File>(s.path);
        const int64_t esize = int64_t(dtype_size(t->src_dtype));
        const Tensor& data = t->dst.data;
        char* direct = static_cast<char*>(backend.host_data(data));
        const bool rows = by_rows(*t);
        const int64_t begin = pieces[j].begin, end = pieces[j].end;
        if (direct && !rows && data.dtype == t->src_dtype && data.contiguous()) {
          pread_all(file->fd, s.path, direct + t->at * esize + begin, end - begin, s.offset + begin);
          continue;
        }
        if (bounce.empty()) bounce.resize(size_t(kChunk));
        const int64_t unit = rows ? t->dst.cols() * esize : esize;
        // (Panel-stored weights in whole 32-row blocks where they can: packed at once, not element by element.)
        const int64_t per = std::max<int64_t>(1, kChunk / unit);
        const int64_t step = (t->dst.panels && per >= 32 ? per / 32 * 32 : per) * unit;
        if (step > int64_t(bounce.size())) bounce.resize(size_t(step));
        for (int64_t done = begin; done < end; done += step) {
          const int64_t n = std::min(step, end - done);
          pread_all(file->fd, s.path, bounce.data(), n, s.offset + done);
          if (rows)
            backend.upload_weight(t->dst, (t->at + done / esize) / t->dst.cols(), bounce.data(), t->src_dtype,
                                  n / unit);
          else
            backend.upload(data, t->at + done / esize, bounce.data(), t->src_dtype, n / esize);
        }
        std::lock_guard<std::mutex> lock(error_mu);
        if (error) return;
      }
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mu);
      if (!error) error = std::current_exception();
      next = pieces.size();
    }
  };
  std::vector<std::thread> pool;
  for (int i = 1; i < threads && size_t(i) < pieces.size(); ++i) pool.emplace_back(worker);
  worker();
  for (auto& th : pool) th.join();
  if (error) std::rethrow_exception(error);
}

}  // namespace qwen
