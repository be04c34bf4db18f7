"""``python -m tritonadam.bench``: optimizer-step throughput against PyTorch and the copy roofline.

Modules: ``workloads`` (dtype setups, the other providers' byte formulas, shape profiles),
``providers`` (the optimizers compared; tritonadam's bytes from ``tritonadam.state.variant``),
``check`` (float64 reference, quantized moments emulated), ``timing`` (events, flushes,
launch counts), ``tuning`` (launch-config sweeps and first-use tuning: config lists,
ranking), ``runner`` (the loop over cases), ``interrupt`` (SIGTERM ends a run between
cases and reps; the finished ones are reported), ``report`` (header, roofline, goals,
table/md/csv/json/summary/plot). Data flows workloads/providers -> runner -> report; nothing imports
back. Importing this package imports neither torch nor triton.

Beside them, the bench's tools: ``host_time`` (``python -m tritonadam.bench.host_time``: the
step's host time against a one-pass floor, launchers stubbed), ``gpu_check.sh`` (everything
GPU-specific in one time-boxed run, results kept in the checkout's ``bench/results/``) and
``wheelhouse.sh`` (the peers' wheels into ``bench/wheelhouse/`` for a GPU machine without
network).
"""
