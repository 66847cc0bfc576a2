// MSDA_CHECK: TORCH_CHECK whose message is assembled without iostreams.
//
// TORCH_CHECK formats non-string arguments through std::ostringstream. In the extension built by nvcc
// with gcc 13 as host compiler against torch 2.11 (on an H200 machine), formatting an integer that way
// crashed the interpreter (SIGSEGV) instead of raising, while string-only messages raised normally:
// most likely the locale's number-formatting facet differs between the libstdc++ the extension was
// compiled against and the one torch uses. Here numbers go through std::to_string (no locale) and
// TORCH_CHECK receives one finished C string, a path that never touches an ostream.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>
#include <type_traits>

namespace msda {
namespace error {

inline std::string text(const char* s) { return s; }
inline std::string text(const std::string& s) { return s; }
template <typename T, std::enable_if_t<std::is_integral<T>::value, int> = 0>
std::string text(T v) {
  return std::to_string(v);
}
inline std::string text(c10::ScalarType t) { return c10::toString(t); }
inline std::string text(const c10::Device& d) {
  return c10::DeviceTypeName(d.type(), true) + (d.has_index() ? ":" + std::to_string(d.index()) : "");
}
inline std::string text(c10::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + "]";
}

template <typename... Args>
std::string join(const Args&... args) {
  std::string s;
  ((s += text(args)), ...);
  return s;
}

}  // namespace error
}  // namespace msda

#define MSDA_CHECK(cond, ...)                                                  \
  do {                                                                         \
    if (C10_UNLIKELY(!(cond))) {                                               \
      const std::string msda_message_ = ::msda::error::join(__VA_ARGS__);      \
      TORCH_CHECK(false, msda_message_.c_str());                               \
    }                                                                          \
  } while (0)
