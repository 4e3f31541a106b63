"""The pretraining loop's GPU path, checked without Ray: DDP and FSDP2 over NCCL, bf16
autocast, ``torch.compile``, gradient accumulation, MFU, and an exact resume through the
checkpoint bytes.

The GPU machine this was written for has torch and CUDA but no Ray, so the check calls
the loop's own building blocks (``wrap_model``, ``build_optimizer``, ``forward_backward``,
the checkpoint (de)serialisation and ``_load_train_state``) in one process on a one-rank
NCCL group, with a fixed synthetic batch per step. What it cannot show: more than one
rank, the Ray Train wiring, real data.

    python benchmarks/gpu_loop_check.py              # needs a CUDA device
    python benchmarks/gpu_loop_check.py --variant B/16 --micro-batch 128

Prints, per configuration, the loss at the first and last step (a fixed set of batches,
so it must fall), the median step time and MFU; then the largest difference between a
run that continues in memory and one resumed from serialised checkpoint bytes. With
``--input-check``, the first configuration also runs on uint8 host batches as the training
reader yields them (through its ``BatchCollate``), pageable and pinned, against batches
already on the device.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import os
import socket
import statistics
import sys
import time
import types

import numpy as np
import torch
import torch.distributed as dist



def _placeholder(attr: str) -> type:
    if attr.startswith("__"):  # inspect, pickle and friends probe dunders
        raise AttributeError(attr)
    return type(attr, (), {})


class _StandInRay(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Empty ``ray.*`` modules whose every attribute is a placeholder class.

    loop.py and the config's reader import Ray at module level (Ray Train's context, Ray
    Data's collate base class); the functions used here never touch it, so stand-ins let
    them import on a machine without Ray. Installed only where ``import ray`` fails.
    """

    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = _placeholder
        return module

    def exec_module(self, module):
        pass


try:
    import ray  # noqa: F401

    RAY = "Ray " + ray.__version__
except ImportError:
    sys.modules.pop("ray", None)
    sys.meta_path.insert(0, _StandInRay())
    RAY = "no Ray (stand-ins)"

from vitray.training import checkpoint as ckpt  # noqa: E402
from vitray.training import loop  # noqa: E402
from vitray.training.config import OptimConfig, PretrainConfig  # noqa: E402
from vitray.training.metrics import device_peak_flops  # noqa: E402
from vitray.training.vit import ViTConfig, create_model, model_flops_per_image  # noqa: E402

NUM_CLASSES = 100


def init_group(device: torch.device) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cuda = device.type == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                            world_size=1, device_id=device if cuda else None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_batches(cfg: PretrainConfig, n_distinct: int, pin: bool) -> list[dict]:
    """uint8 micro-batches on the host, collated by the reader's ``BatchCollate`` as the training
    reader hands them out (``pin``: its ``pin_memory``); the loop copies and normalises them."""
    from vitray.pipeline.augment import IMAGENET_MEAN, IMAGENET_STD
    from vitray.pipeline.reader import BatchCollate

    collate = BatchCollate(IMAGENET_MEAN, IMAGENET_STD, multi_label=False, normalize=False, pin_memory=pin)
    rng = np.random.default_rng(1234)
    size, b = cfg.model.img_size, cfg.micro_batch_size
    return [collate({"image": rng.integers(0, 256, (b, 3, size, size), dtype=np.uint8),
                     "label": rng.integers(0, NUM_CLASSES, b), "sample_id": np.array([str(i) for i in range(b)])})
            for _ in range(n_distinct)]


def batches(cfg: PretrainConfig, n_distinct: int, device: torch.device) -> list[dict]:
    """``n_distinct`` fixed micro-batches (cycled), made on the CPU from a fixed seed."""
    gen = torch.Generator().manual_seed(1234)
    size = cfg.model.img_size
    out = []
    for _ in range(n_distinct):
        out.append({"image": torch.randn(cfg.micro_batch_size, 3, size, size, generator=gen).to(device),
                    "label": torch.randint(0, NUM_CLASSES, (cfg.micro_batch_size,), generator=gen).to(device)})
    return out


