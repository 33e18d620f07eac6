// One shim executable per .metal file: the kernels (KV_METAL_SOURCE), the argument bindings
// bindgen.py generated from their attributes (KV_METAL_BINDINGS), and the job runner.
#include KV_METAL_SOURCE
#include KV_METAL_BINDINGS

int main(int argc, char** argv) { return ::msl::run_job(argc, argv); }
