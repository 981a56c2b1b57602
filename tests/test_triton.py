"""What only the Triton backend has: its launch configuration (queue splits, segment pieces, the
loop forms of the interpreter), the seed op, the raw op's seed argument and the backend choice.
The contract itself is tests/test_contract.py, whose `triton` parameter runs these kernels (in
Triton's interpreter on CPU tensors where there is no GPU: tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports triton).
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton")

import kcl_ext  # noqa: E402
from kcl_ext import _backend_choice, ops, reference  # noqa: E402
from kcl_ext.triton import launch  # noqa: E402
from kcl_ext.triton import ops as triton_ops  # noqa: E402
from _backends import (Ops, assert_close, grad_weights, loss_and_grads, make_inputs,  # noqa: E402
                       reference_float64)

TOOLS = Path(__file__).resolve().parent.parent / "tools"
sys.path.insert(0, str(TOOLS))
import triton_compile_check as compile_check  # noqa: E402  (a developer tool, beside the tests)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not launch.INTERPRETED:
    raise RuntimeError("no GPU and TRITON_INTERPRET is not 1: tests/conftest.py sets it; run the "
                       "tests through pytest from the repository root")


# ----------------------------------------------------------------------------------------------
# The package: kernels, launchers and ops apart; the compile check is a developer tool
# ----------------------------------------------------------------------------------------------
def test_kernels_launchers_and_ops_live_in_their_own_modules():
    import importlib.util
    import inspect

    from kcl_ext.triton import kernels

    def defined_in(module):
        return {name: value for name, value in vars(module).items()
                if getattr(value, "__module__", None) == module.__name__
                or getattr(getattr(value, "fn", None), "__module__", None) == module.__name__}

    jit_kernels = {name for name, value in defined_in(kernels).items() if hasattr(value, "fn")}
    assert {"_select_kernel", "_forward_kernel", "_backward_dqueue_kernel"} <= jit_kernels
    plain = [name for name, value in defined_in(kernels).items()
             if name not in jit_kernels and (inspect.isfunction(value) or inspect.isclass(value))]
    assert plain == [], f"kernels.py should hold @triton.jit kernels only, it defines {plain}"
    for module in (launch, triton_ops):
        jitted = [name for name, value in defined_in(module).items() if hasattr(value, "fn")]
        assert jitted == [], f"{module.__name__} defines @triton.jit kernels {jitted}"
    assert {"LaunchConfig", "_launch", "_forward", "_backward"} <= set(defined_in(launch))
    assert {"kpos_loss_triton", "seed_tensor", "_kpos_forward_impl"} <= set(defined_in(triton_ops))
    assert importlib.util.find_spec("kcl_ext.triton.compile_check") is None
    assert Path(compile_check.__file__).resolve().parent == TOOLS


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("row_blocks,num_tiles,target", [(4, 512, 264), (1, 3, 8), (2, 3, 8),
                                                         (100, 512, 264), (3, 1, 8)])
def test_queue_splits_cover_every_tile_once(row_blocks, num_tiles, target):
    splits, per_split = launch._queue_splits(row_blocks, num_tiles, target)
    covered = [t for s in range(splits) for t in range(s * per_split,
                                                       min((s + 1) * per_split, num_tiles))]
    assert covered == list(range(num_tiles))           # each tile in exactly one split, in order
    assert splits * per_split - num_tiles < per_split   # no empty split
    assert row_blocks * splits <= max(target, row_blocks)


def test_no_queue_means_no_split():
    assert launch._queue_splits(4, 0, 264) == (0, 0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=str)
@pytest.mark.parametrize("dim", compile_check.DIMS)
def test_gpu_launch_configuration(dtype, dim):
    cfg = launch.LaunchConfig.for_gpu(dtype, dim, multi_processor_count=132)
    assert cfg.block_d >= dim and cfg.block_d & (cfg.block_d - 1) == 0      # D whole, padded
    for block in (cfg.block_m, cfg.block_n, cfg.dqueue_block_m, cfg.dqueue_block_n):
        assert block >= 16 and block & (block - 1) == 0                     # tl.dot's minimum
    assert cfg.for_loops and not cfg.upcast_dot
    assert cfg.dot_precision == "ieee"
    assert cfg.target_programs == 264
    # N = 256 with the forward's query blocks: the queue splits fill two waves of the GPU.
    splits, _ = launch._queue_splits(256 // cfg.block_m, 65536 // cfg.block_n, 264)
    assert 256 // cfg.block_m * splits >= 132


def test_tile_offsets_that_overflow_int32_get_a_contiguous_copy():
    small = torch.empty_strided((3, 4), (4, 1), device="meta")
    assert launch._tileable(small, 64, 128) is small
    huge = torch.empty_strided((3, 4), (2**26, 1), device="meta")    # 64 rows x 2^26 > 2^31
    copied = launch._tileable(huge, 64, 128)
    assert copied.is_contiguous() and copied.shape == huge.shape


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's loop forms")
def test_both_loop_forms_give_the_same_bits(monkeypatch):
    """The hot loops run as `for` loops where runtime loop bounds work (compiled kernels, and
    interpreters that can take them) and as `while` loops in Triton 3.6's interpreter; the two
    forms compute the same thing."""
    if not launch._for_loops_work():
        pytest.skip("this interpreter cannot run `for` loops with runtime bounds (Triton 3.6 with "
                    "numpy >= 2.4): only the `while` form runs here, under the contract tests")
    x = make_inputs(21, 70, 24, seed=3)
    weights = grad_weights(21, torch.float32, "cpu")
    results = []
    for for_loops in (False, True):
        monkeypatch.setattr(launch, "_for_loops_work", lambda value=for_loops: value)
        results.append(loss_and_grads(Ops("triton").loss, x, weights, k=3, seed=2,
                                      reduction="none"))
    (loss_while, grads_while), (loss_for, grads_for) = results
    for a, b in zip([loss_while, *grads_while], [loss_for, *grads_for]):
        assert torch.equal(a, b)


def test_class_sums_longer_than_one_piece():
    """k = -1 sums each class in pieces (32 rows in the interpreter, 1024 on the GPU) that are
    added in order: here classes of ~100 queue entries (several pieces of the queue) and ~35
    query rows (two pieces of the batch's class sums in the backward)."""
    n, q, d = 70, 200, 8
    x = make_inputs(n, q, d, classes=2, empty_fraction=0.1, seed=21, device=DEVICE)
    cfg = launch.LaunchConfig(x[0].device, torch.float32, d)
    assert q / 2 > 2 * cfg.piece or DEVICE == "cuda"
    ops_ = Ops("triton")
    state = ops_.forward(*(t.detach() for t in x), -1, 0.1, 0)
    target = state[4]
    labels = x[4].cpu()
    sums = torch.stack([x[2].detach().cpu().double()[labels == c].sum(0) for c in range(2)])
    want = (x[1].detach().cpu().double() + sums[x[3].cpu()]) / state[3].cpu()[:, None].double()
    assert_close(target, want, "triton", torch.float32, "target of k = -1")
    weights = grad_weights(n, torch.float32, DEVICE)
    got = loss_and_grads(ops_.loss, x, weights, k=-1, seed=0, reduction="none")
    ref = loss_and_grads(reference_float64, x, weights, k=-1, seed=0, reduction="none")
    for a, b in zip([got[0], *got[1]], [ref[0], *ref[1]]):
        assert_close(a, b, "triton", torch.float32, "k = -1 with long classes")


# ----------------------------------------------------------------------------------------------
# The seed
# ----------------------------------------------------------------------------------------------
class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


COPIES = ("copy_", "_to_copy", "lift_fresh", "lift_fresh_copy", "_copy_from")


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("seed", [5, -(2**63), 2**63 - 1])
def test_seed_tensor_is_filled_on_the_device_without_a_copy(device, seed):
    """torch.tensor([seed], device=...) would copy from the host (a stream sync on a GPU, and no
    CUDA-graph capture); the seed is filled on the device instead."""
    like = torch.empty(2, 3, device=device)
    with RecordOps() as recorded:
        tensor = triton_ops.seed_tensor(seed, like)
    assert not [op for op in recorded.ops if op.split(".")[-1] in COPIES], recorded.ops
    assert tensor.dtype == torch.int64 and tensor.shape == (1,) and tensor.device == like.device
    if device == "cpu":
        assert int(tensor) == seed


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_drawn_seed_is_the_reference_draw_without_a_copy(device):
    like = torch.empty(2, 3, device=device)
    torch.manual_seed(123)
    with RecordOps() as recorded:
        tensor = triton_ops._draw_seed_impl(like)     # the body of the opaque kcl::triton_seed
    assert not [op for op in recorded.ops if op.split(".")[-1] in COPIES], recorded.ops
    torch.manual_seed(123)
    expected = reference.draw_seed()
    assert tensor.device == like.device and tensor.shape == (1,)
    if device == "cpu":
        assert int(tensor) == expected
        torch.manual_seed(123)
        assert int(triton_ops.seed_tensor(None, like)) == expected   # through the op


def test_raw_forward_rejects_a_bad_seed_tensor():
    x = make_inputs(4, 10, 8, device=DEVICE, requires_grad=(False, False, False))
    for seed, got in ((torch.zeros(1, device=DEVICE), "torch.float32 [1]"),
                      (torch.zeros(2, dtype=torch.int64, device=DEVICE), "torch.int64 [2]"),
                      (torch.zeros(1, dtype=torch.int64, device="meta"), "on meta")):
        with pytest.raises(ValueError, match=re.escape("seed must be an int64 tensor of one "
                                                       "element") + ".*" + re.escape(got)):
            torch.ops.kcl.kpos_forward_triton(*x, seed, 6, 0.07)


# ----------------------------------------------------------------------------------------------
# backend="auto" on CUDA tensors
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cuda_built,expected", [(True, "cuda"), (False, "triton")])
def test_auto_prefers_the_cuda_kernels_when_built(monkeypatch, cuda_built, expected):
    """Without inputs to time (e.g. while tracing), "auto" on CUDA takes the preference order:
    the CUDA kernels when they are built, else Triton."""
    monkeypatch.setattr(_backend_choice, "cuda_kernels_available", lambda: cuda_built)
    assert ops._resolve_backend("auto", torch.device("cuda")) == expected
    assert ops._resolve_backend("auto", torch.device("cpu")) == "cpu"


# ----------------------------------------------------------------------------------------------
# The compile check's resources table
# ----------------------------------------------------------------------------------------------
def test_compile_check_writes_between_the_markers(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(f"intro\n{compile_check.BEGIN}\nold table\n{compile_check.END}\noutro\n")
    compile_check.write_doc(str(doc), "| new | table |")
    assert doc.read_text() == (f"intro\n{compile_check.BEGIN}\n| new | table |\n"
                               f"{compile_check.END}\noutro\n")


def test_triton_doc_has_the_table_markers():
    text = (Path(__file__).resolve().parent.parent / "docs" / "triton.md").read_text()
    assert compile_check.BEGIN in text and compile_check.END in text


def test_kpos_loss_triton_applies_autocast_first():
    """A direct call of kpos_loss_triton under autocast casts like kcl_ext.kpos_loss."""
    x = make_inputs(6, 20, 8, device=DEVICE, seed=4, requires_grad=(False, False, False))
    half = (x[0].bfloat16(), x[1].bfloat16(), x[2], x[3], x[4])
    with torch.autocast(device_type=DEVICE, dtype=torch.bfloat16):
        loss = triton_ops.kpos_loss_triton(*half, k=2, seed=1)
    want = kcl_ext.kpos_loss_reference(half[0].float(), half[1].float(), *half[2:], k=2, seed=1)
    assert loss.dtype == torch.float32
    assert_close(loss, want, "triton", torch.float32, "kpos_loss_triton under autocast")


# ----------------------------------------------------------------------------------------------
# What a GPU would get wrong and the interpreter hides: checked on compiled code and by mocks
# ----------------------------------------------------------------------------------------------
def run_compile_check(*args: str):
    """tools/triton_compile_check.py in a process of its own: it compiles for sm_90a, which this
    process, with TRITON_INTERPRET=1, cannot do."""
    import os
    import subprocess

    # Run from the folder that holds the kcl_ext this process imported (the source tree, or
    # site-packages for an installed wheel): the tool imports kcl_ext from its current directory
    # first, so the child imports the same build.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(TOOLS / "triton_compile_check.py"), *args],
                          cwd=Path(kcl_ext.__file__).resolve().parent.parent, env=env,
                          capture_output=True, text=True, timeout=900)


def test_compiled_row_kernels_reduce_alike_for_strided_inputs_and_use_64_bit_offsets():
    """On a GPU, Triton lays out loads, and so the lanes a tl.sum reduces over, by what it knows
    of the strides: strided inputs must not change the summation order (the contract's bitwise
    test), and the own-key logit must be reduced alike in the merge and the backward (the exact 0
    loss of a row without a valid queue entry). The compile check compares the TTGIR of both
    launches of the host code, and reads the TTIR for 32-bit offsets that span a tensor."""
    run = run_compile_check("--dtypes", "float32", "--dims", "24", "--no-ptx-report",
                            "--kernels", "_forward_merge_kernel", "_backward_rows_kernel",
                            "_target_kernel", "_segment_piece_kernel")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    assert "variants compiled for sm_90a" in run.stdout


def test_offset_reader_tells_whole_tensor_offsets_from_tile_offsets():
    """compile_check's TTIR reader on a hand-written module: an index from the program id times a
    stride in i32 is a finding; the same in i64, a tl.arange index, or an index narrowed
    explicitly are not."""
    ttir = """
  tt.func public @k(%p: !tt.ptr<f32>, %stride_n: i32 loc("stride_n"(#loc)), %dim: i32 loc("dim"(#loc))) attributes {noinline = false} {
    %pid = tt.get_program_id x : i32 loc(#loc)
    %c32_i32 = arith.constant 32 : i32 loc(#loc)
    %r = tt.make_range {end = 32 : i32, start = 0 : i32} : tensor<32xi32> loc(#loc)
    %row0 = arith.muli %pid, %c32_i32 : i32 loc(#loc)
    %s = tt.splat %row0 : i32 -> tensor<32xi32> loc(#loc)
    %rows = arith.addi %s, %r : tensor<32xi32> loc(#loc)
    %st = tt.splat %stride_n : i32 -> tensor<32xi32> loc(#loc)
    %bad = arith.muli %rows, %st : tensor<32xi32> loc(#loc)
    %tile = arith.muli %r, %st : tensor<32xi32> loc(#loc)
    %rows64 = arith.extsi %rows : tensor<32xi32> to tensor<32xi64> loc(#loc)
    %st64 = arith.extsi %st : tensor<32xi32> to tensor<32xi64> loc(#loc)
    %good = arith.muli %rows64, %st64 : tensor<32xi64> loc(#loc)
    %narrow = arith.trunci %rows64 : tensor<32xi64> to tensor<32xi32> loc(#loc)
    %dims = tt.splat %dim : i32 -> tensor<32xi32> loc(#loc)
    %allowed = arith.muli %narrow, %dims : tensor<32xi32> loc(#loc)
    %scalar = arith.muli %pid, %stride_n : i32 loc(#loc)
    tt.return loc(#loc)
  } loc(#loc)
"""
    assert compile_check.wide_offset_findings(ttir) == ["%bad = %rows * %st in int32",
                                                        "%scalar = %pid * %stride_n in int32"]


def test_reduction_reader_spells_out_layouts_and_skips_integers():
    ttgir = """#blocked = #ttg.blocked<{sizePerThread = [1, 4]}>
#blocked1 = #ttg.blocked<{sizePerThread = [4, 1]}>
    %a = "tt.reduce"(%x) <{axis = 1 : i32}> ({
    ^bb0(%u: f32, %v: f32):
      %s = arith.addf %u, %v : f32
      tt.reduce.return %s : f32
    }) : (tensor<32x64xf32, #blocked1>) -> tensor<32xf32, #ttg.slice<{dim = 1, parent = #blocked1}>> loc(#loc9)
    %b = "tt.reduce"(%y) <{axis = 0 : i32}> ({
    ^bb0(%u: i64, %v: i64):
      %s = arith.addi %u, %v : i64
      tt.reduce.return %s : i64
    }) : (tensor<32xi64, #blocked>) -> i64 loc(#loc9)
#loc3 = loc("/x/kcl_ext/triton/kernels.py":42:7)
#loc4 = loc("/y/triton/language/standard.py":290:1)
#loc9 = loc(callsite(#loc4 at #loc3))
"""
    assert compile_check.float_reductions(ttgir) == [
        (42, "tensor<32x64xf32, #ttg.blocked<{sizePerThread = [4, 1]}>>")]


@pytest.mark.skipif(DEVICE != "cpu", reason="the current device is mocked")
def test_launches_run_under_the_inputs_device(monkeypatch):
    """Triton launches on the current device and its current stream, not on the tensors' device:
    inputs on cuda:1 while cuda:0 is current must be launched inside torch.cuda.device(cuda:1).
    Fake CUDA tensors (no GPU here) and a recording torch.cuda.device show which device every
    launch of the forward and the backward ran under."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    entered = []

    class RecordingGuard:
        def __init__(self, device):
            self.device = torch.device(device)

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            entered.pop()

    launch._for_loops_work()      # the interpreter's loop probe runs a kernel: not in fake mode
    launches = []
    monkeypatch.setattr(torch.cuda, "device", RecordingGuard)
    monkeypatch.setattr(launch, "_launch", lambda fn, grid, *args, **kwargs: launches.append(
        (fn.__name__, entered[-1] if entered else None)))
    with FakeTensorMode():
        device = torch.device("cuda:1")
        x = [t.to(device) for t in make_inputs(20, 40, 8, requires_grad=(False,) * 3)]
        seed = torch.full((1,), 3, dtype=torch.int64, device=device)
        for k in (3, -1):
            state = triton_ops._kpos_forward_impl(*x, seed, k, 0.1, True)
            grad_rows = torch.ones(20, device=device)
            triton_ops._kpos_backward_impl(grad_rows, *x, *state[1:], k, 0.1, [True, True, True])
    names = {name for name, _ in launches}
    assert {"_select_kernel", "_forward_kernel", "_forward_merge_kernel",
            "_backward_rows_kernel", "_backward_dqueue_kernel"} <= names, names
    assert [(name, d) for name, d in launches if d != device] == []


def test_float16_queue_gradient_keeps_its_bits_when_tiny(monkeypatch):
    """With the mean over N rows and a long queue, g_i p_ij ~ 1 / (N Q) falls to float16's
    subnormals (6e-8) when the gradient tile is rounded for its tensor-core product: the kernel
    scales it by a power of two, as the CUDA kernels do. Here N Q = 2.1e6 (g_i p_ij ~ 5e-7) and
    k = 0, so that d(queue) is that product alone: its error stays within twice that of rounding
    the exact (float64) result to float16, relative to the largest element."""
    if DEVICE == "cpu":
        # Queue tiles of 2048 rows: 64 of them instead of 4096, for the interpreter's sake.
        set_interpreter = launch.LaunchConfig._set_interpreter

        def large_tiles(cfg, dtype, dim):
            set_interpreter(cfg, dtype, dim)
            cfg.block_n = cfg.dqueue_block_n = 2048

        monkeypatch.setattr(launch.LaunchConfig, "_set_interpreter", large_tiles)
    n, q, d = 16, 131072, 16
    x = make_inputs(n, q, d, dtype=torch.float16, seed=11, device=DEVICE,
                    requires_grad=(False, False, True))
    options = dict(k=0, seed=5, reduction="mean", temperature=0.5)
    got = loss_and_grads(Ops("triton").loss, x, **options)[1][0].double()
    queue64 = x[2].detach().double().requires_grad_()
    exact = loss_and_grads(kcl_ext.kpos_loss_reference,
                           (x[0].double(), x[1].double(), queue64, x[3], x[4]), **options)[1][0]

    def relative_error(a):
        return float((a - exact).abs().max() / exact.abs().max())

    rounding = relative_error(exact.half().double())
    assert 0 < rounding and relative_error(got) <= 2 * rounding, (relative_error(got), rounding)


def test_kpos_loss_triton_takes_a_learnable_temperature_like_kcl_ext_kpos_loss():
    """A direct call with a tensor temperature folds it into the query as kcl_ext.kpos_loss does:
    the same loss as the float form, and the temperature gets its gradient."""
    x = make_inputs(6, 20, 8, device=DEVICE, seed=5, requires_grad=(True, False, False))
    tau = torch.tensor(0.2, requires_grad=True)
    loss = triton_ops.kpos_loss_triton(*x, k=2, temperature=tau, seed=1)
    want = kcl_ext.kpos_loss_reference(*x, k=2, temperature=0.2, seed=1)
    assert_close(loss, want, "triton", torch.float32, "kpos_loss_triton with a tensor temperature")
    loss.backward()
    tau_want = torch.tensor(0.2, requires_grad=True)
    kcl_ext.kpos_loss(*x, k=2, temperature=tau_want, seed=1, backend="reference").backward()
    assert_close(tau.grad, tau_want.grad, "triton", torch.float32, "d loss / d temperature")
