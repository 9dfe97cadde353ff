"""The MoBA work list on Hopper: `moba_attention.work_list` by a counting sort in two Pallas Mosaic
GPU kernels, in place of a radix sort of all rows and the XLA kernels that cut its output into
tiles.

Row i < R of keys [R + pad] (`moba_attention.work_keys`' layout: rows kv head first, R / K of
them per kv head) belongs to bucket (chunk keys[i], kv head i // (R / K)), numbered
chunk * K + kv head. The last chunk marks an empty slot (and the pad rows): such rows get no
bucket. Both kernels run `programs_for` CTAs of one warpgroup, CTA c over the c-th of as many
equal ranges of the keys, read 16 bytes at a time:
- `count`: each CTA counts its rows per bucket in shared memory (`red.shared.add`), then adds
  its counts into the global ones (`atom.global.add`, which also returns the CTA's first place
  within each bucket: the rows of the CTAs that added before it come first) and writes both to
  its rows of local and before [P, B'];
- `scatter`: each CTA scans the global counts into every bucket's first sorted row and first
  tile and writes its share of the tiles; then it stages its rows in shared memory by bucket
  (one `atom.shared.add` per row) and writes them out, each bucket's run to consecutive places
  of order (coalesced: a first version that stored each row straight to its place took 150 us
  in this kernel alone, more than the radix sort and its tiling; docs/benchmarks.md, session 23).
So the rows of a bucket are in no fixed order; no row's result depends on it, since the
attention kernels compute every row of a tile alone.

Outputs, as `moba_partials_mosaic.attention_partials_mosaic` reads them: bucket [W] int32, tile
[W, 2] int32 (first sorted row, live rows), tiles_live [1] int32 (the first tiles_live tiles
cover every bucket's rows in bucket order, at most ROWS per tile; the entries after them are
not written) and order [R] int32 (the sorted rows; entries past the live rows not written).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mobajax.pallas.mosaic_rows import ROWS, THREADS, i32, load_i32, store_i32

VECTOR = 16  # bytes of keys per thread load
MAX_BUCKETS = 8192  # `scatter` keeps three int32 counters per bucket in shared memory, and 16-bit ids
NUM_PROGRAMS = 1056  # CTAs of each kernel: eight per SM of an H100 or H200 (three resident at a time)
STAGE = 16384  # rows a CTA stages in shared memory (96 KiB with their buckets)
UNROLL = 4  # rows per thread per step of `scatter`'s write-out


def fits(num_chunks: int, num_kv_heads: int) -> bool:
    """Whether these buckets' counters fit in shared memory (else `moba_attention.work_list`)."""
    return num_chunks * num_kv_heads <= MAX_BUCKETS


