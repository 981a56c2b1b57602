"""Compile every kpos_loss Triton kernel for a GPU target without a GPU (Triton ships ptxas).

    python -m kcl_ext.triton.compile_check [--arch 90]

The interpreter (TRITON_INTERPRET=1), which the CPU tests use, runs kernels as Python and accepts
code that the compiler rejects; this check catches that on machines without a GPU. It compiles
with the block sizes that the launchers use on that GPU, for each feature dtype.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

FEATURE_POINTERS = ("query_ptr", "key_ptr", "queue_ptr", "dq_ptr", "dkey_ptr", "dqueue_ptr")
ACC_POINTERS = ("part_max_ptr", "part_sum_ptr", "part_pos_ptr", "loss_ptr", "lse_ptr", "grad_ptr",
                "dq_part_ptr")
FLOAT_SCALARS = ("scale2", "inv_tau")
TRITON_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}


def _signature(fn, feature: str, constexprs: dict) -> dict:
    acc = "fp64" if feature == "fp64" else "fp32"
    types = {}
    for name in fn.arg_names:
        if name in constexprs:
            types[name] = "constexpr"
        elif name in FEATURE_POINTERS:
            types[name] = "*" + feature
        elif name in ACC_POINTERS:
            types[name] = "*" + acc
        elif name.endswith("_ptr"):
            types[name] = "*i64"
        elif name in FLOAT_SCALARS:
            types[name] = "fp32"
        else:
            types[name] = "i32"
    return types


def compile_all(arch: int = 90, dtypes=("bfloat16", "float16", "float32", "float64"), dim=128,
                verbose=True) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset: it compiles, "
                           "it does not interpret")
    import torch
    import triton
    from triton.backends.compiler import GPUTarget

    from . import kernels as K

    target = GPUTarget("cuda", arch, 32)
    compiled = 0
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        cfg = K.LaunchConfig.for_gpu(dtype, dim, multi_processor_count=132)
        feature = TRITON_TYPES[dtype_name]
        common = {"BLOCK_M": cfg.block_m, "BLOCK_D": cfg.block_d}
        dots = {"DOT_PRECISION": cfg.dot_precision, "UPCAST": cfg.upcast_dot}
        launches = [
            (K._select_kernel, {"ROWS": cfg.select_rows, "BLOCK": cfg.select_block,
                                "MAX_EXTRACT": K.MAX_EXTRACT_PASSES}),
            (K._forward_kernel, {**common, **dots, "BLOCK_N": cfg.block_n}),
            (K._forward_merge_kernel, common),
            (K._backward_dq_kernel, {**common, **dots, "BLOCK_N": cfg.backward_block_n}),
            (K._backward_finish_kernel, {**common, "NEED_QUERY": True, "NEED_KEY": True}),
            (K._backward_dqueue_kernel, {**common, **dots, "BLOCK_N": cfg.backward_block_n}),
        ]
        if dtype_name != dtypes[0]:
            launches = launches[1:]      # the selection kernel does not depend on the dtype
        for fn, constexprs in launches:
            start = time.time()
            source = triton.compiler.ASTSource(fn=fn, signature=_signature(fn, feature, constexprs),
                                               constexprs=constexprs)
            kernel = triton.compile(source, target=target,
                                    options={"num_warps": cfg.num_warps,
                                             "num_stages": cfg.num_stages})
            compiled += 1
            if verbose:
                print(f"sm_{arch} {dtype_name:>8} {fn.__name__:<26} ok  "
                      f"{time.time() - start:5.1f} s  shared {kernel.metadata.shared} B")
    return compiled


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--dtypes", nargs="+",
                        default=["bfloat16", "float16", "float32", "float64"])
    parser.add_argument("--dim", type=int, default=128)
    args = parser.parse_args(argv)
    compile_all(args.arch, tuple(args.dtypes), args.dim)
    return 0


if __name__ == "__main__":
    sys.exit(main())
