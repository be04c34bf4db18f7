"""``python -m tritonadam.bench``: optimizer-step throughput against PyTorch and the copy roofline.

Modules: ``workloads`` (dtype setups, byte formulas, shape profiles), ``providers`` (the
optimizers compared), ``check`` (float64 reference), ``timing`` (events, flushes, launch
counts), ``runner`` (the loop), ``report`` (header, roofline, goals, table/md/csv/json/plot),
``tuning`` (``--tuning``: first-use tuning cost and tuned vs fixed configs, GPU only).
Importing this package imports neither torch nor triton.
"""
