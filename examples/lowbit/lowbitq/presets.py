"""Sizes and hyper-parameters of each preset.

``smoke`` checks the code paths in seconds (the test runs it); ``quick`` is the
documented sweep (minutes per task on a 2-core CPU, tritonadam in Triton's interpreter);
``full`` is longer and larger, for a GPU. Every optimizer of a task gets the same
hyper-parameters: AdamW with linear warm-up and cosine decay to 10% of the peak lr.
"""
from __future__ import annotations

COMMON = dict(eps=1e-8, final_lr_ratio=0.1, divergence_window=10)
MLP = dict(COMMON, lr=2e-3, betas=(0.9, 0.999), weight_decay=0.01, warmup=0.05)
LM = dict(COMMON, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, warmup=0.1)

PRESETS = {
    # Both smoke models are padded to 16,384 elements and get the same betas, eps and weight
    # decay: torchao compiles its step once per optimizer for both tasks (it specialises on
    # the tensor shape and those numbers; a compile takes 10-30 s on a CPU).
    "smoke": dict(
        seeds=[0], layout="flat", pad_multiple=16384,
        mlp=dict(MLP, hidden=16, n_train=512, batch=64, steps=12, eval_points=3, curve_bins=12),
        lm=dict(MLP, lr=3e-3, d=16, layers=1, heads=2, context=16, batch=8, steps=12, eval_windows=32,
                eval_points=3, curve_bins=12),
    ),
    # MLP: the paper's quick size (examples/paper), 4 epochs of the 4,000 digits; LM: 150 steps
    # of 32 windows of 64 bytes (307,200 bytes seen). Sized for tritonadam in Triton's
    # interpreter on a busy 2-core CPU: about 0.1-0.2 s per tritonadam step.
    "quick": dict(
        seeds=[0, 1, 2], layout="flat", pad_multiple=1024,
        mlp=dict(MLP, hidden=256, n_train=None, batch=128, steps=124, eval_points=4, curve_bins=31),
        lm=dict(LM, d=64, layers=2, heads=4, context=64, batch=32, steps=150, eval_windows=256,
                eval_points=5, curve_bins=30),
    ),
    "full": dict(
        seeds=[0, 1, 2], layout="modules", pad_multiple=1024,
        mlp=dict(MLP, hidden=1000, n_train=None, batch=128, steps=1550, eval_points=10, curve_bins=50),
        lm=dict(LM, d=128, layers=4, heads=4, context=128, batch=32, steps=3000, eval_windows=1024,
                eval_points=10, curve_bins=50),
    ),
}
