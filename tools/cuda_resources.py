"""The ptxas resource report of the CUDA kernels: parse a build log made with `-Xptxas -v`.

    python tools/cuda_resources.py BUILD_LOG --check             # fail if any kernel spills, or a
                                                                 # tile kernel's static shared memory
                                                                 # exceeds kTileStaticSmemBytes
    python tools/cuda_resources.py BUILD_LOG --write docs/cuda_resources.md

`make cuda-resources` rebuilds with KCL_PTXAS_VERBOSE=1 and regenerates the document;
`make build-cuda-check` (part of `make test`) runs the check on its own build log.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from dataclasses import dataclass

COMPILING = re.compile(r"ptxas info\s*: Compiling entry function '(?P<name>[^']+)' for '(?P<arch>sm_\w+)'")
PROPERTIES = re.compile(r"ptxas info\s*: Function properties for (?P<name>\S+)")
FRAME = re.compile(r"(?P<stack>\d+) bytes stack frame, (?P<stores>\d+) bytes spill stores, "
                   r"(?P<loads>\d+) bytes spill loads")
USED = re.compile(r"ptxas info\s*: Used (?P<regs>\d+) registers(?P<rest>.*)")
SMEM = re.compile(r"(\d+) bytes smem")


@dataclass
class Kernel:
    mangled: str
    arch: str
    registers: int = 0
    smem: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    name: str = ""


def demangle(names: list[str]) -> list[str]:
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                             check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return names
    return out if len(out) == len(names) else names


def short_name(demangled: str) -> str:
    """`void kcl::cuda::(anonymous namespace)::forward_partial_kernel<kcl::cuda::WmmaEngine<c10::Half>, c10::Half>(...)`
    -> `forward_partial_kernel<WmmaEngine<Half>>`."""
    name = demangled.replace("(anonymous namespace)::", "")
    name = name.split("(", 1)[0]
    name = re.sub(r"^void ", "", name)
    for prefix in ("kcl::cuda::", "kcl::", "c10::"):
        name = name.replace(prefix, "")
    # Drop the scalar type that repeats the engine's: Kernel<Engine<T>, T> -> Kernel<Engine<T>>.
    name = re.sub(r"<(\w+Engine<(\w+)>), \2>", r"<\1>", name)
    # A policy's template arguments repeat the engine's: tile_kernel<Engine<T>, Policy<T, ...>>
    # -> tile_kernel<Engine<T>, Policy>.
    name = re.sub(r"(\w+Policy)<[^<>]*>", r"\1", name)
    return name.replace(" >", ">")


def tile_static_smem_limit() -> int:
    """tiles::kTileStaticSmemBytes of csrc/kcl/tile_engine_choice.h: the static shared memory that
    the engine choice (tensor_cores_usable) counts for a tile kernel, as
    kMaxColumnVectors * kMmaTileRows * sizeof(float)."""
    import os
    header = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "csrc", "kcl",
                          "tile_engine_choice.h")
    with open(header) as f:
        text = f.read()
    value = {name: int(re.search(rf"constexpr \w+ {name} = (\d+);", text).group(1))
             for name in ("kMaxColumnVectors", "kMmaTileRows")}
    assert "kTileStaticSmemBytes = kMaxColumnVectors * kMmaTileRows * sizeof(float);" in text, \
        "tools/cuda_resources.py: update tile_static_smem_limit() to the header's formula"
    return value["kMaxColumnVectors"] * value["kMmaTileRows"] * 4


def parse(log: str) -> list[Kernel]:
    kernels: dict[tuple[str, str], Kernel] = {}
    frames: dict[str, tuple[int, int, int]] = {}
    current = None
    pending_frame = None
    for line in log.splitlines():
        if m := COMPILING.search(line):
            current = kernels.setdefault((m["name"], m["arch"]), Kernel(m["name"], m["arch"]))
            continue
        if m := PROPERTIES.search(line):
            pending_frame = m["name"]
            continue
        if (m := FRAME.search(line)) and pending_frame:
            frames[pending_frame] = (int(m["stack"]), int(m["stores"]), int(m["loads"]))
            if current is not None and current.mangled == pending_frame:
                current.stack, current.spill_stores, current.spill_loads = frames[pending_frame]
            pending_frame = None
            continue
        if (m := USED.search(line)) and current is not None:
            current.registers = int(m["regs"])
            s = SMEM.search(m["rest"])
            current.smem = int(s.group(1)) if s else 0
            current = None
    result = list(kernels.values())
    for kernel in result:  # "Function properties" may come before or after "Compiling"
        if kernel.mangled in frames:
            kernel.stack, kernel.spill_stores, kernel.spill_loads = frames[kernel.mangled]
    for kernel, pretty in zip(result, demangle([k.mangled for k in result])):
        kernel.name = short_name(pretty)
    return sorted(result, key=lambda k: (k.arch, k.name))


def markdown(kernels: list[Kernel], header: str) -> str:
    lines = [header, "",
             "| arch | kernel | registers | shared memory (bytes) | stack frame (bytes) | "
             "spill stores (bytes) | spill loads (bytes) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for k in kernels:
        lines.append(f"| {k.arch} | `{k.name}` | {k.registers} | {k.smem} | {k.stack} | "
                     f"{k.spill_stores} | {k.spill_loads} |")
    spilling = [k for k in kernels if k.spill_stores or k.spill_loads]
    lines += ["", f"{len(kernels)} kernels; " +
              ("no kernel spills to local memory." if not spilling else
               f"{len(spilling)} spill: " + ", ".join(f"{k.name} ({k.arch})" for k in spilling))]
    return "\n".join(lines) + "\n"


def _run(cmd) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def source_state() -> str:
    commit = _run(["git", "rev-parse", "--short", "HEAD"]) or "unknown"
    dirty = _run(["git", "status", "--porcelain", "--", "csrc"])
    return commit + (" (csrc/ modified)" if dirty else "")


def nvcc_version() -> str:
    import os
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    for nvcc in (os.path.join(home, "bin", "nvcc"), "nvcc"):
        out = _run([nvcc, "--version"])
        if out:
            release = [line for line in out.splitlines() if "release" in line]
            return "nvcc " + (release[0].split("release", 1)[1].strip(" ,") if release else out)
    return "nvcc (version unknown)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("log", help="build log with ptxas -v output")
    p.add_argument("--check", action="store_true", help="exit 1 if a kernel spills")
    p.add_argument("--write", metavar="MD", help="replace the table section of this markdown file")
    args = p.parse_args(argv)
    with open(args.log) as f:
        kernels = parse(f.read())
    if not kernels:
        print(f"cuda_resources: no ptxas report in {args.log} (built with KCL_PTXAS_VERBOSE=1?)",
              file=sys.stderr)
        return 1
    header = ("<!-- generated by tools/cuda_resources.py: do not edit below -->\n\n"
              f"Built from commit {source_state()} with {nvcc_version()}.")
    table = markdown(kernels, header)
    if args.write:
        with open(args.write) as f:
            text = f.read()
        marker = "<!-- generated by tools/cuda_resources.py"
        text = text.split(marker, 1)[0].rstrip() + "\n\n" + table
        with open(args.write, "w") as f:
            f.write(text)
    elif not args.check:
        print(table, end="")
    spilling = [k for k in kernels if k.spill_stores or k.spill_loads]
    if args.check and spilling:
        for k in spilling:
            print(f"cuda_resources: {k.name} ({k.arch}) spills: {k.spill_stores} bytes stored, "
                  f"{k.spill_loads} bytes loaded", file=sys.stderr)
        return 1
    if args.check:
        limit = tile_static_smem_limit()
        too_big = [k for k in kernels if k.name.startswith("tile_kernel<") and k.smem > limit]
        for k in too_big:
            print(f"cuda_resources: {k.name} ({k.arch}) has {k.smem} bytes of static shared memory, "
                  f"more than the {limit} that tensor_cores_usable counts "
                  "(kTileStaticSmemBytes, csrc/kcl/tile_engine_choice.h)", file=sys.stderr)
        if too_big:
            return 1
        tiles = [k.smem for k in kernels if k.name.startswith("tile_kernel<")]
        print(f"cuda_resources: {len(kernels)} kernels, none spills; tile kernels' static shared "
              f"memory at most {max(tiles, default=0)} bytes (limit {limit})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
