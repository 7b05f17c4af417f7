"""One training step of a LLaMA-style model with ring attention, launched by torchrun.

    torchrun --nproc-per-node 4 examples/train_step_torchrun.py               # CPU, gloo
    torchrun --nproc-per-node 8 examples/train_step_torchrun.py --cuda        # GPUs, NCCL

Every rank is given the same full-length batch, as a data loader yields it, and the code
is the single-process training step with one line added: ``ringfx.transform(model)``.
Inside, each rank computes S/P tokens of every sequence (zigzag layout: balanced causal
work); the logits come back full length, and after ``backward`` the parameter gradients
are already averaged over the ring (equal to single-process gradients).
"""

import argparse
import datetime
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

import ringfx
from ringfx.demo import TinyLlama


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cuda", action="store_true")
    p.add_argument("--seq-len", type=int, default=4096)
    args = p.parse_args()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if args.cuda else torch.device("cpu")
    if args.cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if args.cuda else "gloo", timeout=datetime.timedelta(seconds=120))
    world = dist.get_world_size()

    torch.manual_seed(0)  # same weights and batch on every rank
    model = TinyLlama(dim=256, heads=8, kv_heads=2, layers=4).to(device)
    ids = torch.randint(0, 97, (1, args.seq_len + 1), device=device)
    ids, labels = ids[:, :-1], ids[:, 1:]
    pos = torch.arange(args.seq_len, device=device)[None]

    ring_model = ringfx.transform(model, layout="zigzag")
    logits = ring_model(ids, pos)
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
    loss.backward()
    if dist.get_rank() == 0:
        print(f"ring of {world}: loss {loss.item():.4f} over {args.seq_len} tokens, "
              f"{args.seq_len // world} per rank")
        print(ringfx.explain(ring_model, ids[:, :64], pos[:, :64]))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
