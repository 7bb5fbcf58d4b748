# Fails the build when embkern._C references an OpenMP entry point that
# csrc/omp_runtime.cpp does not forward (it would fail at import otherwise).
# Usage: cmake -DNM=<nm> -DMODULE=<path to _C.so> -P check_omp_symbols.cmake
execute_process(COMMAND ${NM} -D -u ${MODULE} OUTPUT_VARIABLE undefined RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "check_omp_symbols: ${NM} -D -u ${MODULE} failed (${rc})")
endif()
string(REGEX MATCHALL "[ \t](GOMP_[A-Za-z0-9_]+|omp_[A-Za-z0-9_]+|kmp_[A-Za-z0-9_]+)" missing "${undefined}")
if(missing)
  string(REPLACE ";" "," missing "${missing}")
  message(FATAL_ERROR "embkern._C calls OpenMP entry points that csrc/omp_runtime.cpp does not forward:"
                      "${missing}. Add them there (libgomp's ABI).")
endif()
