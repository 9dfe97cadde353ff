"""Per-thread row copies for the Mosaic GPU kernels: a tile's rows (ROWS unless asked for more),
scattered anywhere in a global array, into a tiled SMEM slot that wgmma reads as its A operand,
and back out.

Mosaic GPU moves global memory by whole-warpgroup arrays or by TMA, and one TMA copy per row
costs ~39 ns per SM on the H100 (docs/benchmarks.md, session 14). These copies are Mosaic GPU code
with inline PTX (`plgpu.inline_mgpu`), run by all 128 threads of one warpgroup:
- each thread works out the rows of tile entries t, t + 128, ... (global row to read, global row
  to write, -1 for none) and keeps them in SMEM;
- thread t moves bytes [16 (t % c), 16 (t % c) + 16) of the slot's rows t // c, t // c + 128 / c,
  ... (c = row_bytes / 16 threads per row), so a warp's copies cover whole rows: in with
  `cp.async` 16-byte copies, out with 16-byte `ld.shared` / `st.global` pairs.

A slot is [rows / HALF, HALF, H] (H * itemsize = row_bytes a multiple of 128), tiled (8, 64)
with the 128-byte swizzle (`SLOT_TRANSFORMS`): 16-byte chunk j of row r of an 8-row tile sits
at chunk j ^ (r % 8).
"""

from __future__ import annotations

ROWS = 128  # rows per tile: two compute warpgroups of HALF rows (one wgmma M tile each)
HALF = ROWS // 2
THREADS = 128  # a warpgroup
CHUNK = 16  # bytes per thread copy


