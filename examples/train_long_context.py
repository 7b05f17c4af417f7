"""Train a (tiny, random) transformers LlamaForCausalLM on long sequences with ring
attention: the only change to an ordinary training script is ``model = ringfx.transform(model)``.

    torchrun --nproc-per-node 2 examples/train_long_context.py             # CPU, gloo
    torchrun --nproc-per-node 2 examples/train_long_context.py --check     # and compare

Every rank builds the same model and reads the same full-length batches; the
transformed model shards the sequence over the ring (the default process group), runs
exact ring attention, returns the full-length logits and the same loss, and leaves
every rank with the full parameter gradients, so the usual optimizer step keeps the
ranks in step. ``--check`` also trains an untransformed copy in the same process and
asserts that the parameters match after the steps.
"""

import argparse
import copy
import datetime

import torch
import torch.distributed as dist
import transformers

import ringfx


def make_model(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, attention_dropout=0.0, attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(cfg)


def batches(steps, seq_len, vocab, batch=2, seed=1):
    # the same data on every rank: each row repeats a random 32-token phrase
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        phrase = torch.randint(0, vocab, (batch, 32), generator=g)
        ids = phrase[:, torch.arange(seq_len) % 32]
        yield {"input_ids": ids, "labels": ids.clone()}


def train(model, data, lr, log=None):
    """An ordinary training loop: nothing in it knows about the ring."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for step, batch in enumerate(data):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if log:
            log(step, loss.item())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--layout", default="zigzag", choices=["contiguous", "zigzag"])
    p.add_argument("--check", action="store_true", help="also train an untransformed copy and compare parameters")
    args = p.parse_args()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()

    model = make_model()
    reference = copy.deepcopy(model) if args.check else None
    plain = model  # (for --check: the parameters the transformed model trains)
    vocab = model.config.vocab_size

    model = ringfx.transform(model, layout=args.layout)  # the one change

    if rank == 0:
        print(f"ring of {world}, {args.layout} layout: {args.seq_len} tokens per sequence, "
              f"{args.seq_len // world} per rank")
    first = next(batches(1, args.seq_len, vocab))
    report = ringfx.explain(model, **first)
    if rank == 0:
        print(report)

    def log(step, loss):
        if rank == 0:
            print(f"step {step}: loss {loss:.4f}", flush=True)

    train(model, batches(args.steps, args.seq_len, vocab), args.lr, log)

    if args.check:
        ref_losses = []
        train(reference, batches(args.steps, args.seq_len, vocab), args.lr, lambda s, v: ref_losses.append(v))
        worst = max(((a - b).abs().max().item(), n)
                    for (n, a), b in zip(reference.named_parameters(), plain.parameters()))
        ok = worst[0] < 1e-4
        print(f"rank {rank}: reference losses {' '.join(f'{v:.4f}' for v in ref_losses)}; "
              f"max parameter difference after {args.steps} steps {worst[0]:.3g} ({worst[1]}): "
              f"{'match' if ok else 'MISMATCH'}", flush=True)
        assert ok, f"rank {rank}: parameters differ from the untransformed model's by {worst[0]:.3g} ({worst[1]})"
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