class Run:
    """Model + optimizer built the way ``train_loop_per_worker`` builds them."""

    def __init__(self, cfg: PretrainConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        torch.manual_seed(cfg.seed)
        model = create_model(cfg.model).to(device)
        # world_size=2 sends wrap_model down its DDP path; the NCCL group itself has one rank.
        self.core = loop.wrap_model(model, cfg, device, world_size=2)
        self.optimizer = loop.build_optimizer(self.core, cfg)
        self.train_model = torch.compile(self.core) if cfg.compile else self.core
        self.step = 0
        self.mean_std = None  # (mean, std) when the batches are uint8

    def train(self, data: list[dict], steps: int) -> tuple[list[float], list[float]]:
        """(losses, step seconds) for ``steps`` optimizer steps."""
        losses, times = [], []
        accum = self.cfg.grad_accum_steps
        for _ in range(steps):
            loop._seed_step(self.cfg.seed, 0, self.step)
            micro = iter(data[(self.step * accum + i) % len(data)] for i in range(accum))
            sync(self.device)
            t0 = time.perf_counter()
            out = loop.forward_backward(self.train_model, self.core, lambda: next(micro), self.cfg,
                                        self.device, world=1, mean_std=self.mean_std)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            sync(self.device)
            times.append(time.perf_counter() - t0)
            losses.append(out.loss)
            self.step += 1
        return losses, times

    def checkpoint_bytes(self) -> dict[str, bytes]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        opts = loop._state_dict_options(cpu_offload=True)
        return ckpt.serialize(step=self.step, model=get_model_state_dict(self.core, options=opts),
                              optimizer=get_optimizer_state_dict(self.core, self.optimizer, options=opts),
                              scheduler={}, reader={}, config={}, lineage={})

    def restore(self, files: dict[str, bytes]) -> None:
        state = ckpt.deserialize(files)
        loop._load_train_state(self.core, self.optimizer, state)
        ckpt.restore_rng(state.rng)
        self.step = state.step


def input_check(args, device: torch.device) -> int:
    """The first configuration fed from device-resident float batches (no copy), then from uint8
    host batches as the reader yields them: pageable, and pinned (``ReaderConfig.pin_memory``).
    Returns the number of problems (a loss that did not fall)."""
    from vitray.pipeline.augment import IMAGENET_MEAN, IMAGENET_STD

    strategy, precision, compile_ = args.configs[0]
    cfg = make_cfg(args, strategy, precision, compile_)
    print(f"input path ({strategy}, {precision}, compile={compile_}; {cfg.micro_batch_size * 2} images per step):")
    print(f"  {'batches':34} {'pinned':>6} {'loss@1':>8} {'loss@end':>8} {'ms/step':>8} {'img/s':>8}")
    problems, base = 0, None
    for name in ("float, already on the device", "uint8 on the host, pageable", "uint8 on the host, pinned"):
        host, pin = name.startswith("uint8"), name.endswith("pinned")
        data = host_batches(cfg, 4, pin) if host else batches(cfg, 4, device)
        run = Run(cfg, device)
        if host:
            run.mean_std = (IMAGENET_MEAN, IMAGENET_STD)
        losses, times = run.train(data, args.steps)
        sec = statistics.median(times[3:])
        base = base or sec
        ok = losses[-1] < losses[0]
        problems += not ok
        print(f"  {name:34} {str(data[0]['image'].is_pinned()):>6} {losses[0]:8.4f} {losses[-1]:8.4f} "
              f"{sec * 1e3:8.1f} {cfg.micro_batch_size * 2 / sec:8.1f}  x{base / sec:.3f}"
              f"{'' if ok else '  LOSS DID NOT FALL'}")
        del run
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return problems


DEFAULT_CONFIGS = "ddp:fp32,ddp:bf16,ddp:bf16:compile,fsdp2:bf16,fsdp2:bf16:compile"


def parse_configs(text: str) -> list[tuple[str, str, bool]]:
    out = []
    for item in text.split(","):
        parts = item.split(":")
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "compile"):
            raise argparse.ArgumentTypeError(f"expected strategy:precision[:compile], got {item!r}")
        out.append((parts[0], parts[1], len(parts) == 3))
    return out


