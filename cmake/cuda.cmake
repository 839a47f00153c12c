# The CUDA backend (csrc/cuda/), selected by QWEN_NATIVE_CUDA:
#   AUTO  build it when nvcc and cuBLAS are both found, else build CPU-only and say why (the default);
#   ON    build it or fail the configure, saying what is missing;
#   OFF   never look.
# Set it with -DQWEN_NATIVE_CUDA=ON, pip install . --config-settings=cmake.define.QWEN_NATIVE_CUDA=ON, or
# CMAKE_ARGS="-DQWEN_NATIVE_CUDA=ON".
#
# cuBLAS comes from the CUDA toolkit when it has one, else from PyPI's nvidia-cublas wheel found through the build's
# Python (nvidia/cu13/... for CUDA 13, nvidia/cublas/... for the -cu12 wheel). The CUDA runtime is linked
# statically; libcublas is found at run time through the RPATH (the wheel next to us in site-packages, then the
# directory it was found in at build time), so no environment variables are needed. A CPU-only build links nothing
# of CUDA and imports without any CUDA library present.
#
# Architectures: CMAKE_CUDA_ARCHITECTURES when given; else what nvidia-smi reports for the GPUs of this machine;
# else 80 (A100), 89 (L4/RTX 40) and 90 (H100/H200) as machine code plus compute_90 PTX for newer GPUs.

string(TOUPPER "${QWEN_NATIVE_CUDA}" _qn_cuda)
if(NOT _qn_cuda MATCHES "^(AUTO|ON|OFF)$")
  message(FATAL_ERROR "QWEN_NATIVE_CUDA must be AUTO, ON or OFF (got '${QWEN_NATIVE_CUDA}')")
endif()

set(_qn_cuda_missing "")

function(_qn_cuda_give_up reason)
  if(_qn_cuda STREQUAL "ON")
    message(FATAL_ERROR "qwen-native: QWEN_NATIVE_CUDA=ON but ${reason}")
  endif()
  message(STATUS "qwen-native: CUDA backend not built (CPU-only): ${reason}")
endfunction()

set(_qn_cuda_ok OFF)
if(_qn_cuda STREQUAL "OFF")
  message(STATUS "qwen-native: CUDA backend not built (QWEN_NATIVE_CUDA=OFF)")
else()
  # --- nvcc ----------------------------------------------------------------------------------------------------
  include(CheckLanguage)
  check_language(CUDA)
  if(NOT CMAKE_CUDA_COMPILER)
    _qn_cuda_give_up("no CUDA compiler was found (put nvcc on PATH, or set CUDACXX / CMAKE_CUDA_COMPILER)")
  else()
    # Architectures must be known before the language is enabled.
    if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES OR CMAKE_CUDA_ARCHITECTURES STREQUAL "")
      set(_qn_archs "")
      find_program(_qn_nvidia_smi nvidia-smi)
      if(_qn_nvidia_smi)
        execute_process(COMMAND "${_qn_nvidia_smi}" --query-gpu=compute_cap --format=csv,noheader
                        OUTPUT_VARIABLE _qn_caps RESULT_VARIABLE _qn_smi_rc ERROR_QUIET
                        OUTPUT_STRIP_TRAILING_WHITESPACE TIMEOUT 20)
        if(_qn_smi_rc EQUAL 0)
          string(REPLACE "\n" ";" _qn_caps "${_qn_caps}")
          foreach(_cap IN LISTS _qn_caps)
            string(STRIP "${_cap}" _cap)
            if(_cap MATCHES "^([0-9]+)\\.([0-9]+)$")
              set(_a "${CMAKE_MATCH_1}${CMAKE_MATCH_2}")
              if(_a GREATER_EQUAL 80)
                list(APPEND _qn_archs "${_a}")
              endif()
            endif()
          endforeach()
          list(REMOVE_DUPLICATES _qn_archs)
        endif()
      endif()
      if(_qn_archs)
        message(STATUS "qwen-native: CUDA architectures from nvidia-smi: ${_qn_archs}")
      else()
        set(_qn_archs "80-real;89-real;90")
        message(STATUS "qwen-native: no GPU reported by nvidia-smi; CUDA architectures ${_qn_archs}")
      endif()
      set(CMAKE_CUDA_ARCHITECTURES "${_qn_archs}" CACHE STRING "CUDA architectures of the qwen-native CUDA backend")
    endif()
    enable_language(CUDA)
    find_package(CUDAToolkit)
    if(NOT CUDAToolkit_FOUND)
      _qn_cuda_give_up("nvcc ${CMAKE_CUDA_COMPILER_VERSION} was found but not its toolkit (CUDA runtime headers)")
    else()
      # --- cuBLAS: the toolkit's, else the nvidia-cublas wheel's ------------------------------------------------
      set(_qn_cublas_inc "")
      set(_qn_cublas_lib "")
      set(_qn_cublas_libdir "")
      set(_qn_cublas_rel "")
      if(TARGET CUDA::cublas)
        find_path(_qn_toolkit_cublas_h cublas_v2.h PATHS ${CUDAToolkit_INCLUDE_DIRS} NO_DEFAULT_PATH)
        if(_qn_toolkit_cublas_h)
          set(_qn_cublas_inc "${_qn_toolkit_cublas_h}")
          get_target_property(_qn_cublas_lib CUDA::cublas IMPORTED_LOCATION)
          set(_qn_cublas_libdir "${CUDAToolkit_LIBRARY_DIR}")
          message(STATUS "qwen-native: cuBLAS from the CUDA toolkit (${_qn_cublas_lib})")
        endif()
      endif()
      if(NOT _qn_cublas_inc)
        # Each line: include dir | lib dir | libcublas.so.N | lib dir relative to site-packages | wheel's CUDA major
        execute_process(
          COMMAND "${Python_EXECUTABLE}" -c [=[
import glob, os
try:
    import nvidia
    bases = list(nvidia.__path__)
except Exception:
    bases = []
for base in bases:
    for sub in sorted(os.listdir(base)):
        inc, lib = os.path.join(base, sub, "include"), os.path.join(base, sub, "lib")
        libs = sorted(glob.glob(os.path.join(lib, "libcublas.so.*")))
        if os.path.isfile(os.path.join(inc, "cublas_v2.h")) and libs:
            rel = os.path.relpath(lib, os.path.dirname(base))
            major = os.path.basename(libs[0]).split(".")[2]
            print("|".join([inc, lib, libs[0], rel, major]))
]=]
          OUTPUT_VARIABLE _qn_wheels RESULT_VARIABLE _qn_wheels_rc ERROR_QUIET OUTPUT_STRIP_TRAILING_WHITESPACE)
        if(_qn_wheels_rc EQUAL 0 AND _qn_wheels)
          string(REPLACE "\n" ";" _qn_wheels "${_qn_wheels}")
          # Prefer the wheel whose major version matches nvcc's, else take the first.
          list(GET _qn_wheels 0 _qn_pick)
          foreach(_w IN LISTS _qn_wheels)
            string(REPLACE "|" ";" _wl "${_w}")
            list(GET _wl 4 _wmajor)
            if(_wmajor STREQUAL CUDAToolkit_VERSION_MAJOR)
              set(_qn_pick "${_w}")
              break()
            endif()
          endforeach()
          string(REPLACE "|" ";" _qn_pick "${_qn_pick}")
          list(GET _qn_pick 0 _qn_cublas_inc)
          list(GET _qn_pick 1 _qn_cublas_libdir)
          list(GET _qn_pick 2 _qn_cublas_lib)
          list(GET _qn_pick 3 _qn_cublas_rel)
          list(GET _qn_pick 4 _qn_cublas_major)
          message(STATUS "qwen-native: cuBLAS from the nvidia-cublas wheel (${_qn_cublas_lib})")
          if(NOT _qn_cublas_major STREQUAL CUDAToolkit_VERSION_MAJOR)
            message(WARNING "qwen-native: the nvidia-cublas wheel is for CUDA ${_qn_cublas_major} but nvcc is "
                            "${CUDAToolkit_VERSION}; install the matching wheel if linking or running fails")
          endif()
        endif()
      endif()
      if(NOT _qn_cublas_inc)
        _qn_cuda_give_up("cuBLAS was found neither in the CUDA ${CUDAToolkit_VERSION} toolkit nor as the "
                         "nvidia-cublas wheel of ${Python_EXECUTABLE}: pip install nvidia-cublas, then build with "
                         "--no-build-isolation (an isolated build environment does not see it)")
      else()
        set(_qn_cuda_ok ON)
      endif()
    endif()
  endif()
