"""Train a small transformer language model with FSDP2 and tritonadam.AdamW.

    python examples/fsdp_train.py                     # 2 CPU processes (gloo), or one per GPU (nccl)
    python examples/fsdp_train.py --nproc-per-node=8 --steps 2000 --d-model 512 --layers 8
    python examples/fsdp_train.py --resume            # continue from the latest checkpoint
    torchrun --nproc-per-node=2 examples/fsdp_train.py    # the same, launched by torchrun

Run with ``python``, the script is its own launcher: it checks ``--resume`` (a finished
checkpoint of a run with the same ``--steps``) before starting any worker, so a refused
resume is one line and exit status 2, then starts the workers through torchrun's launcher
(``--standalone``: a free local port) and, if one fails, ends with one line naming it
under the worker's own output instead of torchrun's traceback. Under ``torchrun`` the
workers check the same, rank 0 prints the reason once, and torchrun adds its summary.

What it shows:
  * FSDP2 (``fully_shard`` per block, then the root): params, grads and optimizer state are
    sharded DTensors; tritonadam steps the local shards with one kernel launch per step.
  * bf16 mixed precision (``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``):
    bf16 compute and all-gathers, fp32 sharded params, grads and Adam state.
  * Gradient clipping fused into the step (``optimizer.clip_grad_norm_``: the norm is one
    pass over the grads and one all-reduce, the grads are never rewritten), warm-up +
    cosine LR schedule (``torch.optim.lr_scheduler``).
  * Checkpoint / resume with ``torch.distributed.checkpoint`` (sharded, any world size);
    the checkpoint is the same as one written with ``torch.optim.AdamW``.
  * Data are generated: sequences from a fixed random Markov chain over the vocabulary
    (each token has ``--branching`` possible successors), so the loss falls from
    ln(vocab) towards the chain's entropy rate, printed as "floor". Nothing is downloaded.

Without CUDA the Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 is set
below, before tritonadam is imported): slow, but fine for the tiny default model.
"""
from __future__ import annotations

import argparse
import getpass
import logging
import math
import os
import sys
import tempfile
import time
import warnings

import torch

if not torch.cuda.is_available():
    # Must happen before tritonadam (or anything defining Triton kernels) is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.distributed as dist  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict  # noqa: E402
from torch.distributed.checkpoint.stateful import Stateful  # noqa: E402
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

try:
    import tritonadam
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import tritonadam


def _user() -> str:
    """A name for this user's default checkpoint folder: another user's in a shared temp
    dir is theirs (and may not be writable)."""
    try:
        return getpass.getuser()
    except Exception:  # no login name (a container without one): the uid, where there is one
        return str(getattr(os, "getuid", lambda: "user")())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="workers to start when run with python (default: one per GPU, else 2); "
                        "ignored under torchrun")
    p.add_argument("--steps", type=int, default=60,
                   help="total optimizer steps (the LR schedule spans them; keep it when resuming)")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop (and checkpoint) after this step, as if interrupted")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per rank per step")
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--branching", type=int, default=2, help="successors per token in the synthetic language")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--optimizer", choices=["tritonadam", "torch"], default="tritonadam",
                   help="tritonadam.AdamW, or torch.optim.AdamW to compare (checkpoints load either way)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decays to lr * this")
    p.add_argument("--warmup", type=int, default=10, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0, help="max grad norm (0 = no clipping)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                   help="compute dtype (FSDP2 MixedPrecisionPolicy param_dtype; params, grads and state stay fp32)")
    p.add_argument("--ckpt-dir", default=os.path.join(tempfile.gettempdir(), f"tritonadam-fsdp_train-{_user()}"),
                   help="where checkpoints go (default: a folder of this user's in the temp dir, never "
                        "the working directory unless asked; concurrent runs need a --ckpt-dir each)")
    p.add_argument("--ckpt-every", type=int, default=0, help="checkpoint every N steps (0 = only at the end)")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="resume from a checkpoint directory, or (no value) the latest in --ckpt-dir")
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# ---- model -------------------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab: int, d: int, heads: int, layers: int, seq_len: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq_len, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok(idx) + self.pos(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


# ---- data ----------------------------------------------------------------------------------

