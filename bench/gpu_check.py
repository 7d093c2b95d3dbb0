"""A prepared check for a machine with NVIDIA GPUs: inventory, live samples, and the engine on CUDA.

Prints the inventory as JSON and a few NVML samples; then, where torch sees CUDA, runs the real CLI
(`llmd generate --device cuda`, greedy, 16 tokens) with 1 worker, and with 2 where there are two GPUs,
printing each run's JSON. On a machine without GPUs it says so and exits 0.

    python bench/gpu_check.py
"""

import json
import subprocess
import sys
import time

from llmd.app.inventory import read_gpu_samples, read_inventory

SAMPLES = 3
GENERATE = [sys.executable, "-m", "llmd", "generate", "--device", "cuda", "--greedy",
            "--max-new-tokens", "16", "--json"]


def generate(workers: int) -> int:
    t = time.perf_counter()
    p = subprocess.run([*GENERATE, "--workers", str(workers), "Hello"], capture_output=True, text=True,
                       timeout=600, check=False)
    print(f"== generate --device cuda --workers {workers}: exit {p.returncode}, {time.perf_counter() - t:.1f} s")
    print(p.stdout.strip() or p.stderr.strip()[-4000:], flush=True)
    return p.returncode


def main() -> int:
    inv = read_inventory()
    print("== inventory")
    print(json.dumps(inv.to_dict(), indent=2), flush=True)
    if not inv.nvml_available:
        print(f"no GPU check on this machine: {inv.note}")
        return 0
    print("== NVML samples")
    for _ in range(SAMPLES):
        print(json.dumps(read_gpu_samples()), flush=True)
        time.sleep(0.5)
    import torch  # only now: importing torch is slow, and the no-GPU path does not need it

    if not torch.cuda.is_available():
        print("NVML sees GPUs but torch has no CUDA (a CPU-only torch build?); engine check skipped")
        return 0
    failed = generate(1)
    if torch.cuda.device_count() >= 2:
        failed |= generate(2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
