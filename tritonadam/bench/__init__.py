"""``python -m tritonadam.bench``: optimizer-step throughput against PyTorch and the copy roofline.

Modules: ``workloads`` (dtype setups, byte formulas, shape profiles), ``providers`` (the
optimizers compared), ``check`` (float64 reference), ``timing`` (events, flushes, launch
counts), ``tuning`` (launch-config sweeps and first-use tuning: config lists, ranking),
``runner`` (the loop over cases), ``report`` (header, roofline, goals, table/md/csv/json/
summary/plot). Data flows workloads/providers -> runner -> report; nothing imports back.
Importing this package imports neither torch nor triton.
"""
