# The CUDA kernels of the kcl library (csrc/cuda/*.cu), compiled into the kcl_ops target when
# configured with -DKCL_WITH_CUDA=ON. CMakeLists.txt includes this file after it has defined
# kcl_ops (and after cmake/TorchFromPython.cmake, which sets CUDA_TOOLKIT_ROOT_DIR,
# KCL_NVIDIA_INCLUDE_DIRS and the default TORCH_CUDA_ARCH_LIST). Compiling needs nvcc, not a GPU.
#   -DKCL_WITH_CUDA=ON                       build the CUDA kernels too
#   -DTORCH_CUDA_ARCH_LIST="8.0;9.0"         architectures (also read from the environment)
#   -DKCL_PTXAS_VERBOSE=ON                   print ptxas's resource report per kernel
option(KCL_WITH_CUDA "Compile the CUDA kernels (csrc/cuda) into kcl_ops" OFF)
option(KCL_PTXAS_VERBOSE "Pass -Xptxas -v to nvcc" OFF)

if(KCL_WITH_CUDA)
  if(NOT CMAKE_CUDA_COMPILER)
    if(DEFINED ENV{CUDA_HOME} AND EXISTS $ENV{CUDA_HOME}/bin/nvcc)
      set(CMAKE_CUDA_COMPILER $ENV{CUDA_HOME}/bin/nvcc)
    elseif(CUDA_TOOLKIT_ROOT_DIR AND EXISTS ${CUDA_TOOLKIT_ROOT_DIR}/bin/nvcc)
      set(CMAKE_CUDA_COMPILER ${CUDA_TOOLKIT_ROOT_DIR}/bin/nvcc)
    endif()
  endif()

  # "8.0;9.0" or "8.0 9.0+PTX" (torch's spelling) -> CMake's "80-real;90-real;90" (+PTX keeps PTX).
  if(DEFINED TORCH_CUDA_ARCH_LIST)
    set(_kcl_arch_list "${TORCH_CUDA_ARCH_LIST}")
  elseif(DEFINED ENV{TORCH_CUDA_ARCH_LIST})
    set(_kcl_arch_list "$ENV{TORCH_CUDA_ARCH_LIST}")
  else()
    set(_kcl_arch_list "8.0;9.0")
  endif()
  string(REPLACE " " ";" _kcl_arch_list "${_kcl_arch_list}")
  set(KCL_CUDA_ARCHITECTURES "")
  foreach(_arch IN LISTS _kcl_arch_list)
    string(REGEX MATCH "^([0-9]+)\\.([0-9]+)([a-z]?)(\\+PTX)?$" _kcl_match "${_arch}")
    if(NOT _kcl_match)
      message(FATAL_ERROR "KCL_WITH_CUDA: cannot read architecture '${_arch}' in TORCH_CUDA_ARCH_LIST")
    endif()
    set(_kcl_sm "${CMAKE_MATCH_1}${CMAKE_MATCH_2}${CMAKE_MATCH_3}")
    if(CMAKE_MATCH_4)
      list(APPEND KCL_CUDA_ARCHITECTURES ${_kcl_sm})
    else()
      list(APPEND KCL_CUDA_ARCHITECTURES ${_kcl_sm}-real)
    endif()
  endforeach()
  set(CMAKE_CUDA_ARCHITECTURES ${KCL_CUDA_ARCHITECTURES})
  enable_language(CUDA)
  # torch's targets ask for C++20 on every language; CMake < 3.26 knows no nvcc flag for it.
  if(NOT CMAKE_CUDA20_STANDARD_COMPILE_OPTION)
    set(CMAKE_CUDA20_STANDARD_COMPILE_OPTION "-std=c++20")
    set(CMAKE_CUDA20_EXTENSION_COMPILE_OPTION "-std=c++20")
  endif()

  file(GLOB KCL_CUDA_SOURCES CONFIGURE_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/csrc/cuda/*.cu)
  target_sources(kcl_ops PRIVATE ${KCL_CUDA_SOURCES})
  set_target_properties(kcl_ops PROPERTIES CUDA_ARCHITECTURES "${KCL_CUDA_ARCHITECTURES}"
                                           CUDA_STANDARD 20 CUDA_STANDARD_REQUIRED ON)
  target_include_directories(kcl_ops PRIVATE ${KCL_NVIDIA_INCLUDE_DIRS})
  target_compile_definitions(kcl_ops PRIVATE KCL_WITH_CUDA)
  # The flags setup.py's CUDAExtension uses (torch.utils.cpp_extension.COMMON_NVCC_FLAGS + ours).
  target_compile_options(kcl_ops PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:
    -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
    -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
    --expt-relaxed-constexpr -O3 --use_fast_math -lineinfo>)
  if(KCL_PTXAS_VERBOSE)
    target_compile_options(kcl_ops PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-Xptxas=-v>)
  endif()
  message(STATUS "kcl_ext (CMake): + CUDA kernels (${CMAKE_CUDA_COMPILER}, "
                 "architectures ${KCL_CUDA_ARCHITECTURES})")
endif()
