"""Shared fixtures of the Pallas kernel tests: paged pools with poisoned free space, GPU skips."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest


@functools.cache
def _has_gpu() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU visible to jax")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _semantics_tests_on_cpu(request):
    """Tests not marked gpu check semantics (interpret mode against references in exact float32).
    Where a GPU is visible they still run on the CPU backend: the GPU's default float32 dot is
    TF32, which would fail a float32 tolerance without any kernel being wrong."""
    if "gpu" in request.keywords or not _has_gpu():
        yield
        return
    with jax.default_device(jax.devices("cpu")[0]):
        yield


@pytest.fixture
def lower_for_gpu(monkeypatch):
    """Lower a jitted function for CUDA on a machine without a GPU (an H100 assumed), which runs
    the whole Pallas -> Triton IR lowering of its kernels; returns the StableHLO text."""
    try:
        from jax._src.pallas.triton import gpu_info, pallas_call_registration
    except ImportError as err:  # private modules: skip rather than fail if jax moves them
        pytest.skip(f"Pallas Triton lowering internals not found: {err}")
    h100 = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100)
    monkeypatch.setattr(pallas_call_registration.gpu_info_lib, "get_gpu_info", lambda: h100)

    def lower(fn, *args, **kwargs):
        return fn.trace(*args, **kwargs).lower(lowering_platforms=("cuda",)).as_text()

    return lower


class PagedKV:
    """A random page pool [P, G, K, H] holding B sequences of kv_lens tokens at shuffled pages.

    Every slot no sequence owns (free pages, the tail of partial pages) is NaN, and page-table
    entries past a sequence's last page are out-of-range garbage, so a kernel that reads them or
    misses a mask fails. `dense(b)` is sequence b's K/V as contiguous [kv_len, K, H] arrays.
    """

    def __init__(self, rng, kv_lens, page_size, kv_heads, head_dim, dtype, spare_pages=3):
        self.kv_lens = np.asarray(kv_lens, np.int32)
        g = page_size
        need = [-(-int(n) // g) for n in self.kv_lens]
        p_max = max(1, max(need) + 1)
        num_pages = sum(need) + spare_pages
        order = rng.permutation(num_pages)
        table = rng.integers(num_pages + 5, 2**30, size=(len(need), p_max)).astype(np.int32)
        owned = np.zeros((num_pages, g), bool)
        used = 0
        for b, n in enumerate(need):
            table[b, :n] = order[used : used + n]
            used += n
            for s in range(int(self.kv_lens[b])):
                owned[table[b, s // g], s % g] = True
        shape = (num_pages, g, kv_heads, head_dim)
        k = rng.standard_normal(shape).astype(np.float32)
        v = rng.standard_normal(shape).astype(np.float32)
        k[~owned] = np.nan
        v[~owned] = np.nan
        self.page_table = jnp.asarray(table)
        self.k_pages = jnp.asarray(k, dtype)
        self.v_pages = jnp.asarray(v, dtype)
        self.page_size = g

    def dense(self, b):
        n = int(self.kv_lens[b])
        rows = np.asarray(self.page_table[b])[np.arange(n) // self.page_size]
        slots = np.arange(n) % self.page_size
        return self.k_pages[rows, slots], self.v_pages[rows, slots]


@pytest.fixture
def paged_kv():
    return PagedKV


def random_qkv(seed, t, s, n, kv, h, dtype):
    """Standard-normal q [t, n, h] and k, v [s, kv, h] in dtype."""
    rng = np.random.default_rng(seed)
    return tuple(
        jnp.asarray(rng.standard_normal(shape), dtype) for shape in ((t, n, h), (s, kv, h), (s, kv, h))
    )


def assert_close(actual, expected, dtype, what=""):
    """float32: 2e-5 abs + rel; bfloat16 (bf16 output rounding and bf16 probabilities in the
    P.V product): 2e-2. NaN never passes."""
    tol = 2e-5 if dtype == jnp.float32 else 2e-2
    actual = np.asarray(jnp.asarray(actual, jnp.float32))
    expected = np.asarray(jnp.asarray(expected, jnp.float32))
    assert not np.isnan(actual).any(), f"{what}: NaN in output"
    np.testing.assert_allclose(actual, expected, atol=tol, rtol=tol, err_msg=what)