def num_tiles(num_rows: int, num_buckets: int) -> int:
    """W: a bound on the tiles of num_rows rows in num_buckets buckets (one partial tile each)."""
    return -(-num_rows // ROWS) + num_buckets


def _ops():
    from jax.experimental.mosaic.gpu import utils as mu
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import arith, gpu, scf

    return mu, ir, arith, gpu, scf


def _lt(a, b):
    _, _, arith, _, _ = _ops()
    return arith.cmpi(arith.CmpIPredicate.slt, a, b)


def _loop_to(bound):
    """A dynamic-count scf.for over i32 0 .. bound - 1: `with _loop_to(n) as i:`."""
    import contextlib

    _, ir, _, _, scf = _ops()

    @contextlib.contextmanager
    def loop():
        op = scf.ForOp(i32(0), bound, i32(1))
        with ir.InsertionPoint(op.body):
            yield op.induction_variable
            scf.YieldOp([])

    return loop()


def _loop(count: int):
    """A static-count scf.for over i32 0 .. count - 1: `with _loop(n) as i:`."""
    return _loop_to(i32(count))


def _half_ptr(ptr, index):
    mu, ir, _, _, _ = _ops()
    return mu.getelementptr(ptr, [index], ir.IntegerType.get_signless(16))


def _ids():
    """(thread in the CTA's warpgroup, CTA) as i32."""
    _, ir, arith, gpu, _ = _ops()
    b32 = ir.IntegerType.get_signless(32)
    return (arith.index_cast(b32, gpu.thread_id(gpu.Dimension.x)),
            arith.index_cast(b32, gpu.block_id(gpu.Dimension.x)))  # fmt: skip


def _word_ptr(ptr, index):
    mu, ir, _, _, _ = _ops()
    return mu.getelementptr(ptr, [index], ir.IntegerType.get_signless(32))


def _rows(keys_ptr, cta, tid, *, num_rows, rows_per_head, num_kv_heads, num_chunks, itemsize, programs, body):
    """body(row, bucket, live) for the rows of this CTA's range of the keys: bucket = chunk * K +
    kv head where live (a row < num_rows whose key is not the last chunk), else a spare counter's
    index, `_padded(B)`."""
    mu, ir, arith, _, _ = _ops()
    b32, i8 = ir.IntegerType.get_signless(32), ir.IntegerType.get_signless(8)
    per_vector = VECTOR // itemsize
    vectors, per_cta = _cta_vectors(num_rows, itemsize, programs)
    first = arith.muli(cta, i32(per_cta))
    end = arith.minsi(arith.addi(first, i32(per_cta)), i32(vectors))
    spare, empty = i32(_padded(num_chunks * num_kv_heads)), i32(num_chunks - 1)
    with _loop(-(-per_cta // THREADS)) as i:
        v = arith.addi(arith.addi(first, tid), arith.muli(i, i32(THREADS)))
        with mu.when(_lt(v, end)):
            at = mu.getelementptr(keys_ptr, [arith.muli(v, i32(VECTOR))], i8)
            words = mu.inline_ptx("ld.global.nc.v4.b32 {$0, $1, $2, $3}, [$4];", at, result_types=[b32] * 4)
            for e in range(per_vector):
                word, shift = words[e * itemsize // 4], 8 * (e * itemsize % 4)
                key = word if itemsize == 4 else arith.andi(arith.shrui(word, i32(shift)), i32((1 << 8 * itemsize) - 1))
                row = arith.addi(arith.muli(v, i32(per_vector)), i32(e))
                live = arith.andi(_lt(row, i32(num_rows)), arith.cmpi(arith.CmpIPredicate.ne, key, empty))
                bucket = arith.addi(arith.muli(key, i32(num_kv_heads)), arith.divui(row, i32(rows_per_head)))
                body(row, arith.select(live, bucket, spare), live)


def _cta_vectors(num_rows: int, itemsize: int, programs: int) -> tuple[int, int]:
    """(16-byte vectors of keys holding num_rows rows, vectors per CTA)."""
    vectors = -(-num_rows // (VECTOR // itemsize))
    return vectors, -(-vectors // programs)


def _padded(num_buckets: int) -> int:
    """B rounded up to whole warpgroups of counters."""
    return -(-num_buckets // THREADS) * THREADS


def _scan(values, tid, scratch):
    """Exclusive scans over the buckets, thread tid owning buckets tid * run .. tid * run + run - 1
    (run = len(values[k])): values[k][j] (i32) is bucket tid * run + j's value in scan k. Returns
    per scan (the sum before the thread's first bucket, the total); scratch: an SMEM pointer to
    4 * len(values) spare words. Ends with a warpgroup barrier."""
    mu, ir, arith, _, _ = _ops()
    b32 = ir.IntegerType.get_signless(32)
    lane, warp = arith.remui(tid, i32(32)), arith.divui(tid, i32(32))
    sums = [functools.reduce(arith.addi, run) for run in values]
    scanned = []
    for k, total in enumerate(sums):  # inclusive within the warp, the warp's sum aside
        for d in (1, 2, 4, 8, 16):
            up = mu.inline_ptx(f"shfl.sync.up.b32 $0, $1, {d}, 0, 0xffffffff;", total, result_types=b32,
                               convergent=True)  # fmt: skip
            total = arith.select(_lt(lane, i32(d)), total, arith.addi(total, up))
        scanned.append(total)
        with mu.when(arith.cmpi(arith.CmpIPredicate.eq, lane, i32(31))):
            store_i32(total, scratch, arith.addi(i32(4 * k), warp))
    mu.warpgroup_barrier()
    out = []
    for k, (total, sum_) in enumerate(zip(scanned, sums)):
        before, grand = arith.subi(total, sum_), i32(0)
        for w in range(THREADS // 32):
            prior = load_i32(scratch, i32(4 * k + w))
            before = arith.addi(before, arith.select(_lt(i32(w), warp), prior, i32(0)))
            grand = arith.addi(grand, prior)
        out.append((before, grand))
    mu.warpgroup_barrier()
    return out


def programs_for(num_rows: int, itemsize: int, num_programs: int = NUM_PROGRAMS) -> int:
    """CTAs of both kernels: num_programs, or more where a CTA's rows would not fit in STAGE."""
    vectors, _ = _cta_vectors(num_rows, itemsize, 1)
    return max(num_programs, -(-vectors // (STAGE // (VECTOR // itemsize))))


@functools.partial(jax.jit, static_argnames=("num_rows", "num_kv_heads", "num_chunks", "num_programs"))
def work_list_mosaic(keys, *, num_rows, num_kv_heads, num_chunks, num_programs=NUM_PROGRAMS):
    """keys [R + pad] uint8/uint16/int32 (`work_keys`' layout, R = num_rows, pad >= 0) -> (bucket
    [W], tile [W, 2], tiles_live [1], order [R]) int32 (the module docstring; W = `num_tiles`).
    num_programs: CTAs of each kernel (more where `programs_for` needs them)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if not fits(num_chunks, num_kv_heads):
        raise ValueError(f"{num_chunks} chunks x {num_kv_heads} kv heads: at most {MAX_BUCKETS} buckets")
    if num_rows % num_kv_heads:
        raise ValueError(f"num_rows={num_rows} must be a multiple of num_kv_heads={num_kv_heads}")
    itemsize = keys.dtype.itemsize
    per_vector = VECTOR // itemsize
    if keys.shape[0] < -(-num_rows // per_vector) * per_vector:
        raise ValueError(f"keys [{keys.shape[0]}] must hold num_rows={num_rows} rounded up to {per_vector}")
    buckets = num_chunks * num_kv_heads
    padded = _padded(buckets)
    run = padded // THREADS  # buckets per thread in the scans
    programs = programs_for(num_rows, itemsize, num_programs)
    stage = _cta_vectors(num_rows, itemsize, programs)[1] * per_vector  # rows of a CTA
    tiles = num_tiles(num_rows, buckets)
    rows = functools.partial(
        _rows, num_rows=num_rows, rows_per_head=num_rows // num_kv_heads, num_kv_heads=num_kv_heads,
        num_chunks=num_chunks, itemsize=itemsize, programs=programs,
    )  # fmt: skip
    ref = plgpu.RefType()

    @plgpu.inline_mgpu(arg_types=(ref,) * 5)
    def count(ctx, keys_ref, counts_ref, local_ref, before_ref, hist_ref):
        del ctx
        mu, ir, arith, _, _ = _ops()
        b32 = ir.IntegerType.get_signless(32)
        keys_ptr, counts, local, before, hist = (
            mu.memref_ptr(r) for r in (keys_ref, counts_ref, local_ref, before_ref, hist_ref)
        )
        tid, cta = _ids()
        for j in range(run):
            store_i32(i32(0), hist, arith.addi(tid, i32(j * THREADS)))
        mu.warpgroup_barrier()
        rows(keys_ptr, cta, tid, body=lambda row, bucket, live: mu.inline_ptx(
            "red.shared.add.u32 [$0], 1;", _word_ptr(hist, bucket), predicate=live))  # fmt: skip
        mu.warpgroup_barrier()
        for j in range(run):  # the atomics all in flight at once: no branch
            b = arith.addi(tid, i32(j * THREADS))
            n, at = load_i32(hist, b), arith.addi(arith.muli(cta, i32(padded)), b)
            taken = mu.inline_ptx(
                "{ .reg .pred p; setp.ne.u32 p, $2, 0; mov.u32 $0, 0; @p atom.global.add.u32 $0, [$1], $2; }",
                _word_ptr(counts, b), n, result_types=b32, has_side_effects=True,
            )  # fmt: skip
            store_i32(n, local, at)
            store_i32(taken, before, at)

    @plgpu.inline_mgpu(arg_types=(ref,) * 12)
    def scatter(ctx, keys_ref, counts_ref, local_ref, before_ref, bucket_ref, tile_ref, live_ref, order_ref,
                first_ref, place_ref, staged_ref, staged_bucket_ref):  # fmt: skip
        del ctx
        mu, ir, arith, _, _ = _ops()
        b32, b16 = ir.IntegerType.get_signless(32), ir.IntegerType.get_signless(16)
        keys_ptr, counts, local, before, bucket_out, tile_out, live_out, order, first, place, staged, staged_bucket = (
            mu.memref_ptr(r) for r in (keys_ref, counts_ref, local_ref, before_ref, bucket_ref, tile_ref, live_ref,
                                       order_ref, first_ref, place_ref, staged_ref, staged_bucket_ref)
        )  # fmt: skip
        tid, cta = _ids()
        mine = [arith.addi(arith.muli(tid, i32(run)), i32(j)) for j in range(run)]
        scratch = _word_ptr(place, i32(2 * padded + 2))
        first_tile = _word_ptr(place, i32(padded + 1))
        # 1. every bucket's first sorted row (first) and first tile (first_tile), totals after them
        counts_of = [load_i32(counts, b) for b in mine]
        tiles_of = [arith.divui(arith.addi(n, i32(ROWS - 1)), i32(ROWS)) for n in counts_of]
        for out, values, (at, total) in zip((first, first_tile), (counts_of, tiles_of),
                                            _scan([counts_of, tiles_of], tid, scratch)):  # fmt: skip
            for b, n in zip(mine, values):
                store_i32(at, out, b)
                at = arith.addi(at, n)
            store_i32(total, out, i32(padded))
        mu.warpgroup_barrier()
        live_tiles = load_i32(first_tile, i32(padded))
        with mu.when(arith.cmpi(arith.CmpIPredicate.eq, arith.addi(cta, tid), i32(0))):
            store_i32(live_tiles, live_out, i32(0))
        # 2. this CTA's share of the tiles: tile w's bucket is the last b whose first tile is <= w
        with _loop(-(-tiles // (programs * THREADS))) as i:
            w = arith.addi(arith.addi(arith.muli(cta, i32(THREADS)), tid), arith.muli(i, i32(programs * THREADS)))
            with mu.when(_lt(w, live_tiles)):
                lo, hi = i32(0), i32(padded)
                for _ in range(padded.bit_length()):
                    mid = arith.divui(arith.addi(lo, hi), i32(2))
                    below = arith.cmpi(arith.CmpIPredicate.sle, load_i32(first_tile, mid), w)
                    lo, hi = arith.select(below, mid, lo), arith.select(below, hi, mid)
                skip = arith.muli(arith.subi(w, load_i32(first_tile, lo)), i32(ROWS))
                size = arith.subi(arith.subi(load_i32(first, arith.addi(lo, i32(1))), load_i32(first, lo)), skip)
                store_i32(lo, bucket_out, w)
                store_i32(arith.addi(load_i32(first, lo), skip), tile_out, arith.muli(w, i32(2)))
                store_i32(arith.minsi(size, i32(ROWS)), tile_out, arith.addi(arith.muli(w, i32(2)), i32(1)))
        mu.warpgroup_barrier()
        # 3. this CTA's rows per bucket: its first place in order (first), its first place in the
        # stage (first_tile) and the next free one (place; a spare one for dead rows at B')
        at = [arith.addi(arith.muli(cta, i32(padded)), b) for b in mine]
        local_of = [load_i32(local, a) for a in at]
        ((staged_at, staged_live),) = _scan([local_of], tid, scratch)
        for b, a, n in zip(mine, at, local_of):
            store_i32(arith.addi(load_i32(first, b), load_i32(before, a)), first, b)
            store_i32(staged_at, first_tile, b)
            store_i32(staged_at, place, b)
            staged_at = arith.addi(staged_at, n)
        mu.warpgroup_barrier()

        def stage_row(row, bucket, live):  # no atomic for a dead row: they would all hit one counter
            at = mu.inline_ptx(
                "{ .reg .pred p; setp.ne.u32 p, $2, 0; mov.u32 $0, 0; @p atom.shared.add.u32 $0, [$1], 1; }",
                _word_ptr(place, bucket), arith.extui(b32, live), result_types=b32, has_side_effects=True,
            )  # fmt: skip
            mu.inline_ptx("st.shared.b32 [$0], $1;", _word_ptr(staged, at), row, predicate=live)
            mu.inline_ptx("st.shared.u16 [$0], $1;", _half_ptr(staged_bucket, at), arith.trunci(b16, bucket),
                          predicate=live)  # fmt: skip

        rows(keys_ptr, cta, tid, body=stage_row)
        mu.warpgroup_barrier()
        # 4. the staged rows out, each to its bucket's first place plus its own in the bucket's
        # run; UNROLL rows per thread at a time, so their shared-memory loads overlap
        with _loop(-(-stage // (UNROLL * THREADS))) as i:
            for u in range(UNROLL):
                j = arith.addi(tid, arith.muli(arith.addi(arith.muli(i, i32(UNROLL)), i32(u)), i32(THREADS)))
                live = _lt(j, staged_live)
                j = arith.select(live, j, i32(0))
                b = mu.inline_ptx("ld.shared.u16 $0, [$1];", _half_ptr(staged_bucket, j), result_types=b16)
                b = arith.minui(arith.extui(b32, b), i32(padded))  # in bounds where j is not live
                out = arith.addi(load_i32(first, b), arith.subi(j, load_i32(first_tile, b)))
                mu.inline_ptx("st.global.b32 [$0], $1;", _word_ptr(order, out), load_i32(staged, j), predicate=live)

    def count_kernel(keys_ref, counts_ref, local_ref, before_ref):
        pl.run_scoped(
            lambda hist: count(keys_ref, counts_ref, local_ref, before_ref, hist), plgpu.SMEM((padded,), jnp.int32)
        )

    def scatter_kernel(keys_ref, counts_ref, local_ref, before_ref, bucket_ref, tile_ref, live_ref, order_ref):
        pl.run_scoped(
            lambda first, place, staged, staged_bucket: scatter(
                keys_ref, counts_ref, local_ref, before_ref, bucket_ref, tile_ref, live_ref, order_ref, first, place,
                staged, staged_bucket,
            ),  # fmt: skip
            plgpu.SMEM((padded + 1,), jnp.int32),  # per bucket: first sorted row, then this CTA's first place
            # per bucket: next place in the stage (a spare one at B'); first tile, then first place in
            # the stage; the scans' scratch
            plgpu.SMEM((2 * padded + 2 + 8,), jnp.int32),
            plgpu.SMEM((stage,), jnp.int32),  # this CTA's live rows, by bucket
            plgpu.SMEM((stage,), jnp.uint16),  # and their buckets
        )

    launch = functools.partial(plgpu.kernel, grid=(programs,), grid_names=("cta",))
    counts = jax.new_ref(jnp.zeros((padded,), jnp.int32))
    local, before = launch(count_kernel, out_type=(jax.ShapeDtypeStruct((programs * padded,), jnp.int32),) * 2)(
        keys, counts
    )
    bucket, tile, live, order = launch(
        scatter_kernel,
        out_type=(
            jax.ShapeDtypeStruct((tiles,), jnp.int32),
            jax.ShapeDtypeStruct((tiles * 2,), jnp.int32),
            jax.ShapeDtypeStruct((1,), jnp.int32),
            jax.ShapeDtypeStruct((num_rows,), jnp.int32),
        ),
    )(keys, counts, local, before)
    return bucket, tile.reshape(tiles, 2), live, order