def slot_transforms():
    """The slot's SMEM transforms: tiles (8, 64), 128-byte swizzle."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    return plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)


def i32(v):
    """An int32 constant (MLIR)."""
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import arith

    return arith.constant(ir.IntegerType.get_signless(32), v)


def load_i32(ptr, index):
    """ptr[index] of an int32 (or float32, as bits) array (MLIR)."""
    from jax.experimental.mosaic.gpu import utils as mu
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import llvm

    b32 = ir.IntegerType.get_signless(32)
    return llvm.load(b32, mu.getelementptr(ptr, [index], b32))


def store_i32(value, ptr, index):
    """ptr[index] = value, an int32 (MLIR)."""
    from jax.experimental.mosaic.gpu import utils as mu
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import llvm

    llvm.store(value, mu.getelementptr(ptr, [index], ir.IntegerType.get_signless(32)))


def _byte_ptr(ptr, row, row_size, col):
    """ptr + row * row_size + col bytes, in 64-bit arithmetic (arrays over 2 GiB)."""
    from jax.experimental.mosaic.gpu import utils as mu
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import arith

    i8, i64 = ir.IntegerType.get_signless(8), ir.IntegerType.get_signless(64)
    offset = arith.addi(arith.muli(arith.extsi(i64, row), arith.constant(i64, row_size)), arith.extsi(i64, col))
    return mu.getelementptr(ptr, [offset], i8)


def row_copies(*, row_bytes: int, rows_of, num_refs: int = 0, rows: int = ROWS):
    """(gather, scatter, scatter_words) for tiles of `rows` rows (a multiple of HALF) of
    row_bytes bytes.

    rows_of(tile, refs, r) -> (src, dest): MLIR code giving, for entry r (i32) of a tile, the
    global row to gather (in bounds) and the global row to scatter to (-1: none); tile is the
    pointer to the tile's int32 descriptor, refs the pointers of num_refs more global refs.
    gather(tile, src, slot, rows, *refs): slot [rows / HALF, HALF, H]; rows [2, `rows`] int32
      (SMEM) <- each entry's (src, dest); rows src[rows[0, r]] -> slot row r; returns once this
      thread's copies have landed and are visible to wgmma. Call it only after every thread's
      last scatter of the slot (it starts with a warpgroup barrier, so the scatter's reads of
      rows are done).
    scatter(rows, slot, dst): slot row r -> dst[rows[1, r]] where that is >= 0.
    scatter_words(rows, words, dst): words[r] (32-bit, SMEM [`rows`]) -> dst[rows[1, r]] likewise.
    """
    from jax.experimental.mosaic.gpu import utils as mu
    from jax.experimental.pallas import mosaic_gpu as plgpu
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import arith, gpu

    num_rows = rows  # `rows` also names the copies' SMEM argument below
    if num_rows % HALF:
        raise ValueError(f"rows={num_rows}: must be a multiple of {HALF} (whole wgmma M tiles)")
    if row_bytes % 128:
        raise ValueError(f"row_bytes={row_bytes}: must be a multiple of 128 (whole swizzle rows)")
    per_row = row_bytes // CHUNK
    row_step = THREADS // per_row

    def slot_offset(r, col):
        half, rr = arith.divui(r, i32(HALF)), arith.remui(r, i32(HALF))
        j = arith.divui(col, i32(CHUNK))
        tile = arith.addi(arith.muli(arith.divui(rr, i32(8)), i32(row_bytes // 128)), arith.divui(j, i32(8)))
        r8 = arith.remui(rr, i32(8))
        within = arith.addi(arith.muli(r8, i32(128)), arith.muli(arith.xori(arith.remui(j, i32(8)), r8), i32(CHUNK)))
        return arith.addi(arith.addi(arith.muli(half, i32(HALF * row_bytes)), arith.muli(tile, i32(1024))), within)

    def thread():
        """(thread id in the warpgroup, its first slot row, its byte offset in a row)."""
        b32 = ir.IntegerType.get_signless(32)
        tid = arith.remui(arith.index_cast(b32, gpu.thread_id(gpu.Dimension.x)), i32(THREADS))
        return tid, arith.divui(tid, i32(per_row)), arith.muli(arith.remui(tid, i32(per_row)), i32(CHUNK))

    def entry(tid, k):
        """Thread tid's k-th entry, tid + k * THREADS, clamped to the last (a thread past it
        repeats the last entry's work, writing what that entry's thread writes)."""
        r = arith.addi(tid, i32(k * THREADS))
        return r if (k + 1) * THREADS <= num_rows else arith.minui(r, i32(num_rows - 1))

    def live_dest(rows_ptr, r):
        dest = load_i32(rows_ptr, arith.addi(r, i32(num_rows)))
        return dest, arith.cmpi(arith.CmpIPredicate.sge, dest, i32(0))

    slot_type = plgpu.RefType(transforms=slot_transforms())
    ref = plgpu.RefType()

    @plgpu.inline_mgpu(arg_types=(ref, ref, slot_type, ref) + (ref,) * num_refs)
    def gather(ctx, tile, src, slot, rows, *refs):
        del ctx
        src_ptr, slot_ptr, rows_ptr = mu.memref_ptr(src), mu.memref_ptr(slot), mu.memref_ptr(rows)
        tid, row0, col = thread()
        mu.warpgroup_barrier()
        for k in range(-(-num_rows // THREADS)):
            r = entry(tid, k)
            src_row, dest = rows_of(mu.memref_ptr(tile), [mu.memref_ptr(x) for x in refs], r)
            store_i32(src_row, rows_ptr, r)
            store_i32(dest, rows_ptr, arith.addi(r, i32(num_rows)))
        mu.warpgroup_barrier()
        for k in range(num_rows // row_step):
            r = arith.addi(row0, i32(k * row_step))
            from_ = _byte_ptr(src_ptr, load_i32(rows_ptr, r), row_bytes, col)
            to = _byte_ptr(slot_ptr, slot_offset(r, col), 1, i32(0))
            mu.inline_ptx(f"cp.async.cg.shared.global [$0], [$1], {CHUNK};", to, from_)
        mu.inline_ptx("cp.async.commit_group;")
        mu.inline_ptx("cp.async.wait_group 0;")
        mu.inline_ptx("fence.proxy.async.shared::cta;")  # wgmma reads the slot (async proxy)

    @plgpu.inline_mgpu(arg_types=(ref, slot_type, ref))
    def scatter(ctx, rows, slot, dst):
        del ctx
        rows_ptr, slot_ptr, dst_ptr = mu.memref_ptr(rows), mu.memref_ptr(slot), mu.memref_ptr(dst)
        _, row0, col = thread()
        b32 = ir.IntegerType.get_signless(32)
        for k in range(num_rows // row_step):
            r = arith.addi(row0, i32(k * row_step))
            dest, live = live_dest(rows_ptr, r)
            from_ = _byte_ptr(slot_ptr, slot_offset(r, col), 1, i32(0))
            words = mu.inline_ptx("ld.shared.v4.b32 {$0, $1, $2, $3}, [$4];", from_, result_types=[b32] * 4)
            to = _byte_ptr(dst_ptr, dest, row_bytes, col)
            mu.inline_ptx("st.global.v4.b32 [$0], {$1, $2, $3, $4};", to, *words, predicate=live)

    @plgpu.inline_mgpu(arg_types=(ref, ref, ref))
    def scatter_words(ctx, rows, words, dst):
        del ctx
        rows_ptr, words_ptr, dst_ptr = mu.memref_ptr(rows), mu.memref_ptr(words), mu.memref_ptr(dst)
        tid, _, _ = thread()
        for k in range(-(-num_rows // THREADS)):
            r = entry(tid, k)
            dest, live = live_dest(rows_ptr, r)
            to = _byte_ptr(dst_ptr, dest, 4, i32(0))
            mu.inline_ptx("st.global.b32 [$0], $1;", to, load_i32(words_ptr, r), predicate=live)

    return gather, scatter, scatter_words
