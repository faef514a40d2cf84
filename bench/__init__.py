"""Benchmarks (not tests): event-loop lag, bot overhead and throughput, measured in one run.

Run ``python -m bench`` from the repository root; see ``bench/README.md``.
"""
