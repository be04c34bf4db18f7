"""Column layout of the device tables the kernels read (shared by host and kernels).

Every launch covers many tensors. Per optimizer and device the host keeps one int64
*tensor table* (a row per tensor: its pointers and size) and a float64 *scalar table* (a
row per tensor: this step's hyper-parameters, bias corrections and grad multiplier,
written on the device by the prepare kernel). A launch of the update kernel covers the
rows of one bucket (same dtypes and state layout) through a block map: program id ->
(row, block of that tensor).

The ``tl.constexpr`` values are usable in kernels; host code reads ``.value``.
"""
import triton.language as tl

# Tensor table (int64). Pointers are raw data_ptr() values; 0 where a column is unused.
COL_PARAM = tl.constexpr(0)
COL_EXP_AVG = tl.constexpr(1)
COL_SECOND = tl.constexpr(2)  # exp_avg_sq (Adam) or exp_inf (AdaMax)
COL_MAX = tl.constexpr(3)  # max_exp_avg_sq (AMSGrad)
COL_MASTER = tl.constexpr(4)  # fp32 master copy, or the int16 remainder of one
COL_NUMEL = tl.constexpr(5)
COL_STEP = tl.constexpr(6)  # this param's 0-dim step tensor (float32, or float64: COL_STEP_FP64)
COL_KEY = tl.constexpr(7)  # Philox key of this tensor's stochastic rounding
# Quantized state (QUANT = 8 or 4): COL_EXP_AVG, COL_SECOND and COL_MAX point at uint8
# codes, these at the bf16 scales of the same moments (one per QUANT_BLOCK elements).
COL_EXP_AVG_SCALE = tl.constexpr(8)
COL_SECOND_SCALE = tl.constexpr(9)
COL_MAX_SCALE = tl.constexpr(10)
COL_STEP_FP64 = tl.constexpr(11)  # 1 if the step tensor is float64 (torch's under a float64 default dtype)
TABLE_COLUMNS = tl.constexpr(16)  # rows start on 128-byte boundaries

# Block map entries (int64): the program's table row in the high half, the block's index
# within its tensor in the low half; one map per bucket and block size.
BLOCK_INDEX_BITS = tl.constexpr(32)
BLOCK_INDEX_MASK = tl.constexpr((1 << 32) - 1)

# Scalar table (float64), one row per tensor, filled by the prepare kernel each step.
S_GMUL = tl.constexpr(0)  # grad multiplier: 1/grad scale, -1 for maximize
S_W1 = tl.constexpr(1)  # 1 - beta1 (lerp weight)
S_BETA2 = tl.constexpr(2)
S_W2 = tl.constexpr(3)  # 1 - beta2
S_EPS = tl.constexpr(4)
S_STEP_SIZE = tl.constexpr(5)  # lr / (1 - beta1**t), or lr without bias correction
S_BC2_SQRT = tl.constexpr(6)  # sqrt(1 - beta2**t), or 1
S_DECAY = tl.constexpr(7)  # 1 - lr * weight_decay (decoupled), or 1
S_WD = tl.constexpr(8)  # L2 weight decay added to the grad (coupled), or 0
S_STEP = tl.constexpr(9)  # the step being taken (counts random draws)
S_UNSCALE = tl.constexpr(10)  # GradScaler's 1/scale (fp32), for the grads a step writes back, or 1
SCALAR_COLUMNS = tl.constexpr(16)  # padded: rows start on 128-byte boundaries

# Group table (float64), one row per param group, written by the host when values change.
G_LR = tl.constexpr(0)
G_BETA1 = tl.constexpr(1)
G_BETA2 = tl.constexpr(2)
G_W1 = tl.constexpr(3)
G_W2 = tl.constexpr(4)
G_EPS = tl.constexpr(5)
G_WD = tl.constexpr(6)
G_DECOUPLED = tl.constexpr(7)  # 1.0: weight decay is decoupled (AdamW)
G_SIGN = tl.constexpr(8)  # -1.0 for maximize
G_BIAS_CORRECTION = tl.constexpr(9)  # 1.0 or 0.0
GROUP_COLUMNS = tl.constexpr(10)

# Group pointer table (int64), one row per group: a tensor hyper-parameter is read where
# it lives on every step, so in-place updates (schedulers, CUDA graph replays) are seen.
# Each value takes two columns: its address (0 for a float) and 1 if it is float64.
GP_LR = tl.constexpr(0)
GP_BETA1 = tl.constexpr(2)
GP_BETA2 = tl.constexpr(4)
GROUP_POINTER_COLUMNS = tl.constexpr(6)

# Master copies (the MASTER flag of the update kernel; kernels.variant.Master on the host).
MASTER_NONE = tl.constexpr(0)
MASTER_FP32 = tl.constexpr(1)  # fp32 master weights
MASTER_REMAINDER = tl.constexpr(2)  # bf16 param + int16 low half: the exact fp32 master

# Quantized state: elements per scale, counted from each tensor's element 0 (so from each
# local shard's, under FSDP). Fixed, not tuned: every launch config gives the same bits.
# It divides every block of the config space (512..4096), and the masked path's layout
# assumes this value (kernels/quant.py).
QUANT_BLOCK = tl.constexpr(64)
# The full path works on whole blocks of QUANT_BLOCK elements and reads scales in groups
# of up to 8 rows, so its iterations cover at least this many elements (and a launch's
# block is a multiple of it); the masked path puts a row of 64 elements in each warp, at
# least two rows per iteration. A plain int: the host's checks read it too.
QUANT_MIN_FULL = 8 * QUANT_BLOCK.value

# Clip buffer (float64), one per optimizer: what clip_grad_norm_ leaves for the next step.
CLIP_COEF = tl.constexpr(0)  # min(1, max_norm / (norm + 1e-6)), folded into S_GMUL
CLIP_MAX_NORM = tl.constexpr(1)
CLIP_P = tl.constexpr(2)  # the norm's order (read for orders other than 1, 2 and inf)
CLIP_COLUMNS = tl.constexpr(4)
