"""BlockManager: ref counts, prefix matching with token re-check, LRU eviction, copy-on-write."""

import pytest

from mobajax.serving.block_manager import BlockManager, block_hash


def register_prompt(bm: BlockManager, pages, tokens):
    previous = None
    for i, page in enumerate(pages):
        previous = bm.register(page, previous, tokens[i * bm.page_size : (i + 1) * bm.page_size])


def test_allocate_release_and_usage():
    bm = BlockManager(4, 2)
    pages = [bm.allocate() for _ in range(3)]
    assert bm.num_free == 1 and bm.usage() == 0.75
    bm.release(pages)
    assert bm.num_free == 4 and all(r == 0 for r in bm.ref_counts)
    with pytest.raises(AssertionError, match="released more often"):
        bm.release([pages[0]])


def test_prefix_match_reuses_full_pages_but_not_the_last_token():
    bm = BlockManager(8, 2)
    tokens = [1, 2, 3, 4, 5, 6]
    pages = [bm.allocate() for _ in range(3)]
    register_prompt(bm, pages, tokens)
    bm.release(pages)
    assert bm.match_prefix(tokens)[0] == pages[:2]  # the whole prompt is cached: recompute its last page
    assert bm.match_prefix(tokens + [7])[0] == pages
    assert bm.match_prefix([1, 2, 9, 9, 5, 6, 7])[0] == pages[:1]  # chain breaks at the second page
    assert bm.match_prefix([9, 2, 3, 4, 5])[0] == []


def test_hash_collision_is_caught_by_token_check():
    bm = BlockManager(4, 2)
    page = bm.allocate()
    bm.register(page, None, [1, 2])
    bm.tokens_of_page[page] = (7, 7)  # as if another block had hashed to the same value
    assert bm.match_prefix([1, 2, 3])[0] == []


def test_lru_eviction_takes_the_oldest_free_page_and_forgets_its_hash():
    bm = BlockManager(2, 1)
    a, b = bm.allocate(), bm.allocate()
    bm.register(a, None, [10])
    bm.register(b, None, [20])
    bm.release([a])
    bm.release([b])
    fresh = bm.allocate()
    assert fresh == a and block_hash(None, [10]) not in bm.page_of_hash
    assert bm.match_prefix([20, 0])[0] == [b]


def test_disabled_prefix_caching_never_matches():
    bm = BlockManager(4, 2, enable_prefix_caching=False)
    page = bm.allocate()
    bm.register(page, None, [1, 2])
    assert bm.match_prefix([1, 2, 3]) == ([], [])


def test_acquire_cached_free_page_and_copy_on_write():
    bm = BlockManager(4, 2)
    page = bm.allocate()
    bm.acquire(page)
    assert bm.is_shared(page)
    fresh = bm.copy_on_write(page)
    assert fresh != page and bm.ref_counts[page] == 1 and bm.ref_counts[fresh] == 1
    bm.release([page, fresh])
    bm.acquire(page)  # a cached free page comes back into use
    assert page not in bm.free_pages and bm.ref_counts[page] == 1
