"""Plumbing shared by the commands and long jobs of both packages: console and logging (``console``), stopping on
SIGINT/SIGTERM and naming a full disk (``interrupt``), device and DataLoader worker choice (``runtime``), files that
installed packages ship (``resources``), file hashes (``hashing``) and credentials hidden from text (``redaction``).

May import: :mod:`dune_cache.errors` only. Knows nothing of caches or teachers.
"""
