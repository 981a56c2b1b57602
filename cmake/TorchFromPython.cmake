# Finds libtorch through a Python environment's torch, and helps a CUDA build of torch configure
# where the CUDA toolkit lacks the libraries that the nvidia-* wheels install (nvrtc, cuBLAS
# headers): torch's CMake config insists on finding them even for a CPU-only library.
#   -DPython3_EXECUTABLE=/path/to/venv/bin/python   (default: python3 on PATH)
if(NOT Python3_EXECUTABLE)
  find_program(Python3_EXECUTABLE NAMES python3 python)
endif()
if(Python3_EXECUTABLE)
  execute_process(COMMAND ${Python3_EXECUTABLE} -c "import torch; print(torch.utils.cmake_prefix_path)"
                  OUTPUT_VARIABLE _kcl_torch_prefix OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _kcl_rc)
  if(_kcl_rc EQUAL 0)
    list(APPEND CMAKE_PREFIX_PATH ${_kcl_torch_prefix})
  endif()
  execute_process(COMMAND ${Python3_EXECUTABLE} -c
                  "import glob, site; print(';'.join(sorted(p for s in site.getsitepackages() for p in glob.glob(s + '/nvidia/cu*'))))"
                  OUTPUT_VARIABLE _kcl_nvidia_roots OUTPUT_STRIP_TRAILING_WHITESPACE)
endif()

if(NOT DEFINED CUDA_TOOLKIT_ROOT_DIR AND EXISTS /usr/local/cuda)
  set(CUDA_TOOLKIT_ROOT_DIR /usr/local/cuda)
endif()
foreach(_root IN LISTS _kcl_nvidia_roots)
  if(NOT CUDA_nvrtc_LIBRARY)
    file(GLOB _nvrtc ${_root}/lib/libnvrtc.so*)
    list(FILTER _nvrtc EXCLUDE REGEX "builtins|alt")
    if(_nvrtc)
      list(GET _nvrtc 0 _nvrtc0)
      set(CUDA_nvrtc_LIBRARY ${_nvrtc0} CACHE FILEPATH "nvrtc from the nvidia wheels")
    endif()
  endif()
  if(EXISTS ${_root}/include)
    list(APPEND KCL_NVIDIA_INCLUDE_DIRS ${_root}/include)
  endif()
endforeach()

# Without an explicit list, torch's config compiles and runs a probe for the visible GPUs, which
# fails on machines without one.
if(NOT DEFINED TORCH_CUDA_ARCH_LIST AND NOT DEFINED ENV{TORCH_CUDA_ARCH_LIST})
  set(TORCH_CUDA_ARCH_LIST "8.0;9.0")
endif()
