"""Ray Train overhead: step time of the pretraining step with 2 Ray Train workers vs a plain loop.

Both sides run the production step (:func:`vitray.training.loop.forward_backward` +
AdamW) on the same small ViT and the same global batch of in-memory images, so the
difference is what Ray Train + DDP (gloo all-reduce, two processes instead of one)
costs, not data loading (``benchmarks/ingest.py`` measures the reader). The plain loop
runs with the threads of one worker, so with perfect scaling the two workers (each on
half of the batch) would take half its step time; the overhead is measured against that.
(Giving the plain loop all cores' threads instead mostly measures OpenMP contention on a
shared machine.)

    .venv/bin/python benchmarks/train_overhead.py [--steps 30] [--batch 32]

``run() -> str`` is also called by ``benchmarks/train_step.py --ray-overhead``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import torch  # noqa: E402

WORKERS = 2


def _config(batch: int, workers: int):
    from vitray.training.config import load_pretrain_config

    # Ti width at 32px with 4px patches: 65 tokens, big enough that compute dominates.
    return load_pretrain_config("tiny", overrides={
        "model": {"variant": "Ti/16", "embed_dim": 192, "num_heads": 3, "depth": 4, "patch_size": 4,
                  "img_size": 32, "num_classes": 10},
        "global_batch_size": batch, "micro_batch_size": batch // workers, "steps": 10_000,
        "optim": {"warmup_steps": 10}, "scaling": {"num_workers": workers}})


def _timed_steps(cfg, core, steps: int, warmup: int, rank: int, world: int) -> list[float]:
    """Seconds per optimizer step, after ``warmup`` untimed steps."""
    from vitray.training.loop import build_optimizer, forward_backward

    optimizer = build_optimizer(core, cfg)
    g = torch.Generator().manual_seed(rank)
    micro = cfg.micro_batch_size
    batches = [{"image": torch.randn(micro, 3, 32, 32, generator=g),
                "label": torch.randint(0, 10, (micro,), generator=g)} for _ in range(4)]
    it = iter(range(10**9))
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        forward_backward(core, core, lambda: batches[next(it) % 4], cfg, torch.device("cpu"), world)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def _ray_worker(config: dict) -> dict:
    import ray.train
    from vitray.training.loop import wrap_model
    from vitray.training.vit import create_model

    cfg = _config(config["batch"], WORKERS)
    ctx = ray.train.get_context()
    torch.manual_seed(0)
    core = wrap_model(create_model(cfg.model), cfg, torch.device("cpu"), ctx.get_world_size())
    times = _timed_steps(cfg, core, config["steps"], config["warmup"], ctx.get_world_rank(), ctx.get_world_size())
    return {"step_times": times, "threads": torch.get_num_threads()}


def run(steps: int = 30, warmup: int = 5, batch: int = 32) -> str:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from vitray.training.vit import create_model

    cpus = os.cpu_count() or 2
    per_worker = max(1, cpus // WORKERS)
    # Plain loop: one process, the whole global batch, the threads of one worker.
    cfg = _config(batch, 1)
    threads = torch.get_num_threads()
    plain_threads = per_worker
    torch.set_num_threads(plain_threads)

    def plain_loop() -> float:
        torch.manual_seed(0)
        return statistics.median(_timed_steps(cfg, create_model(cfg.model), steps, warmup, 0, 1))

    plain_before = plain_loop()

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    # Workers import nothing from benchmarks/ (not a package): ship this module by value.
    if __name__ != "__main__":
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = TorchTrainer(
            _ray_worker, train_loop_config={"steps": steps, "warmup": warmup, "batch": batch},
            scaling_config=ScalingConfig(num_workers=WORKERS, resources_per_worker={"CPU": per_worker}),
            torch_config=TorchConfig(backend="gloo"),
            run_config=RunConfig(name="train-overhead", storage_path=tmp),
        ).fit()
        fit_s = time.perf_counter() - t0
    if started_here:
        ray.shutdown()
    # Plain again after Ray: on a shared machine the load drifts; keep the faster (conservative).
    plain_after = plain_loop()
    torch.set_num_threads(threads)
    ray_times, ray_threads = result.return_value["step_times"], result.return_value["threads"]

    p_med, r_med = min(plain_before, plain_after), statistics.median(ray_times)
    ideal = p_med / WORKERS
    lines = [
        f"Ray Train overhead: ViT depth {cfg.model.depth}, width {cfg.model.embed_dim}, "
        f"{cfg.model.num_tokens} tokens, global batch {batch}, {steps} timed steps, {cpus} CPUs",
        f"  {'':36s} {'median step':>12s} {'images/s':>10s}",
        f"  {'plain loop (1 process x %d thr)' % plain_threads:36s} {1000 * p_med:9.1f} ms {batch / p_med:10.1f}"
        f"   (before/after Ray: {1000 * plain_before:.0f}/{1000 * plain_after:.0f} ms)",
        f"  {'Ray Train DDP (%d workers x %d thr)' % (WORKERS, ray_threads):36s} {1000 * r_med:9.1f} ms "
        f"{batch / r_med:10.1f}",
        f"  speedup Ray/plain: {p_med / r_med:.2f}x (ideal {WORKERS:.2f}x); Ray Train + DDP overhead per step: "
        f"{1000 * (r_med - ideal):.1f} ms ({100 * (r_med / ideal - 1):+.0f}% vs ideal)",
        f"  one-off Ray Train start + teardown: {fit_s - sum(ray_times) - warmup * r_med:.1f} s",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args(argv)
    print(run(args.steps, args.warmup, args.batch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
