// Runtime bool -> constexpr bool, for the switches that change a kernel's code (house style).
// Shared by the selective-scan and Gramian kernels.
#pragma once

#define COMPRESSM_BOOL_SWITCH(COND, CONST_NAME, ...) \
  [&] {                                              \
    if (COND) {                                      \
      constexpr bool CONST_NAME = true;              \
      return __VA_ARGS__();                          \
    } else {                                         \
      constexpr bool CONST_NAME = false;             \
      return __VA_ARGS__();                          \
    }                                                \
  }()
