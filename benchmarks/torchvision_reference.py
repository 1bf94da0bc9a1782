"""PyTorch side of the GPU comparison: AlexNet training throughput with torch.compile.

Meant to run on the lent GPU machine next to `alexnet-keras benchmark` (Keras on JAX), in the same
device call, so both numbers come from one machine in one session (benchmarks/README.md has the
commands). It needs only PyTorch (torchvision is used when installed; otherwise an identical copy of
`torchvision.models.alexnet` is built here, since the GPU machine has no torchvision).

    --arch torchvision   torchvision's AlexNet ("one weird trick" variant: 64/192/384/256/256 filters,
                         no LRN, adaptive 6x6 average pool), 224 px: what the issue's "torchvision +
                         torch.compile 38.0k img/s at batch 256" measured.
    --arch paper         this project's `paper` network in PyTorch (96/256/384/384/256 filters, LRN
                         n=5 after conv1/conv2 with PyTorch's alpha = 5 x 1e-4, overlapping 3x3/2
                         pools, dropout 0.5, 4096-4096 FC), 227 px: the same FLOPs as the Keras model.

Measured:
  train   images/s of full training steps (forward, cross-entropy, backward, SGD momentum 0.9 step)
          on one batch that stays on the device: `steps` steps back to back after `burn_in`, one
          torch.cuda.synchronize() at the end.
  forward seconds per batch (mean ± sd, each step synchronized) of inference at --forward-batch.

    python benchmarks/torchvision_reference.py --batch-size 256 --precision bf16 --compile --json
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
from torch import nn


def alexnet_torchvision(num_classes: int = 1000) -> nn.Module:
    try:
        import torchvision

        return torchvision.models.alexnet(weights=None, num_classes=num_classes)
    except ImportError:
        pass
    # torchvision.models.AlexNet, layer for layer.
    model = nn.Module()
    model.features = nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
    )
    model.avgpool = nn.AdaptiveAvgPool2d((6, 6))
    model.classifier = nn.Sequential(
        nn.Dropout(p=0.5), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(inplace=True),
        nn.Dropout(p=0.5), nn.Linear(4096, 4096), nn.ReLU(inplace=True),
        nn.Linear(4096, num_classes),
    )
    model.forward = lambda x: model.classifier(torch.flatten(model.avgpool(model.features(x)), 1))
    return model


class PaperAlexNet(nn.Module):
    """alexnet_keras' `paper` variant (227 px, groups=1), without the /255 preprocessing layer."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        # Our LRN multiplies alpha by the plain window sum; PyTorch divides alpha by the size n.
        lrn = dict(size=5, alpha=5 * 1e-4, beta=0.75, k=2.0)
        self.features = nn.Sequential(
            nn.Conv2d(3, 96, 11, stride=4), nn.ReLU(inplace=True), nn.LocalResponseNorm(**lrn),
            nn.MaxPool2d(3, 2),
            nn.Conv2d(96, 256, 5, padding=2), nn.ReLU(inplace=True), nn.LocalResponseNorm(**lrn),
            nn.MaxPool2d(3, 2),
            nn.Conv2d(256, 384, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 384, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2),
        )
        self.classifier = nn.Sequential(
            nn.Dropout(0.5), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(inplace=True),
            nn.Dropout(0.5), nn.Linear(4096, 4096), nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=("torchvision", "paper"), default="torchvision")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--forward-batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=None, help="default 224 (torchvision) / 227 (paper)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--burn-in", type=int, default=10)
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="bf16",
                        help="autocast dtype (fp32: none; TF32 matmuls allowed either way)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="torch.compile the model (default on)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                        help="torch.channels_last memory format (default on; cuDNN prefers NHWC)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true", help="print a 'RESULT {json}' line")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    size = args.image_size or (224 if args.arch == "torchvision" else 227)
    model = (alexnet_torchvision() if args.arch == "torchvision" else PaperAlexNet()).to(device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    step_model = torch.compile(model) if args.compile else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    x = torch.randn(args.batch_size, 3, size, size, device=device).to(memory_format=memory_format)
    y = torch.randint(0, 1000, (args.batch_size,), device=device)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = loss_fn(step_model(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss

    model.train()
    for _ in range(args.burn_in):
        train_step()
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = train_step()
    sync(device)
    train_s = (time.perf_counter() - start) / args.steps
    assert math.isfinite(float(loss))

    model.eval()
    xf = x[: args.forward_batch]
    durations = []
    with torch.no_grad():
        for i in range(args.burn_in + args.steps):
            start = time.perf_counter()
            with autocast():
                step_model(xf)
            sync(device)
            if i >= args.burn_in:
                durations.append(time.perf_counter() - start)
    mean = sum(durations) / len(durations)
    sd = math.sqrt(sum((d - mean) ** 2 for d in durations) / len(durations))

    result = {"arch": args.arch, "image_size": size, "batch_size": args.batch_size,
              "precision": args.precision, "compile": args.compile, "channels_last": args.channels_last,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "train_img_s": args.batch_size / train_s,
              "forward_batch": args.forward_batch, "forward_ms": 1e3 * mean, "forward_sd_ms": 1e3 * sd}
    print(f"{args.arch} {size}px {args.precision} compile={args.compile}: train {result['train_img_s']:,.0f} "
          f"img/s at batch {args.batch_size}; forward {result['forward_ms']:.3f} ± "
          f"{result['forward_sd_ms']:.3f} ms at batch {args.forward_batch} ({result['device']})")
    if args.json:
        print("RESULT " + json.dumps(result))
    return result


if __name__ == "__main__":
    main()
