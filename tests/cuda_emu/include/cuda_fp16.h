// CPU emulation (tests only): float16 as 16 bits; widening is exact, as the hardware's.
#pragma once
#include <cmath>
#include <cstdint>

struct __half { unsigned short bits; };
inline __half __ushort_as_half(unsigned short b) { return {b}; }
inline float __half2float(__half h) {
  const int e = (h.bits >> 10) & 31, m = h.bits & 1023;
  const float mag = e == 31 ? (m ? NAN : INFINITY)
                   : e    ? std::ldexp(float(1024 + m), e - 25)  // normal: 1.m × 2^(e - 15)
                          : std::ldexp(float(m), -24);           // subnormal: m × 2^-24
  return h.bits & 0x8000 ? -mag : mag;
}
