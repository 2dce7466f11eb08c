"""Data curation: filters, near-duplicate removal, retrieval, clustering and balanced sampling.

Each command lives in its own module here; see ``vssl.curate.cli`` and docs/architecture.md.
"""
