# CUDA kernels for native:cuda, included from the top-level CMakeLists.txt after target _native
# exists. KVMICRO_CUDA: AUTO builds them when a CUDA compiler is found, ON requires one, OFF skips.
# A machine without nvcc still builds the CPU module.

string(TOUPPER "${KVMICRO_CUDA}" _kv_cuda)
if(_kv_cuda STREQUAL "OFF")
  message(STATUS "kvmicro: CUDA disabled (KVMICRO_CUDA=OFF)")
  return()
endif()

include(CheckLanguage)
check_language(CUDA)
if(NOT CMAKE_CUDA_COMPILER)
  if(_kv_cuda STREQUAL "ON")
    message(FATAL_ERROR "kvmicro: KVMICRO_CUDA=ON but no CUDA compiler was found "
                        "(set CMAKE_CUDA_COMPILER or put nvcc on PATH)")
  endif()
  message(STATUS "kvmicro: no CUDA compiler found; building without native:cuda")
  return()
endif()

# Ampere and Hopper machine code, plus compute_90 PTX so newer GPUs can JIT it. nvcc 13 has no
# sm_70 or older. Override with -DCMAKE_CUDA_ARCHITECTURES=...
if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
  set(CMAKE_CUDA_ARCHITECTURES "80-real;90")
endif()
set(CMAKE_CUDA_STANDARD 17)
set(CMAKE_CUDA_STANDARD_REQUIRED ON)
enable_language(CUDA)
find_package(CUDAToolkit REQUIRED)

# The top-level options (-Wall, -Wextra, ...) are gcc/clang flags that nvcc rejects: keep every
# option set so far for C++ sources only.
get_target_property(_kv_opts _native COMPILE_OPTIONS)
if(_kv_opts)
  set(_kv_cxx_opts "")
  foreach(_opt IN LISTS _kv_opts)
    list(APPEND _kv_cxx_opts "$<$<COMPILE_LANGUAGE:CXX>:${_opt}>")
  endforeach()
  set_property(TARGET _native PROPERTY COMPILE_OPTIONS "${_kv_cxx_opts}")
endif()

file(GLOB KVMICRO_CUDA_SOURCES CONFIGURE_DEPENDS
     ${CMAKE_CURRENT_SOURCE_DIR}/csrc/cuda/*.cu
     ${CMAKE_CURRENT_SOURCE_DIR}/csrc/cuda/*.cpp)
target_sources(_native PRIVATE ${KVMICRO_CUDA_SOURCES})
target_compile_definitions(_native PRIVATE KVMICRO_WITH_CUDA=1)
# The timeline probe (csrc/cuda/timeline.cuh, scripts/timeline.py): the attention kernels stamp
# the global timer per block. A diagnostic build, never one to time with (build_info says so).
option(KVMICRO_TIMELINE "Stamp the CUDA attention kernels' timeline (scripts/timeline.py)" OFF)
if(KVMICRO_TIMELINE)
  target_compile_definitions(_native PRIVATE KVMICRO_TIMELINE=1)
  message(STATUS "kvmicro: the CUDA timeline probe is on (diagnostic build: do not time it)")
endif()
target_compile_options(_native PRIVATE
  $<$<COMPILE_LANGUAGE:CUDA>:-O3 -lineinfo>)
# Static runtime: the module then loads wherever a driver is, whatever libcudart the Python
# environment carries (or none).
# _native was created before CUDA was enabled, so it did not pick these up from the variables.
set_target_properties(_native PROPERTIES
  CUDA_ARCHITECTURES "${CMAKE_CUDA_ARCHITECTURES}"
  CUDA_STANDARD 17
  CUDA_STANDARD_REQUIRED ON
  CUDA_RUNTIME_LIBRARY Static)
target_link_libraries(_native PRIVATE CUDA::cudart_static)
message(STATUS "kvmicro: native:cuda enabled (nvcc ${CMAKE_CUDA_COMPILER_VERSION}, "
               "architectures ${CMAKE_CUDA_ARCHITECTURES})")
