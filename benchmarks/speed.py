"""Training speed, measured in pairs in one run: ratios compare, absolute numbers do not.

    python benchmarks/speed.py --data-dir DATA   # full MNIST: DATA/MNIST/raw (else the sample)
    python benchmarks/speed.py --processes 2     # also 1 x 2 threads against 2 x 1 process
    python benchmarks/speed.py --device cuda     # the pairs on a GPU

Tutorial: torchvision's MNIST, ToTensor, DataLoader(batch_size=128, shuffle=True), noise per
batch. Project: train.train_epoch over tensors in memory, as train.py runs it. The same model,
weights and steps, alternating A, B, A, B; then the project's loop in float32 against bfloat16.
"""

import argparse
import copy
import os
import re
import statistics
import struct
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import model  # noqa: E402
import train  # noqa: E402

NOISE = train.Noise("gaussian", 0.5)


def tutorial_run(net, root, steps, device):
    """Train `steps` batches of 128 the way most tutorials do; returns images per second."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    dataset = datasets.MNIST(root, train=True, transform=transforms.ToTensor())
    optimizer, start = torch.optim.Adam(net.parameters(), lr=1e-3), time.perf_counter()
    for step, (clean, _) in enumerate(DataLoader(dataset, batch_size=128, shuffle=True)):
        if step == steps:
            break
        clean = clean.to(device)  # B x 1 x 28 x 28, through PIL item by item
        noisy = (clean + NOISE.level * torch.randn_like(clean)).clamp(0, 1)
        loss = F.mse_loss(net(noisy), clean)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    loss.item()  # wait for the device
    return steps * 128 / (time.perf_counter() - start)


def project_run(net, images, steps, batch_size, amp=False):
    """Train `steps` batches with this project's loop; returns images per second."""
    net = net.to(images.device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    order, start = torch.randperm(steps * batch_size), time.perf_counter()
    train.train_epoch(net, optimizer, images, order, torch.Generator(images.device).manual_seed(0),
                      noise=NOISE, batch_size=batch_size, amp=amp)  # ends with a sync
    return steps * batch_size / (time.perf_counter() - start)


def say_pairs(names, runs, pairs):
    """Run `runs` (two functions giving images/s) alternately `pairs` times; print each pair,
    its ratio and the median ratio of B to A."""
    ratios = []
    for pair in range(1, pairs + 1):
        a, b = (run() for run in runs)
        ratios.append(b / a)
        print(f"pair {pair}: {names[0]} {a:9,.0f} img/s   {names[1]} {b:9,.0f} img/s   "
              f"ratio {b / a:.2f}x", flush=True)
    print(f"median ratio ({names[1]} / {names[0]}): {statistics.median(ratios):.2f}x")


def write_mnist(root, ds):
    """A data set's images as the IDX files torchvision's MNIST reads from root (labels 0)."""
    folder = os.path.join(root, "MNIST", "raw")
    os.makedirs(folder, exist_ok=True)
    for prefix, split in (("train", ds.train), ("t10k", ds.test)):
        n, _, h, w = split.shape
        pixels = (split[:, 0] * 255).round().to(torch.uint8).numpy().tobytes()  # N x H x W
        for kind, blob in (("images-idx3", struct.pack(">4i", 0x803, n, h, w) + pixels),
                           ("labels-idx1", struct.pack(">2i", 0x801, n) + bytes(n))):
            with open(os.path.join(folder, f"{prefix}-{kind}-ubyte"), "wb") as f:
                f.write(blob)
    return root


def epoch_speed(processes, threads, flags):
    """Training images/s of one epoch of train.py on `processes` processes (torchrun if more
    than one) of `threads` threads each, from its epoch line."""
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command = [sys.executable, *(launch if processes > 1 else []), os.path.join(ROOT, "train.py")]
    run = subprocess.run(command + flags, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    found = re.search(r"([\d,]+) img/s", run.stdout)
    if run.returncode or not found:
        raise SystemExit(f"speed.py: error: {' '.join(command)}: {run.stderr.strip()[-300:]}")
    return float(found.group(1).replace(",", ""))


def say_processes(dataset, data_dir, processes, pairs):
    """One epoch of train.py as 1 process of N threads (A) against N torchrun processes of 1
    thread (B), on the same cores."""
    with tempfile.TemporaryDirectory() as scratch:
        flags = ["--dataset", dataset, "--data-dir", data_dir, "--epochs", "1", "--overwrite",
                 "--checkpoint", f"{scratch}/run.pt", "--device", "cpu"]  # a CPU's question
        say_pairs((f"1 x {processes} threads", f"{processes} x 1 thread"),
                  (lambda: epoch_speed(1, processes, flags),
                   lambda: epoch_speed(processes, 1, flags)), pairs)


def main(argv=None):
    """Print the pairs: tutorial vs project, fp32 vs bf16, and optionally 1 vs N processes."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="data", help="where MNIST is (default: data)")
    p.add_argument("--steps", type=train.number(int, 1, 10 ** 6), default=150, help="steps per run")
    p.add_argument("--pairs", type=train.number(int, 1, 1000), default=3, help="A, B pairs to run")
    p.add_argument("--device", default="cpu", choices=["cpu"] + [
        d.type for d in [torch.accelerator.current_accelerator(check_available=True)] if d])
    p.add_argument("--processes", type=train.number(int, 2, 256), help="also time an epoch of "
                   "train.py as 1 process of N threads against N torchrun processes")
    args = p.parse_args(argv)
    ds = data.load_dataset("mnist", args.data_dir)
    print(ds.note)
    steps = min(args.steps, len(ds.train) // 128)  # both loops: batches of 128
    torch.manual_seed(0)
    initial = model.build_model(train.run_config({"channels": 1}, 1)).to(args.device)  # copied

    print(f"model: basic (train.py's), {steps} steps of 128 images per run, "
          f"{args.device}, {torch.get_num_threads()} threads")
    images = ds.train.to(args.device)  # N x 1 x 28 x 28
    with tempfile.TemporaryDirectory() as scratch:
        # offline, the tutorial reads the same sample, from IDX files
        root = args.data_dir if ds.name == "mnist" else write_mnist(scratch, ds)
        say_pairs(("tutorial", "project"), (
            lambda: tutorial_run(copy.deepcopy(initial), root, steps, args.device),
            lambda: project_run(copy.deepcopy(initial), images, steps, 128)), args.pairs)
    say_pairs(("fp32", "bf16"), (
        lambda: project_run(copy.deepcopy(initial), images, steps, 128),
        lambda: project_run(copy.deepcopy(initial), images, steps, 128, amp=True)),
        args.pairs)
    if args.processes:
        say_processes(ds.name, os.path.abspath(args.data_dir), args.processes, args.pairs)


if __name__ == "__main__":
    main()
