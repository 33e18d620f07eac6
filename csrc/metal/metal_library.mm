// Where native:metal's kernels come from, once per device: the metallib CMake built with
// `xcrun metal` + `xcrun metallib` and installed beside the extension (kvmicro.metallib next to
// _native*.so), else the .metal sources embedded at build time (metal_embedded_source.inc,
// written by cmake/metal_embed.cmake with every #include "..." inlined) compiled at run time by
// newLibraryWithSource. The context records which ran, and why the first was not used.
#include <dlfcn.h>

#include <string>
#include <vector>

#include "metal/metal_common.h"

#if __has_include("metal_embedded_source.inc")
// kEmbeddedMetalCount, kEmbeddedMetalNames[], kEmbeddedMetalSources[]
#include "metal_embedded_source.inc"
#define KV_HAVE_EMBEDDED_SOURCE 1
#else
#define KV_HAVE_EMBEDDED_SOURCE 0
#endif

namespace kvmicro {
namespace metal {

namespace {

// The directory of the loaded extension module (this file is linked into it).
std::string module_dir() {
  Dl_info info;
  if (dladdr(reinterpret_cast<const void*>(&module_dir), &info) == 0 || !info.dli_fname)
    return std::string();
  std::string path = info.dli_fname;
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? std::string(".") : path.substr(0, slash);
}

bool has_bfloat_functions(const std::vector<id<MTLLibrary>>& libraries) {
  for (id<MTLLibrary> library : libraries) {
    NSArray<NSString*>* names = library.functionNames;
    for (NSUInteger i = 0; i < names.count; ++i)
      if (to_std([names objectAtIndex:i]).find("_bf16") != std::string::npos) return true;
  }
  return false;
}

}  // namespace

void load_library(Context& ctx) {
  @autoreleasepool {
    std::string why_not;
    const std::string dir = module_dir();
    if (dir.empty()) {
      why_not = "dladdr found no path for the extension";
    } else {
      const std::string path = dir + "/kvmicro.metallib";
      NSError* err = nil;
      NSURL* url = [NSURL fileURLWithPath:[NSString stringWithUTF8String:path.c_str()]];
      id<MTLLibrary> lib = [ctx.device newLibraryWithURL:url error:&err];
      if (lib) {
        ctx.libraries.push_back(lib);
        ctx.library_origin = "metallib " + path;
      } else {
        why_not = path + ": " + (err ? to_std(err.localizedDescription) : std::string("not loaded"));
      }
    }
    if (ctx.libraries.empty()) {
#if KV_HAVE_EMBEDDED_SOURCE
      for (int i = 0; i < kEmbeddedMetalCount; ++i) {
        NSError* err = nil;
        NSString* source = [NSString stringWithUTF8String:kEmbeddedMetalSources[i]];
        if (!source)
          KV_METAL_FAIL(std::string("[metal] embedded ") + kEmbeddedMetalNames[i] +
                            " is not valid UTF-8", nil);
        id<MTLLibrary> lib = [ctx.device newLibraryWithSource:source options:nil error:&err];
        if (!lib)
          KV_METAL_FAIL(std::string("[metal] newLibraryWithSource(") + kEmbeddedMetalNames[i] +
                            ") failed", err);
        ctx.libraries.push_back(lib);
      }
      ctx.library_origin = "embedded metal/*.metal compiled at run time (no metallib: " +
                           why_not + ")";
#else
      throw UnsupportedError("[metal] no kernels: no metallib (" + why_not +
                             ") and this build embedded no .metal source");
#endif
    }
    ctx.bfloat = [ctx.device supportsFamily:MTLGPUFamilyApple6] && has_bfloat_functions(ctx.libraries);
  }
}

}  // namespace metal
}  // namespace kvmicro
