"""SASS of the MoBA Mosaic GPU kernels, compiled on a machine without a GPU.

    python tools/mosaic_sass.py --out /tmp/sass [--tokens 131072] [--block 512] [--top-k 3]
        [--module past=variant.py]

Lowers `moba_attention` (heads 32/8, head dim 128, bf16) for CUDA as on a Hopper GPU, then
compiles each Mosaic GPU kernel the way the GPU would: PTX by the CUDA PJRT plugin's
`MosaicGpuCompile` (its wheel is downloaded once; a stub libcuda.so.1 answers its device
queries with compute capability 9.0), SASS by ptxas (CUDA 13: the one on PATH, else triton's)
and triton's cuobjdump. For each kernel (gate, the work list's count and scatter, past, finish)
it writes NAME.ptx, NAME.ptxas (registers, spills, ptxas's advisories) and NAME.sass under
--out, and prints for each wait for one outstanding wgmma group (`WARPGROUP.DEPBAR.LE gsb0,
0x1`) how many instructions and exponentials come before the wait for all of them: whether a
softmax overlaps the P V in flight (docs/benchmarks.md, session 21).

--module KIND=FILE swaps in a variant of a kernel module (KIND: gate, work, past or finish).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile

KERNELS = ("gate", "count", "scatter", "past", "finish")  # the order moba_attention launches them in
# moba_attention's names of their modules (count and scatter: the work list's)
MODULES = {"gate": "mosaic_gate", "work": "mosaic_work", "past": "mosaic_partials", "finish": "mosaic"}
CACHE = pathlib.Path.home() / ".cache" / "mobajax" / "mosaic-sass"
STUB_C = r"""
typedef int CUresult;
CUresult cuGetErrorString(int e, const char **s) { *s = "libcuda stub"; return 0; }
CUresult cuGetErrorName(int e, const char **s) { *s = "STUB"; return 0; }
CUresult cuCtxGetDevice(int *d) { *d = 0; return 0; }
CUresult cuDeviceGetAttribute(int *v, int attr, int dev) { *v = attr == 75 ? 9 : 0; return 0; }
"""  # attributes 75, 76: compute capability major, minor


def plugin_and_stub(jax_version: str) -> tuple[pathlib.Path, pathlib.Path]:
    """The CUDA PJRT plugin library (downloaded once) and a folder holding the libcuda stub."""
    plugin = CACHE / jax_version / "jax_plugins" / "xla_cuda13" / "xla_cuda_plugin.so"
    if not plugin.exists():
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", tmp,
                            f"jax-cuda13-pjrt=={jax_version}"], check=True)  # fmt: skip
            (wheel,) = pathlib.Path(tmp).glob("*.whl")
            zipfile.ZipFile(wheel).extractall(CACHE / jax_version)
    stub = CACHE / "stub"
    if not (stub / "libcuda.so.1").exists():
        stub.mkdir(parents=True, exist_ok=True)
        (stub / "stub.c").write_text(STUB_C)
        subprocess.run(["gcc", "-shared", "-fPIC", "-o", stub / "libcuda.so.1", stub / "stub.c"], check=True)
    return plugin, stub


def lower_kernels(tokens: int, block: int, top_k: int, modules: dict[str, str]) -> list[bytes]:
    """The Mosaic GPU modules of one moba_attention call lowered for CUDA, in launch order."""
    import jax
    import jax.numpy as jnp
    from jax.experimental.mosaic.gpu import core

    from mobajax.pallas import moba_attention as ma
    from mobajax.pallas import mosaic_softmax

    mosaic_softmax.on_hopper = lambda: True  # lower as on a Hopper GPU
    chunk_means = ma.chunk_means_pallas  # a Triton kernel, which needs a GPU to lower: as plain HLO
    ma.chunk_means_pallas = lambda *args, **kwargs: chunk_means(*args, **{**kwargs, "interpret": True})
    for kind, path in modules.items():
        spec = importlib.util.spec_from_file_location(f"variant_{kind}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        setattr(ma, MODULES[kind], module)
    q = jax.ShapeDtypeStruct((tokens, 32, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((tokens, 8, 128), jnp.bfloat16)
    core.KNOWN_KERNELS.clear()
    fn = jax.jit(lambda q, k, v: ma.moba_attention(q, k, v, block_size=block, top_k=top_k))
    fn.trace(q, kv, kv).lower(lowering_platforms=("cuda",))
    return list(core.KNOWN_KERNELS.values())


def compile_to_ptx(module: bytes, plugin: pathlib.Path) -> None:
    """Run in a child process: MosaicGpuCompile dumps the PTX, then fails to load it (no GPU)."""
    import ctypes

    compile_fn = ctypes.CDLL(str(plugin)).MosaicGpuCompile
    compile_fn.argtypes = [ctypes.c_char_p, ctypes.c_int]
    compile_fn.restype = ctypes.c_void_p
    compile_fn(module, len(module))


def overlap_report(sass: str) -> list[str]:
    """For each wait for one outstanding wgmma group: instructions and MUFU.EX2 before the next
    wait for all groups."""
    lines = [line for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", line)]
    report = []
    for i, line in enumerate(lines):
        if "DEPBAR.LE gsb0, 0x1" in line:
            j = next((j for j in range(i + 1, len(lines)) if "DEPBAR.LE gsb0, 0x0" in lines[j]), len(lines))
            exps = sum("MUFU.EX2" in x for x in lines[i:j])
            report.append(
                f"wait for 1 group at {line.split()[0]}: {j - i - 1} instructions, {exps} exp2 before the wait for all"
            )
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=pathlib.Path, help="folder for the PTX, ptxas log and SASS")
    parser.add_argument("--tokens", type=int, default=131072)
    parser.add_argument("--block", type=int, default=512)
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--module", action="append", default=[], metavar="KIND=FILE",
                        help=f"a variant kernel module; KIND is one of {', '.join(MODULES)}")  # fmt: skip
    parser.add_argument("--_compile", help=argparse.SUPPRESS)  # internal: the child process
    args = parser.parse_args(argv)
    if args._compile:
        plugin, module = args._compile.split(":", 1)
        compile_to_ptx(pathlib.Path(module).read_bytes(), pathlib.Path(plugin))
        return
    if bad := [m for m in args.module if "=" not in m]:
        parser.error(f"--module takes KIND=FILE, got {', '.join(bad)}")
    modules = dict(m.split("=", 1) for m in args.module)
    if bad := set(modules) - set(MODULES):
        parser.error(f"--module KIND must be one of {', '.join(MODULES)}, got {', '.join(sorted(bad))}")
    if missing := [path for path in modules.values() if not os.path.isfile(path)]:
        parser.error(f"--module FILE not found: {', '.join(missing)}")
    import jax
    import triton

    plugin, stub = plugin_and_stub(jax.__version__)
    tools = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    ptxas = shutil.which("ptxas") or tools / "ptxas-blackwell"  # CUDA 13 reads the plugin's PTX 9.0
    args.out.mkdir(parents=True, exist_ok=True)
    kernels = lower_kernels(args.tokens, args.block, args.top_k, modules)
    if len(kernels) != len(KERNELS):
        sys.exit(f"expected the {len(KERNELS)} Mosaic kernels {KERNELS}, lowered {len(kernels)}")
    for name, module in zip(KERNELS, kernels):
        with tempfile.TemporaryDirectory() as tmp:
            bytecode = pathlib.Path(tmp) / "module.mlirbc"
            bytecode.write_bytes(module)
            env = dict(os.environ, LD_LIBRARY_PATH=str(stub), MOSAIC_GPU_DUMP_PTX="1", MOSAIC_GPU_DUMP_TO=tmp)
            child = subprocess.run([sys.executable, __file__, "--out", tmp, "--_compile", f"{plugin}:{bytecode}"],
                                   env=env, capture_output=True, text=True)  # fmt: skip
            ptx = list(pathlib.Path(tmp).glob("*.ptx"))
            if len(ptx) != 1:
                sys.exit(f"{name}: the plugin's compiler wrote no PTX:\n{child.stderr[-3000:]}")
            (args.out / f"{name}.ptx").write_text(ptx[0].read_text())
        cubin = args.out / f"{name}.cubin"
        log = subprocess.run([ptxas, "-arch=sm_90a", "-v", args.out / f"{name}.ptx", "-o", cubin],
                             capture_output=True, text=True, check=True)  # fmt: skip
        (args.out / f"{name}.ptxas").write_text(log.stdout + log.stderr)
        sass = subprocess.run([tools / "cuobjdump", "-sass", cubin], capture_output=True, text=True, check=True).stdout
        (args.out / f"{name}.sass").write_text(sass)
        print(f"== {name}")
        ptxas_lines = (log.stdout + log.stderr).splitlines()
        print("\n".join(line for line in ptxas_lines if "Used" in line or "spill" in line or "C75" in line))
        print("\n".join(overlap_report(sass)))


if __name__ == "__main__":
    main()
