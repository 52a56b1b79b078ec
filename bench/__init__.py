"""Benchmarks of what supervision costs, run from the repository root.

  python -m bench --help              the supervision benchmark (sections 1-8, CPU or GPU mode): supervision.py
  python -m bench.ab_plugin --ref R   a git ref's plugin against the working tree's, in one process (refactors)
  bash bench/gpu_session.sh           everything a lent GPU must measure, in one command under 8 minutes
  python -m bench.gpu_session --help  the same session without the shell wrapper (``--device cpu``: smoke mode)

Modules: timing (clock, interleaved repetitions, paired ratios, peak memory), models (builders and the plain-timm
references), context (mode settings, models built once), report (tables), sections/ (one module per section),
gpu_session (the GPU run: parts, budgets, JSON + Markdown after each item), session_tables (its Markdown),
estimate (its expected H100 time per item), flops (the fvcore counts it reads, gmac_gpu.json).
"""
