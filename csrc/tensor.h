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

// How a parameter is stored. Plain formats hold one element per value; quantized ones (next) add scales and a
// group size to the Weight. The model picks a format per tensor, so one model may mix them.
enum class Format : uint8_t { F32, BF16 };

inline const char* format_name(Format f) { return f == Format::F32 ? "float32" : "bfloat16"; }
// The element type of a plain format's data.
inline DType format_dtype(Format f) { return f == Format::F32 ? DType::F32 : DType::BF16; }
// Bytes of a rows × cols matrix in format f, exactly (what the backend allocates for it).
inline int64_t format_bytes(Format f, int64_t rows, int64_t cols) {
  return rows * cols * int64_t(dtype_size(format_dtype(f)));
}

// A model parameter: its data in the backend's memory and the format that data is in. Matmuls and the embedding
// lookup dispatch on `format`.
struct Weight {
  Tensor data;  // (rows, cols) of format_dtype(format)
  Format format = Format::F32;

  int64_t rows() const { return data.rows; }
  int64_t cols() const { return data.cols; }
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