def make_cfg(args, strategy: str, precision: str, compile_: bool) -> PretrainConfig:
    model = ViTConfig(variant=args.variant, img_size=args.img_size, head="finetune", num_classes=NUM_CLASSES)
    return PretrainConfig(model=model, micro_batch_size=args.micro_batch, global_batch_size=args.micro_batch * 2,
                          precision=precision, compile=compile_, strategy=strategy, deterministic=False,
                          optim=OptimConfig(lr=3e-4, warmup_steps=0, clip_norm=1.0, weight_decay=0.05))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", default="S/16")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--micro-batch", type=int, default=128, help="2 micro-batches per step (accumulation)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--configs", type=parse_configs, default=parse_configs(DEFAULT_CONFIGS),
                    help=f"strategy:precision[:compile], comma-separated (default {DEFAULT_CONFIGS})")
    ap.add_argument("--input-check", action="store_true",
                    help="also time the first configuration fed uint8 batches from the host, pageable vs pinned")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu (gloo) only to try the script itself with a tiny model")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_loop_check: no CUDA device")
        return 2
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        where = (f"{torch.cuda.get_device_name(device)}, NCCL "
                 + ".".join(map(str, torch.cuda.nccl.version())))
    else:
        where = "cpu, gloo"
    init_group(device)
    peak = device_peak_flops(device)
    print(f"{args.variant} @ {args.img_size}, {args.micro_batch} x 2 micro-batches per step, {args.steps} steps, "
          f"{where}, torch {torch.__version__}, {RAY}, one-rank process group")
    failures = 0
    print(f"  {'strategy':8} {'precision':9} {'compile':7} {'loss@1':>8} {'loss@end':>8} {'ms/step':>8} "
          f"{'img/s':>8} {'MFU':>6}  first step (s)")
    for strategy, precision, compile_ in args.configs:
        cfg = make_cfg(args, strategy, precision, compile_)
        data = batches(cfg, 4, device)
        try:
            run = Run(cfg, device)
            losses, times = run.train(data, args.steps)
        except Exception as e:  # report and go on to the next configuration
            failures += 1
            print(f"  {strategy:8} {precision:9} {str(compile_):7} FAILED: {type(e).__name__}: {e}")
            continue
        sec = statistics.median(times[3:])
        imgs = cfg.micro_batch_size * 2 / sec
        flops = model_flops_per_image(cfg.model, training=True)
        mfu = f"{imgs * flops / peak:6.1%}" if peak and precision == "bf16" else "     -"
        ok = losses[-1] < losses[0] and all(map(lambda v: v == v, losses))
        failures += not ok
        print(f"  {strategy:8} {precision:9} {str(compile_):7} {losses[0]:8.4f} {losses[-1]:8.4f} "
              f"{sec * 1e3:8.1f} {imgs:8.1f} {mfu}  {times[0]:.1f}{'' if ok else '  LOSS DID NOT FALL'}")
        del run
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if args.input_check:
        failures += input_check(args, device)

    # Exact resume: 10 steps, checkpoint to bytes, 5 more in memory vs 5 more after a restore
    # into a fresh model and optimizer (bf16 autocast, eager, DDP).
    cfg = make_cfg(args, "ddp", "bf16", False)
    cfg.deterministic = True
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    data = batches(cfg, 4, device)
    a = Run(cfg, device)
    a.train(data, 10)
    files = a.checkpoint_bytes()
    cont, _ = a.train(data, 5)
    b = Run(cfg, device)
    b.restore(files)
    resumed, _ = b.train(data, 5)
    pa, pb = dict(a.core.named_parameters()), dict(b.core.named_parameters())
    max_diff = max((pa[k].detach() - pb[k].detach()).abs().max().item() for k in pa)
    same = cont == resumed and max_diff == 0.0
    failures += not same
    print(f"resume through checkpoint bytes ({sum(map(len, files.values())) / 2**20:.0f} MiB): losses "
          f"{'identical' if cont == resumed else 'DIFFER'} over 5 steps "
          f"(in memory {cont[-1]:.6f}, resumed {resumed[-1]:.6f}); max parameter difference {max_diff:.3g}")
    dist.destroy_process_group()
    print("gpu_loop_check:", "ok" if failures == 0 else f"{failures} problem(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
