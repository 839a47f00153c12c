// The one tensor type the model and the backends share: a 2-D row-major view into memory a backend owns.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

namespace qwen {

enum class DType : uint8_t { F32, BF16, F16 };

inline size_t dtype_size(DType t) { return t == DType::F32 ? 4 : 2; }
inline const char* dtype_name(DType t) { return t == DType::F32 ? "F32" : t == DType::BF16 ? "BF16" : "F16"; }

// rows × cols elements; row r starts `ld` elements after row r-1, so a column range of a wider matrix is a view.
struct Tensor {
  void* data = nullptr;
  DType dtype = DType::F32;
  int64_t rows = 0, cols = 0, ld = 0;

  template <class T> T* ptr() const { return static_cast<T*>(data); }
  template <class T> T* row(int64_t r) const { return static_cast<T*>(data) + r * ld; }
  bool contiguous() const { return ld == cols; }
  int64_t numel() const { return rows * cols; }

  Tensor slice_cols(int64_t c0, int64_t n) const {
    Tensor t = *this;
    t.data = static_cast<char*>(data) + c0 * int64_t(dtype_size(dtype));
    t.cols = n;
    return t;
  }
  Tensor slice_rows(int64_t r0, int64_t n) const {
    Tensor t = *this;
    t.data = static_cast<char*>(data) + r0 * ld * int64_t(dtype_size(dtype));
    t.rows = n;
    return t;
  }
};

// bf16 is the top half of an f32: widening is exact, narrowing rounds to nearest even (NaN stays NaN).
inline float bf16_to_f32(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}
float f16_to_f32(uint16_t h);  // weights.cpp

}  // namespace qwen
