"""Compile the Triton kernels for an H100/H200 (sm_90) without a GPU: `python -m tests.triton_compile`.

Triton's interpreter accepts some programs its compiler rejects (and the reverse), so the
interpreter tests alone do not show that the kernels build for the GPU; triton's bundled
compiler and ptxas do, with no device. Run in its own process, without TRITON_INTERPRET
(the kernels are then compiled functions, not interpreted ones). Prints one line a kernel.
"""

from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from vbserve.vblora.ops import triton_ops

TARGET = GPUTarget("cuda", 90, 32)


def build(kernel, pointers: dict[str, str], constexprs: dict[str, object]) -> None:
    """Every argument not a pointer or a constexpr is an int32 (sizes, strides)."""
    signature = {n: "constexpr" if n in constexprs else pointers.get(n, "i32") for n in kernel.arg_names}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=TARGET)
    print(kernel.__name__, constexprs, "cubin bytes:", len(compiled.asm["cubin"]))


def main() -> None:
    for dt, skip, precision in (("bf16", True, "tf32"), ("fp32", False, "ieee")):
        common = {"HAS_SKIP": skip, "PRECISION": precision, "UPCAST": False, "BLOCK_L": 16, "BLOCK_R": 16}
        build(
            triton_ops._lora_shrink_kernel,
            {"x_ptr": f"*{dt}", "a_ptr": f"*{dt}", "index_ptr": "*i64", "skip_ptr": "*i1", "xa_ptr": f"*{dt}"},
            {**common, "K": 4096, "BLOCK_K": 128},
        )
        build(
            triton_ops._lora_expand_kernel,
            {"xa_ptr": f"*{dt}", "bt_ptr": f"*{dt}", "index_ptr": "*i64", "skip_ptr": "*i1", "out_ptr": f"*{dt}"},
            {**common, "BLOCK_N": 128},
        )
    for idx, dt in (("u8", "bf16"), ("i16", "fp32")):
        build(
            triton_ops._compose_kernel,
            {"bank_ptr": "*fp32", "idx_ptr": f"*{idx}", "w_ptr": "*fp32", "dst_ptr": f"*{dt}", "slot_ptr": "*i64"},
            {"K": 2, "BLOCK_S": 32, "BLOCK_B": 256},
        )


if __name__ == "__main__":
    main()
