"""Training throughput (images/s) per optimizer on synthetic CIFAR batches, with the ZSharp/SGD and
ZSharp/SAM ratios.

Each optimizer runs the real training step of ``sharpscope.train`` (uint8 images gathered,
cropped/flipped and normalised on the device, then one or two passes) for ``--steps`` timed steps
after ``--warmup`` untimed ones. Examples::

    python bench/train_throughput.py --steps 5 --batch-size 64            # CPU smoke run
    python bench/train_throughput.py --device cuda --amp bf16 --channels-last
"""

from __future__ import annotations

import argparse
import time

import torch

from sharpscope.data import load_dataset
from sharpscope.models import build_model
from sharpscope.train.config import OPTIMIZER_NAMES, TrainConfig, build_optimizer
from sharpscope.train.loop import TrainStep, resolve_device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput(name: str, args: argparse.Namespace, device: torch.device) -> float:
    torch.manual_seed(0)
    data = load_dataset("synthetic", num_examples=args.batch_size * 4).to(device)
    model = build_model(args.model, data.num_classes).to(device)
    config = TrainConfig(optimizer=name, base="sgd", lr=0.05, amp=args.amp, channels_last=args.channels_last,
                         compile=args.compile).validate()
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer, _ = build_optimizer(model, config)
    forward = torch.compile(model) if args.compile else model
    step = TrainStep(model, forward, optimizer, config, device)
    model.train()

    def batches():
        epoch = 0
        while True:
            yield from data.batches(args.batch_size, shuffle=True, epoch=epoch, augment=True, device=device,
                                    drop_last=True)
            epoch += 1

    stream = batches()
    for _ in range(args.warmup):
        x, y = next(stream)
        step(x.contiguous(memory_format=torch.channels_last) if args.channels_last else x, y, False)
    _sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        x, y = next(stream)
        step(x.contiguous(memory_format=torch.channels_last) if args.channels_last else x, y, False)
    _sync(device)
    return args.steps * args.batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", default="off", choices=["off", "bf16"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZER_NAMES))
    args = parser.parse_args()
    device = resolve_device(args.device)
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    print(f"# {args.model}, batch {args.batch_size}, {args.steps} steps, device {device}, amp {args.amp}, "
          f"channels_last {args.channels_last}, compile {args.compile}, torch {torch.__version__}")
    rates = {}
    for name in names:
        rates[name] = throughput(name, args, device)
        print(f"{name:>8}: {rates[name]:10.1f} images/s", flush=True)
    if "zsharp" in rates:
        for other in ("sgd", "sam"):
            if other in rates:
                print(f"ZSharp/{other.upper()} throughput ratio: {rates['zsharp'] / rates[other]:.3f}")


if __name__ == "__main__":
    main()