class MarkovData:
    """Sequences from a fixed random Markov chain: each token has ``branching`` successors
    with random probabilities. The same chain on every rank (same seed); batches depend only
    on (step, rank), so a resumed run sees exactly the batches it would have seen."""

    def __init__(self, vocab: int, branching: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed + 12345)
        self.vocab = vocab
        self.succ = torch.stack([torch.randperm(vocab, generator=gen)[:branching] for _ in range(vocab)])
        self.prob = torch.rand(vocab, branching, generator=gen) + 0.2
        self.prob /= self.prob.sum(1, keepdim=True)
        self.seed = seed

    def entropy_rate(self) -> float:
        """Loss floor (nats/token) of a perfect model, starting tokens aside."""
        h = -(self.prob * self.prob.log()).sum(1)
        # The chain mixes quickly; a uniform stationary guess is close enough for a display.
        return h.mean().item()

    def batch(self, step: int, rank: int, batch_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 1009 + rank)
        seq = torch.empty(batch_size, seq_len + 1, dtype=torch.long)
        seq[:, 0] = torch.randint(0, self.vocab, (batch_size,), generator=gen)
        for t in range(seq_len):
            choice = torch.multinomial(self.prob[seq[:, t]], 1, generator=gen).squeeze(1)
            seq[:, t + 1] = self.succ[seq[:, t], choice]
        return seq[:, :-1], seq[:, 1:]


# ---- checkpointing -------------------------------------------------------------------------