endif()

if(NOT _qn_cuda_ok)
  target_sources(_core PRIVATE csrc/no_cuda.cpp)
  return()
endif()

# --- the CUDA build ----------------------------------------------------------------------------------------------
message(STATUS "qwen-native: CUDA backend ON (nvcc ${CUDAToolkit_VERSION}, architectures ${CMAKE_CUDA_ARCHITECTURES})")
set(_qn_cuda_sources
  csrc/cuda/backend_cuda.cu
  csrc/cuda/memory.cu
  csrc/cuda/graph.cu
  csrc/cuda/tuner.cu
  csrc/cuda/kernels.cu
  csrc/cuda/gemv.cu
  csrc/cuda/attention.cu
  csrc/cuda/quant.cu
)
target_sources(_core PRIVATE ${_qn_cuda_sources})
set_source_files_properties(${_qn_cuda_sources} PROPERTIES COMPILE_OPTIONS
  "$<$<COMPILE_LANGUAGE:CUDA>:-O3;-lineinfo;-Xcompiler=-fvisibility=hidden>")
# The C++ options of the target (-fopenmp-simd, -Wall, ...) are for the host compiler only.
get_target_property(_qn_opts _core COMPILE_OPTIONS)
if(_qn_opts)
  set(_qn_cxx_opts "")
  foreach(_o IN LISTS _qn_opts)
    list(APPEND _qn_cxx_opts "$<$<COMPILE_LANGUAGE:CXX>:${_o}>")
  endforeach()
  set_property(TARGET _core PROPERTY COMPILE_OPTIONS ${_qn_cxx_opts})
endif()
# _core was created before CUDA was enabled, so its architectures are not initialised from the variable.
set_target_properties(_core PROPERTIES CUDA_ARCHITECTURES "${CMAKE_CUDA_ARCHITECTURES}" CUDA_RUNTIME_LIBRARY Static
                                       CUDA_SEPARABLE_COMPILATION OFF CUDA_STANDARD 17 CUDA_STANDARD_REQUIRED ON)
target_include_directories(_core PRIVATE "${_qn_cublas_inc}")
target_compile_definitions(_core PRIVATE QWEN_CUDA=1)
target_link_libraries(_core PRIVATE CUDA::cudart_static "${_qn_cublas_lib}")
if(_qn_cublas_rel)
  set_property(TARGET _core APPEND PROPERTY INSTALL_RPATH "$ORIGIN/../${_qn_cublas_rel}")
endif()
set_property(TARGET _core APPEND PROPERTY INSTALL_RPATH "${_qn_cublas_libdir}")
set_property(TARGET _core APPEND PROPERTY BUILD_RPATH "${_qn_cublas_libdir}")
