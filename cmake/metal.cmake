# native:metal: the Objective-C++ host (csrc/metal) and the .metal kernels (metal/), Apple only;
# included from the top-level CMakeLists.txt after target _native exists.
# KVMICRO_METAL: AUTO builds the host on Apple (kernels as a metallib when `xcrun metal` works,
# else only embedded for run-time compilation), ON requires Apple and the Metal compiler, OFF
# skips. Elsewhere the module builds without Metal, and native:metal says why.
set(KVMICRO_METAL "AUTO" CACHE STRING "Build native:metal: AUTO (on Apple), ON, OFF")
set_property(CACHE KVMICRO_METAL PROPERTY STRINGS AUTO ON OFF)
set(KVMICRO_METAL_STD "metal3.1" CACHE STRING
    "MSL standard for the metallib (bfloat kernels need metal3.1, i.e. macOS 14)")

string(TOUPPER "${KVMICRO_METAL}" _kv_metal)
if(_kv_metal STREQUAL "OFF")
  message(STATUS "kvmicro: Metal disabled (KVMICRO_METAL=OFF)")
  return()
endif()
if(NOT APPLE)
  if(_kv_metal STREQUAL "ON")
    message(FATAL_ERROR "kvmicro: KVMICRO_METAL=ON needs macOS (Metal is Apple only)")
  endif()
  message(STATUS "kvmicro: not Apple; building without native:metal")
  return()
endif()

enable_language(OBJCXX)
file(GLOB KVMICRO_METAL_KERNELS CONFIGURE_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/metal/*.metal)
file(GLOB KVMICRO_METAL_HEADERS CONFIGURE_DEPENDS
     ${CMAKE_CURRENT_SOURCE_DIR}/metal/*.h ${CMAKE_CURRENT_SOURCE_DIR}/csrc/common/*.h)
if(NOT KVMICRO_METAL_KERNELS)
  if(_kv_metal STREQUAL "ON")
    message(FATAL_ERROR "kvmicro: KVMICRO_METAL=ON but metal/ holds no .metal kernels")
  endif()
  message(STATUS "kvmicro: no metal/*.metal kernels; building without native:metal")
  return()
endif()

# The embedded sources (the run-time fallback) are always generated.
set(_kv_gen ${CMAKE_CURRENT_BINARY_DIR}/kvmicro_metal_gen)
add_custom_command(
  OUTPUT ${_kv_gen}/metal_embedded_source.inc
  COMMAND ${CMAKE_COMMAND} -E make_directory ${_kv_gen}
  COMMAND ${CMAKE_COMMAND} -DROOT=${CMAKE_CURRENT_SOURCE_DIR}
          -DOUT=${_kv_gen}/metal_embedded_source.inc "-DSOURCES=${KVMICRO_METAL_KERNELS}"
          -P ${CMAKE_CURRENT_SOURCE_DIR}/cmake/metal_embed.cmake
  DEPENDS ${KVMICRO_METAL_KERNELS} ${KVMICRO_METAL_HEADERS}
          ${CMAKE_CURRENT_SOURCE_DIR}/cmake/metal_embed.cmake
  COMMENT "kvmicro: embedding metal/*.metal for newLibraryWithSource")

# The metallib: one .air per kernel file (warnings are errors), linked by `xcrun metallib`.
execute_process(COMMAND xcrun -sdk macosx -f metal OUTPUT_VARIABLE _kv_metal_cc
                ERROR_QUIET RESULT_VARIABLE _kv_metal_rc OUTPUT_STRIP_TRAILING_WHITESPACE)
set(_kv_metallib "")
if(_kv_metal_rc EQUAL 0 AND _kv_metal_cc)
  set(_kv_airs "")
  foreach(_src IN LISTS KVMICRO_METAL_KERNELS)
    get_filename_component(_stem ${_src} NAME_WE)
    set(_air ${_kv_gen}/${_stem}.air)
    add_custom_command(
      OUTPUT ${_air}
      COMMAND ${CMAKE_COMMAND} -E make_directory ${_kv_gen}
      COMMAND xcrun -sdk macosx metal -std=${KVMICRO_METAL_STD} -Werror
              -I${CMAKE_CURRENT_SOURCE_DIR}/csrc -I${CMAKE_CURRENT_SOURCE_DIR}/metal
              -c ${_src} -o ${_air}
      DEPENDS ${_src} ${KVMICRO_METAL_HEADERS}
      COMMENT "kvmicro: xcrun metal ${_stem}.metal")
    list(APPEND _kv_airs ${_air})
  endforeach()
  set(_kv_metallib ${CMAKE_CURRENT_BINARY_DIR}/kvmicro.metallib)
  add_custom_command(
    OUTPUT ${_kv_metallib}
    COMMAND xcrun -sdk macosx metallib ${_kv_airs} -o ${_kv_metallib}
    DEPENDS ${_kv_airs}
    COMMENT "kvmicro: xcrun metallib -> kvmicro.metallib")
  add_custom_target(kvmicro_metallib ALL DEPENDS ${_kv_metallib})
  add_dependencies(_native kvmicro_metallib)
  install(FILES ${_kv_metallib} DESTINATION kvmicro)
elseif(_kv_metal STREQUAL "ON")
  message(FATAL_ERROR "kvmicro: KVMICRO_METAL=ON but `xcrun -sdk macosx -f metal` failed (install "
                      "Xcode, or its Metal toolchain: xcodebuild -downloadComponent MetalToolchain)")
else()
  message(STATUS "kvmicro: no Metal compiler (xcrun metal); kernels compile at run time from "
                 "embedded source")
endif()

file(GLOB KVMICRO_METAL_HOST CONFIGURE_DEPENDS
     ${CMAKE_CURRENT_SOURCE_DIR}/csrc/metal/*.mm ${CMAKE_CURRENT_SOURCE_DIR}/csrc/metal/*.cpp)
target_sources(_native PRIVATE ${KVMICRO_METAL_HOST} ${_kv_gen}/metal_embedded_source.inc)
target_include_directories(_native PRIVATE ${_kv_gen})
set_source_files_properties(${KVMICRO_METAL_HOST} PROPERTIES OBJECT_DEPENDS
                            ${_kv_gen}/metal_embedded_source.inc)
target_compile_options(_native PRIVATE $<$<COMPILE_LANGUAGE:OBJCXX>:-fobjc-arc>)
target_compile_definitions(_native PRIVATE KVMICRO_WITH_METAL=1)
target_link_libraries(_native PRIVATE "-framework Metal" "-framework Foundation")
message(STATUS "kvmicro: native:metal enabled (kernels: "
               "${KVMICRO_METAL_KERNELS}; metallib: ${_kv_metallib})")