class TrainState(Stateful):
    """What a checkpoint holds; DCP calls state_dict() on save and load_state_dict() on load."""

    def __init__(self, model, optimizer, scheduler, total_steps: int) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.step = 0
        self.total_steps = total_steps

    def state_dict(self) -> dict:
        # Sharded (DTensor) model and optimizer state dicts, keyed by parameter name: the
        # same layout torch.optim.AdamW produces, so either optimizer can load it.
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd, "scheduler": self.scheduler.state_dict(),
                "step": self.step, "total_steps": self.total_steps}

    def load_state_dict(self, sd: dict) -> None:
        # resume_checkpoint() checked sd["total_steps"] == self.total_steps.
        set_state_dict(self.model, self.optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        self.scheduler.load_state_dict(sd["scheduler"])
        self.step = sd["step"]


def latest_checkpoint(ckpt_dir: str) -> str | None:
    if not os.path.isdir(ckpt_dir):
        return None
    done = [d for d in os.listdir(ckpt_dir)
            if d.startswith("step_") and os.path.exists(os.path.join(ckpt_dir, d, ".metadata"))]
    return os.path.join(ckpt_dir, max(done)) if done else None


class Refused(SystemExit):
    """Exit status 2, with the line that says why."""

    def __init__(self, reason: str):
        super().__init__(2)
        self.line = f"--resume: {reason}"


def resume_checkpoint(args: argparse.Namespace, say: bool = True) -> str:
    """The checkpoint ``--resume`` names, after checking it can be resumed; if it cannot,
    one line saying why on stderr (if ``say``) and Refused (exit status 2). Reads only the
    checkpoint's step counts (no process group needed)."""

    def refuse(reason: str):
        refusal = Refused(reason)
        if say:
            print(refusal.line, file=sys.stderr, flush=True)
        raise refusal

    path = latest_checkpoint(args.ckpt_dir) if args.resume == "latest" else args.resume
    if path is None:
        refuse(f"no checkpoint in {args.ckpt_dir}")
    if not os.path.exists(os.path.join(path, ".metadata")):
        refuse(f"{path} is not a finished checkpoint (no {os.path.join(path, '.metadata')})")
    saved = {"train": {"total_steps": -1, "step": -1}}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")  # no_dist=True says so
        dcp.load(saved, checkpoint_id=path, no_dist=True)
    total = saved["train"]["total_steps"]
    if total != args.steps:
        # The restored scheduler keeps the old schedule's length: a different --steps
        # would run the cosine past its end.
        refuse(f"{path} belongs to a run with --steps {total}: resume with the same --steps "
               f"(and --stop-after to end earlier)")
    return path


# ---- launcher ----------------------------------------------------------------------------

def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def launch(args: argparse.Namespace, argv: list[str]) -> None:
    """Run as ``python examples/fsdp_train.py``: check, then start the workers with torchrun's
    launcher in this process; a failed worker ends it with one line (its output is above)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args as torchrun_args, run

    if args.resume is not None:
        resume_checkpoint(args)
    nproc = args.nproc_per_node or (torch.cuda.device_count() if torch.cuda.is_available() else 2)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # what torchrun sets, without its banner about it
    # torchrun's agent logs every worker's failure and the signals it sends the others.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(torchrun_args(["--standalone", f"--nproc-per-node={nproc}", os.path.abspath(__file__), *argv]))
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        raise SystemExit(f"fsdp_train.py: worker {rank} failed with exit status {failure.exitcode}"
                         f"{'' if failure.exitcode > 0 else ' (killed by a signal)'}; its output is above") from None


# ---- main --------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if not under_torchrun():
        return launch(args, argv)
    try:
        resume = resume_checkpoint(args, say=False) if args.resume is not None else None
    except Refused as refusal:
        # Every rank comes to the same answer; rank 0 says why. torchrun stops all workers
        # as soon as one exits, so no rank leaves before rank 0 has said it.
        dist.init_process_group("gloo")
        if dist.get_rank() == 0:
            print(refusal.line, file=sys.stderr, flush=True)
        dist.barrier()
        dist.destroy_process_group()
        raise
    cuda = torch.cuda.is_available()
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = args.dtype

    # Same init on every rank; fully_shard then keeps each rank's shard.
    torch.manual_seed(args.seed)
    model = TinyLM(args.vocab, args.d_model, args.heads, args.layers, args.seq_len).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if dtype == "bf16" else None, reduce_dtype=torch.float32
    )
    for block in model.blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)

    # No weight decay on norms, biases and embeddings.
    def decayed(name: str, p: torch.Tensor) -> bool:
        return p.dim() >= 2 and not name.startswith(("tok.", "pos."))

    decay = [p for n, p in model.named_parameters() if decayed(n, p)]
    no_decay = [p for n, p in model.named_parameters() if not decayed(n, p)]
    optimizer_cls = tritonadam.AdamW if args.optimizer == "tritonadam" else torch.optim.AdamW
    optimizer = optimizer_cls(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95),
    )
    warmup = max(1, min(args.warmup, args.steps - 1))
    scheduler = torch.optim.lr_scheduler.SequentialLR(
        optimizer,
        [
            torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0 / warmup, total_iters=warmup),
            torch.optim.lr_scheduler.CosineAnnealingLR(
                optimizer, T_max=max(1, args.steps - warmup), eta_min=args.lr * args.min_lr_ratio
            ),
        ],
        milestones=[warmup],
    )
    state = TrainState(model, optimizer, scheduler, args.steps)

    if resume is not None:
        dcp.load({"train": state}, checkpoint_id=resume)
        if rank == 0:
            print(f"resumed from {resume} at step {state.step}", flush=True)

    data = MarkovData(args.vocab, args.branching, args.seed)
    if rank == 0:
        print(f"world {world} on {device.type} ({dist.get_backend()}), {n_params / 1e6:.3f}M params, "
              f"{optimizer_cls.__module__}.{optimizer_cls.__name__}, compute {dtype}, {args.batch_size * args.seq_len * world} tokens/step, "
              f"loss starts near {math.log(args.vocab):.3f}, floor {data.entropy_rate():.3f}", flush=True)

    def save() -> None:
        path = os.path.join(args.ckpt_dir, f"step_{state.step:06d}")
        dcp.save({"train": state}, checkpoint_id=path)
        if rank == 0:
            print(f"saved checkpoint {path}", flush=True)

    last = args.steps if args.stop_after is None else min(args.steps, args.stop_after)
    start_step = state.step
    first_loss = last_loss = None
    run_t = time.perf_counter()
    window_t, window_steps = time.perf_counter(), 0
    while state.step < last:
        step = state.step
        idx, target = data.batch(step, rank, args.batch_size, args.seq_len)
        idx, target = idx.to(device), target.to(device)
        logits = model(idx)
        loss = F.cross_entropy(logits.float().reshape(-1, args.vocab), target.reshape(-1))
        loss.backward()
        grad_norm = None
        if args.clip > 0:
            if args.optimizer == "tritonadam":
                # Applied inside the next step; same norm and result as torch's function.
                grad_norm = optimizer.clip_grad_norm_(args.clip)
            else:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        optimizer.zero_grad()
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        state.step += 1
        window_steps += 1

        if state.step % args.log_every == 0 or state.step == last:
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)  # waits for the step, so the timing below is real
            mean_loss = mean_loss.item() / world
            if isinstance(grad_norm, DTensor):
                grad_norm = grad_norm.full_tensor()
            elapsed = time.perf_counter() - window_t
            if first_loss is None:
                first_loss = mean_loss
            last_loss = mean_loss
            if rank == 0:
                norm = f" | grad-norm {grad_norm.item():.3f}" if grad_norm is not None else ""
                ms = 1000 * elapsed / window_steps
                tok_s = window_steps * args.batch_size * args.seq_len * world / elapsed
                print(f"step {state.step:5d}/{args.steps} | loss {mean_loss:.6f} | lr {lr:.2e}{norm} | "
                      f"{ms:7.1f} ms/step | {tok_s:8.0f} tok/s", flush=True)
            window_t, window_steps = time.perf_counter(), 0
        if args.ckpt_every and state.step % args.ckpt_every == 0 and state.step < last:
            save()

    if state.step > start_step:
        if rank == 0:
            print(f"done: steps {start_step + 1}-{state.step}, loss {first_loss:.4f} -> {last_loss:.4f}, "
                  f"{time.perf_counter() - run_t:.1f} s", flush=True)
        save()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
