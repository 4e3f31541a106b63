"""Training-step throughput of our ViT vs the Hugging Face ``transformers`` ViT, side by side.

One step = forward + backward + AdamW update on a random batch, softmax cross-entropy,
both models at the same configuration and with the same weights (HF's built from ours
through :mod:`vitray.training.hf_convert`). Runs alternate between the two models
(ours, HF, ours, HF, ...) so that load from other processes hits both alike; the
median over rounds is reported. No Ray is imported unless ``--ray-overhead`` is given.

    python benchmarks/train_step.py                      # CPU, S/16 at 224, fp32
    python benchmarks/train_step.py --device cuda --dtype bf16 --compile   # B/16, MFU
    python benchmarks/train_step.py --ray-overhead       # + benchmarks/train_overhead.py
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from vitray.training.metrics import PEAK_BF16_FLOPS, device_peak_flops
from vitray.training.vit import ViTConfig, create_model, model_flops_per_image


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Peak dense FLOP/s of ``device`` for ``dtype``, or None where unknown (CPU, fp32)."""
    return device_peak_flops(device) if dtype == torch.bfloat16 else None


def build_models(cfg: ViTConfig, with_hf: bool, device: torch.device) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    ours = create_model(cfg)
    models = {"vitray": ours}
    if with_hf:
        from vitray.training.hf_convert import to_hf_model

        hf = to_hf_model(ours)
        hf.config._attn_implementation = "sdpa"  # same attention kernel as ours
        models["transformers"] = _LogitsOnly(hf)
    return {name: m.to(device).train() for name, m in models.items()}


class _LogitsOnly(torch.nn.Module):
    """HF returns an output object; the step wants the logits tensor."""

    def __init__(self, hf: torch.nn.Module):
        super().__init__()
        self.hf = hf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hf(pixel_values=x).logits


def make_step(model: torch.nn.Module, device: torch.device, dtype: torch.dtype, compile_: bool):
    """A closure running one forward+backward+AdamW step on (images, labels)."""
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.1, fused=fused)
    fwd = torch.compile(model) if compile_ else model
    autocast = dtype != torch.float32

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            loss = F.cross_entropy(fwd(images).float(), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def time_steps(step, images, labels, steps: int, device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) per step, averaged over ``steps``.

    On a shared CPU machine the process CPU time barely sees other processes taking the
    cores away, so it is the steadier of the two there; on CUDA only wall time means much.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step(images, labels)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps


def run_ray_overhead() -> None:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_overhead.py")
    if not os.path.exists(path):
        print(f"ray overhead: skipped ({path} not present)")
        return
    spec = importlib.util.spec_from_file_location("train_overhead", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_overhead"] = module  # it ships itself to Ray workers by module name
    spec.loader.exec_module(module)
    report = module.run()
    if report:
        print(report)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--compile", action="store_true", help="torch.compile both models")
    ap.add_argument("--variant", default=None, help="default S/16 on CPU, B/16 on CUDA")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=None, help="default 8 on CPU, 256 on CUDA")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per model per round (1 CPU, 20 CUDA)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (1 CPU, 10 CUDA)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="rounds alternating the models (ABBA order); the median is reported (6 CPU, 3 CUDA)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU intra-op threads (default 1 on CPU: on a shared, oversubscribed machine "
                         "OpenMP barriers make multi-threaded timings erratic)")
    ap.add_argument("--no-hf", action="store_true", help="time only our model")
    ap.add_argument("--ray-overhead", action="store_true", help="also run benchmarks/train_overhead.py")
    args = ap.parse_args(argv)

    cuda = args.device == "cuda"
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    variant = args.variant or ("B/16" if cuda else "S/16")
    batch = args.batch_size or (256 if cuda else 8)
    steps = args.steps or (20 if cuda else 1)
    warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
    rounds = args.rounds or (3 if cuda else 6)
    if args.threads or not cuda:
        torch.set_num_threads(args.threads or 1)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    cfg = ViTConfig(variant=variant, img_size=args.img_size, head="finetune", num_classes=1000)
    flops = model_flops_per_image(cfg)
    peak = peak_flops(device, dtype)
    dev_name = torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} thread(s))"
    print(f"{variant} @ {args.img_size}, batch {batch}, {args.dtype}, compile={args.compile}, "
          f"{dev_name}, torch {torch.__version__}, {steps} step(s) x {rounds} rounds")
    print(f"train FLOPs/image (3x forward, attention included): {flops / 1e9:.1f} GFLOP")

    models = build_models(cfg, with_hf=not args.no_hf, device=device)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, args.img_size, args.img_size, generator=gen).to(device)
    labels = torch.randint(0, 1000, (batch,), generator=gen).to(device)
    stepfns = {name: make_step(m, device, dtype, args.compile) for name, m in models.items()}
    for name, step in stepfns.items():
        time_steps(step, images, labels, warmup, device)

    wall: dict[str, list[float]] = {name: [] for name in stepfns}
    cpu: dict[str, list[float]] = {name: [] for name in stepfns}
    for r in range(rounds):
        order = list(stepfns) if r % 2 == 0 else list(reversed(stepfns))
        for name in order:
            w, c = time_steps(stepfns[name], images, labels, steps, device)
            wall[name].append(w)
            cpu[name].append(c)

    rates, cpu_rates = {}, {}
    for name in stepfns:
        sec = statistics.median(wall[name])
        rates[name] = batch / sec
        cpu_rates[name] = batch / statistics.median(cpu[name])
        line = f"{name:>13}: {rates[name]:8.2f} images/s  {sec * 1e3:8.1f} ms/step"
        if peak is not None:
            line += f"  MFU {rates[name] * flops / peak:6.1%}"
        if not cuda:
            line += f"  | per CPU-second: {cpu_rates[name]:.2f} images/s"
        line += "  (rounds: " + ", ".join(f"{batch / t:.2f}" for t in wall[name]) + ")"
        print(line)
    if "transformers" in rates:
        # Each round runs both models back to back, so a per-round ratio sees similar load
        # on both sides; its median is the least noisy figure on a shared machine.
        paired = statistics.median(h / o for h, o in zip(wall["transformers"], wall["vitray"]))
        print(f"speed ratio vitray / transformers: wall {rates['vitray'] / rates['transformers']:.3f}x "
              f"(medians), paired per round {paired:.3f}x")
        if not cuda:
            paired_cpu = statistics.median(h / o for h, o in zip(cpu["transformers"], cpu["vitray"]))
            print(f"speed ratio vitray / transformers: process CPU time "
                  f"{cpu_rates['vitray'] / cpu_rates['transformers']:.3f}x (medians), "
                  f"paired per round {paired_cpu:.3f}x")
    if peak is None:
        print("MFU: peak FLOP/s unknown for this device/dtype (known: bf16 on "
              + ", ".join(PEAK_BF16_FLOPS) + ")")
    if args.ray_overhead:
        run_ray_overhead()


if __name__ == "__main__":
    sys.exit(main())
