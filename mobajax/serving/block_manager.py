"""Ref-counted KV pages with prefix caching and copy-on-write.

A page holds `page_size` consecutive tokens of one sequence. Full pages are content-addressed by a
chained hash (hash of the previous page's hash and this page's token ids); a later request whose
prompt starts with the same tokens reuses them (token ids are re-checked on every hit). Pages
whose ref count drops to zero stay cached in an LRU free list until they are needed again.
Shared pages (ref count > 1) are never written: a sequence about to write into one gets a
private copy first (copy-on-write, used when `n > 1` completions fork from one prompt).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


def block_hash(previous: int | None, tokens: Sequence[int]) -> int:
    """The chained hash of one full page."""
    return hash((previous, tuple(tokens)))


class BlockManager:
    """Pages 0..num_pages-1 of the pool: allocation, sharing, prefix cache, LRU eviction."""

    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True):
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_pages
        self.free_pages: OrderedDict[int, None] = OrderedDict((p, None) for p in range(num_pages))
        self.page_of_hash: dict[int, int] = {}
        self.hash_of_page: dict[int, int] = {}
        self.tokens_of_page: dict[int, tuple[int, ...]] = {}

    @property
    def num_free(self) -> int:
        return len(self.free_pages)

    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_pages

    def _evict(self, page: int) -> None:
        digest = self.hash_of_page.pop(page, None)
        if digest is not None:
            del self.page_of_hash[digest]
            del self.tokens_of_page[page]

    def allocate(self) -> int:
        """A fresh private page (evicting the least recently freed cached page). Caller checks num_free."""
        page, _ = self.free_pages.popitem(last=False)
        self._evict(page)
        self.ref_counts[page] = 1
        return page

    def acquire(self, page: int) -> None:
        """Take one more reference to a page (a cached free page comes back into use)."""
        if self.ref_counts[page] == 0:
            del self.free_pages[page]
        self.ref_counts[page] += 1

    def release(self, pages: Sequence[int]) -> None:
        """Drop one reference to each page; unreferenced pages join the LRU free list (cache kept)."""
        for page in reversed(pages):  # tail pages are evicted before the prefix they extend
            assert self.ref_counts[page] > 0, f"page {page} released more often than acquired"
            self.ref_counts[page] -= 1
            if self.ref_counts[page] == 0:
                self.free_pages[page] = None

    def match_prefix(self, tokens: Sequence[int]) -> tuple[list[int], list[int]]:
        """(cached pages, their hashes) for the longest cached run of full pages starting `tokens`.

        Never covers the whole of `tokens`: at least the last token must be computed to get its
        logits, so a fully cached prompt drops its last page. The pages are not yet acquired.
        """
        if not self.enable_prefix_caching:
            return [], []
        g = self.page_size
        pages, hashes, previous = [], [], None
        for start in range(0, len(tokens) - 1 - (len(tokens) - 1) % g, g):
            block = tuple(tokens[start : start + g])
            digest = block_hash(previous, block)
            page = self.page_of_hash.get(digest)
            if page is None or self.tokens_of_page[page] != block:
                break
            pages.append(page)
            hashes.append(digest)
            previous = digest
        return pages, hashes

    def register(self, page: int, previous: int | None, tokens: Sequence[int]) -> int:
        """Record a newly computed full page in the prefix cache; returns its chained hash."""
        digest = block_hash(previous, tokens)
        if self.enable_prefix_caching and digest not in self.page_of_hash and page not in self.hash_of_page:
            self.page_of_hash[digest] = page
            self.hash_of_page[page] = digest
            self.tokens_of_page[page] = tuple(tokens)
        return digest

    def is_shared(self, page: int) -> bool:
        return self.ref_counts[page] > 1

    def copy_on_write(self, page: int) -> int:
        """Swap a shared page for a private page (the caller copies the contents on device)."""
        fresh = self.allocate()
        self.release([page])
        return fresh
