"""benchmarks/gpu_loop_check.py is what runs on a lent GPU machine, which has torch but no
Ray. It is run here on the CPU (gloo) with Ray hidden, so that it keeps importing and
working between the sessions that get a GPU."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_gpu_loop_check_runs_without_ray(tmp_path):
    # A sitecustomize that makes `import ray` fail, as on the GPU machine.
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['ray'] = None\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_loop_check.py"), "--device", "cpu",
         "--variant", "Ti/16", "--img-size", "32", "--micro-batch", "4", "--steps", "4",
         "--configs", "ddp:fp32,fsdp2:bf16", "--input-check"],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.split()[:2] == ["ddp", "fp32"] for line in lines), proc.stdout
    assert any(line.split()[:2] == ["fsdp2", "bf16"] for line in lines), proc.stdout
    assert "no Ray (stand-ins)" in lines[0], proc.stdout
    assert "losses identical" in proc.stdout
    # the reader's collate (a Ray Data subclass) imports over the stand-ins and feeds the loop
    assert any(line.strip().startswith("uint8 on the host, pinned") for line in lines), proc.stdout
    assert lines[-1] == "gpu_loop_check: ok"
