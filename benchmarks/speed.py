"""Training speed: the tutorial pipeline against this project's loop, measured in one run.

    python benchmarks/speed.py --data-dir DATA                # full MNIST: DATA/MNIST/raw
    python benchmarks/speed.py                                # offline: the bundled sample
    python benchmarks/speed.py --arch unet --widths 8,16      # another model (default: basic)

(a) tutorial: torchvision.datasets.MNIST(transform=ToTensor()) + DataLoader(batch_size=128,
    shuffle=True) + noise added per batch, model in the default memory format.
(b) project:  train.train_epoch over preloaded tensors, as `python train.py` runs it.
Both train the same architecture from the same initial weights for the same number of steps,
alternating A, B, A, B, ...; the ratio of each pair is printed, then the median.
"""

import argparse
import collections
import copy
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from unittest import mock

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import model  # noqa: E402
import train  # noqa: E402

TUTORIAL_BATCH_SIZE = 128


def tutorial_run(net, root, steps, noise_std, seed):
    """Train `steps` batches the way most tutorials do; returns images per second."""
    from torchvision import datasets, transforms

    torch.manual_seed(seed)
    dataset = datasets.MNIST(root, train=True, transform=transforms.ToTensor())
    loader = DataLoader(dataset, batch_size=TUTORIAL_BATCH_SIZE, shuffle=True)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    seen, start = 0, time.perf_counter()
    for step, (clean, _) in enumerate(loader):  # B x 1 x 28 x 28, via PIL per item
        if step == steps:
            break
        noisy = (clean + noise_std * torch.randn_like(clean)).clamp(0, 1)  # B x 1 x 28 x 28
        loss = F.mse_loss(net(noisy), clean)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seen += len(clean)
    loss.item()
    return seen / (time.perf_counter() - start)


def project_run(net, images, steps, batch_size, noise_std, *, seed, fused=False,
                amp=False):
    """Train `steps` batches with this project's loop; returns images per second. `fused` uses
    Adam's fused kernel (a variant; train.py uses the default); `amp`: bfloat16 autocast."""
    net = net.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, fused=fused or None)
    generator = torch.Generator().manual_seed(seed)
    subset = images[: steps * batch_size]  # N x 1 x 28 x 28, already in memory
    start = time.perf_counter()
    noise = train.Noise("gaussian", noise_std)
    train.train_epoch(net, optimizer, subset, generator, noise=noise, batch_size=batch_size,
                      amp=amp)
    return len(subset) / (time.perf_counter() - start)


VARIANTS = ("bf16", "fused-adam", "batch-256", "batch-512", "compile")


def variant_speeds(fresh, images, steps, noise_std, names, pairs=3):
    """The project's loop at batch 128 in float32 (A) against one change at a time (B), on the
    same steps x 128 images, alternating A, B `pairs` times. Yields (name, median B/A ratio,
    B's median images/s, note); `fresh()` gives the model to train."""
    for name in names:
        ratios, speeds, compiling = [], [], []
        for pair in range(pairs):
            base = project_run(fresh(), images, steps, 128, noise_std, seed=pair)
            if name.startswith("batch-"):
                batch = int(name.split("-")[1])
                speed = project_run(fresh(), images, max(1, steps * 128 // batch), batch,
                                    noise_std, seed=pair)
            elif name == "bf16":
                speed = project_run(fresh(), images, steps, 128, noise_std, seed=pair, amp=True)
            elif name == "fused-adam":
                speed = project_run(fresh(), images, steps, 128, noise_std, seed=pair, fused=True)
            elif name == "compile":
                torch._dynamo.reset()  # forget what earlier pairs compiled in this process
                net = torch.compile(fresh())
                # an empty cache: what a first run pays (torch keeps compiled code on disk)
                with tempfile.TemporaryDirectory(prefix="inductor-") as cache, \
                        mock.patch.dict(os.environ, {"TORCHINDUCTOR_CACHE_DIR": cache}):
                    start = time.perf_counter()
                    project_run(net, images, 2, 128, noise_std, seed=pair)  # compiles
                    compiling.append(time.perf_counter() - start)
                    speed = project_run(net, images, steps, 128, noise_std, seed=pair)
            else:
                raise ValueError(f"unknown variant {name!r} (choose from {', '.join(VARIANTS)})")
            ratios.append(speed / base)
            speeds.append(speed)
        # the first pair's: later pairs reuse the machine code this process has compiled
        note = f"; compiling (the first 2 steps) took {compiling[0]:.1f} s" if compiling else ""
        yield name, statistics.median(ratios), statistics.median(speeds), note


def variant_list(text):
    """argparse type for --variants: 'fused-adam,compile' -> ['fused-adam', 'compile']."""
    names = [name for name in text.split(",") if name]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)} "
                                         f"(choose from {', '.join(VARIANTS)})")
    return names


def process_speeds(dataset, data_dir, config, batch_size, processes, pairs):
    """One epoch of `python train.py` with the model `config` describes and `batch_size`
    images per step (the global batch under torchrun), as 1 process of
    `processes` threads (A) against `processes` torchrun processes of 1 thread each (B) on
    `dataset`, alternated `pairs` times on the same cores. Yields the training images/s of
    each (A, B) pair, read from train.py's epoch line."""
    script = os.path.join(ROOT, "train.py")
    together = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={processes}", script]
    with tempfile.TemporaryDirectory(prefix="speed-processes-") as scratch:
        flags = ["--dataset", dataset, "--epochs", "1", "--data-dir", data_dir, "--overwrite",
                 "--checkpoint", os.path.join(scratch, "run.pt"), "--batch-size",
                 str(batch_size), "--arch", config["arch"],
                 "--widths", ",".join(map(str, config["widths"]))]
        for _ in range(pairs):
            speeds = []
            for command, threads in (([sys.executable, script], processes), (together, 1)):
                run = subprocess.run(command + flags, capture_output=True, text=True, cwd=scratch,
                                     env={**os.environ, "OMP_NUM_THREADS": str(threads)})
                found = re.search(r"([\d,]+) img/s", run.stdout)
                if run.returncode or not found:  # train.py's own error line, if it wrote one
                    why = [line for line in run.stderr.splitlines() if "train.py: error:" in line]
                    raise RuntimeError(f"{' '.join(command)} failed: "
                                       f"{(why or [run.stderr.strip()[-300:]])[0]}")
                speeds.append(float(found.group(1).replace(",", "")))
            yield tuple(speeds)


def say_process_speeds(pairs, processes):
    """Print each (1 process, `processes` processes) pair of images/s, its ratio, the median."""
    ratios = []
    for pair, (alone, together) in enumerate(pairs, 1):
        ratios.append(together / alone)
        print(f"processes, pair {pair}: 1 x {processes} threads {alone:8,.0f} img/s   "
              f"{processes} x 1 thread {together:8,.0f} img/s   "
              f"ratio {ratios[-1]:.2f}x", flush=True)
    print(f"median ratio ({processes} processes / 1): {statistics.median(ratios):.2f}x")


def evaluation_speed(net, clean, noise_std, amp=False):
    """How fast train.py scores the test set after every epoch: (images per second of
    denoising it, seconds of the whole evaluation: denoise, then PSNR and SSIM)."""
    noisy = train.fixed_noisy_test_set(clean, train.Noise("gaussian", noise_std))  # N x C x H x W
    net = net.to(memory_format=torch.channels_last)
    train.evaluate(net, noisy[:1000], clean[:1000], amp)  # warm-up
    start = time.perf_counter()
    train.denoise(net, noisy, amp=amp)
    middle = time.perf_counter()
    train.evaluate(net, noisy, clean, amp)
    return len(noisy) / (middle - start), time.perf_counter() - middle


def training_flops_per_image(net, shape):
    """FLOPs of one forward + backward pass per image, counted by torch's FlopCounterMode."""
    x = torch.rand(16, *shape)  # 16 x C x H x W
    with FlopCounterMode(display=False) as counter:
        F.mse_loss(net(x), x).backward()
    net.zero_grad(set_to_none=True)
    return counter.get_total_flops() / len(x)


def matmul_flops_per_second(n=1024, repeats=20):
    """Measured float32 matmul throughput of this CPU (the practical peak)."""
    a, b = torch.rand(n, n), torch.rand(n, n)  # n x n each
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n ** 3 * repeats / (time.perf_counter() - start)


KERNEL_PARTS = ("forward", "input gradient", "weight gradient")


def convolution_inputs(net, shape, batch_size):
    """Each convolution of `net` (made channels-last, as train.py runs it) with the input it
    sees in a training forward pass of a random batch of `batch_size` images of `shape`
    (C, H, W), and whether training computes that input's gradient (not for the first layer,
    whose input is the data)."""
    net, inputs = net.to(memory_format=torch.channels_last), {}

    def keep(conv, args):  # returns None: the input goes on unchanged
        inputs[conv] = args[0].detach(), args[0].requires_grad

    hooks = [m.register_forward_pre_hook(keep) for m in net.modules()
             if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    # with autograd on, as in training: requires_grad tells which inputs get a gradient
    net(torch.rand(batch_size, *shape).to(memory_format=torch.channels_last))  # B x C x H x W
    for hook in hooks:
        hook.remove()
    return inputs


def kernel_times(inputs, repeats=20):
    """Seconds that one training step spends in the convolutions of `inputs` (from
    convolution_inputs), by part (KERNEL_PARTS) and dtype, summed over the layers, each layer
    timed in float32 and then in bfloat16 (the dtype autocast gives it): {(dtype, part): s}.
    The weight gradient includes the bias's, which the same kernel computes."""
    times = collections.Counter()
    for conv, (x, needs_grad) in inputs.items():
        for dtype in (torch.float32, torch.bfloat16):
            layer = copy.deepcopy(conv).to(dtype)
            given = x.to(dtype).clone().requires_grad_()  # B x C x H x W
            y = layer(given)  # B x C' x H' x W'
            grad = torch.randn_like(y)  # B x C' x H' x W'
            weights = tuple(p for p in (layer.weight, layer.bias) if p is not None)
            # autograd.grad asks ConvolutionBackward for the named inputs' gradients alone
            parts = {"forward": lambda: layer(given),
                     "input gradient": lambda: torch.autograd.grad(y, given, grad,
                                                                   retain_graph=True),
                     "weight gradient": lambda: torch.autograd.grad(y, weights, grad,
                                                                    retain_graph=True)}
            if not needs_grad:  # training never computes it
                del parts["input gradient"]
            for part, run in parts.items():
                run()  # warm-up: oneDNN builds its kernel on the first call
                start = time.perf_counter()
                for _ in range(repeats):
                    run()
                times[dtype, part] += (time.perf_counter() - start) / repeats
    return times


def say_kernel_times(inputs, rounds):
    """Print the time per step of the convolutions' parts in float32 and bfloat16 (the median
    of `rounds` rounds of kernel_times) and bfloat16's speed relative to float32's."""
    runs = [kernel_times(inputs) for _ in range(rounds)]
    print(f"convolutions ({len(inputs)} layers), per training step, median of {rounds} rounds:")
    for part in KERNEL_PARTS:
        fp32, bf16 = (statistics.median(run[dtype, part] for run in runs)
                      for dtype in (torch.float32, torch.bfloat16))
        print(f"  {part:15s}  float32 {fp32 * 1e3:6.2f} ms  bfloat16 {bf16 * 1e3:6.2f} ms  "
              f"bfloat16 runs at {fp32 / bf16:.2f}x float32's speed", flush=True)


def profile_steps(net, images, steps, batch_size, noise_std, rows=12):
    """torch.profiler's table of where `steps` training steps of the project's loop spend their
    CPU time, by operator and input shape."""
    from torch.profiler import ProfilerActivity, profile

    net = net.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    noise = train.Noise("gaussian", noise_std)
    train.train_epoch(net, optimizer, images[: 5 * batch_size], generator, noise=noise,
                      batch_size=batch_size)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        train.train_epoch(net, optimizer, images[: steps * batch_size], generator, noise=noise,
                          batch_size=batch_size)
    return prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total",
                                                              row_limit=rows)


def main(argv=None):
    """Run the pairs and print images/s, ratios, evaluation speed and hardware utilisation."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=train.HelpFormatter)
    train.add_data_dir_flag(p)
    p.add_argument("--pairs", type=train.positive_int, default=3, help="A, B pairs to run")
    p.add_argument("--steps", type=train.positive_int, default=150, help="training steps per run")
    # the project's loop; the tutorial's is fixed at 128
    train.add_batch_size_flag(p, default=train.RUN_DEFAULTS["batch_size"])
    train.add_model_flags(p)  # the model both loops train
    p.add_argument("--profile", action="store_true",
                   help="also print torch.profiler's table for 30 steps of the project's loop")
    p.add_argument("--kernels", action="store_true",
                   help="also time the model's convolutions, forward pass, input gradient and "
                        "weight gradient apart, in float32 against bfloat16 (median of --pairs "
                        "rounds)")
    p.add_argument("--processes", type=train.positive_int, default=None,
                   help="also time one epoch of train.py as 1 process of N threads against N "
                        "torchrun processes of 1 thread")
    p.add_argument("--variants", type=variant_list, default=[],
                   help="also time the project's loop with one change at a time, comma-separated: "
                        + ", ".join(VARIANTS))
    args = p.parse_args(argv)

    try:
        ds = data.load_dataset("mnist", args.data_dir or "data")
        config = model.model_config(args.arch or train.RUN_DEFAULTS["arch"], 1, args.widths)
        model.check_size(ds.train_x, config["widths"])
        if args.processes:  # the torchrun runs' batches, before anything is measured
            pixels = train.deepest_pixels(ds.train_x.shape[2:], config["widths"], "supervised")
            train.check_batches(len(ds.train_x), args.batch_size, args.processes, pixels)
    except (data.DataError, ValueError, train.UsageError) as e:
        p.error(str(e))
    print(ds.note)
    steps = min(args.steps, len(ds.train_x) // max(args.batch_size, TUTORIAL_BATCH_SIZE))
    if steps == 0:
        p.error(f"--batch-size {args.batch_size} is larger than the {len(ds.train_x):,} "
                f"training images")
    with tempfile.TemporaryDirectory(prefix="speed-mnist-") as scratch:
        root = args.data_dir or "data"
        if not data.raw_files_present("mnist", root):
            # offline: give the tutorial pipeline the same sample, in torchvision's layout
            root = scratch
            raw = os.path.join(root, "MNIST", "raw")
            for prefix, x, y in [("train", ds.train_x, ds.train_y),
                                 ("t10k", ds.test_x, ds.test_y)]:
                data.write_idx(raw, prefix, (x[:, 0] * 255).round(), y)  # N x 28 x 28 uint8
        code = measure(ds, root, config, steps=steps, batch_size=args.batch_size,
                       pairs=args.pairs, profile=args.profile, variants=args.variants,
                       kernels=args.kernels)
    if args.processes:
        say_process_speeds(process_speeds(ds.name, os.path.abspath(args.data_dir or "data"),
                                          config, args.batch_size, args.processes, args.pairs),
                           args.processes)
    return code


def measure(ds, root, config, *, steps, batch_size, pairs, profile, variants=(), kernels=False,
            noise_std=0.5):
    """The measurements main prints for the model `config` describes: pairs of runs, evaluation
    speed, FLOPs, the variants of the project's loop asked for (VARIANTS), the convolutions'
    parts in float32 and bfloat16, a profile."""
    torch.manual_seed(0)
    initial = model.build_model(config).state_dict()

    def fresh():
        net = model.build_model(config)
        net.load_state_dict(initial)
        return net

    native = train.resolve_precision("auto", torch.device("cpu")) == "bf16"  # as train.py runs
    print(f"model: {config['arch']} {config['widths']}, {steps} steps per run, "
          f"tutorial batch {TUTORIAL_BATCH_SIZE}, project batch {batch_size}, "
          f"{torch.get_num_threads()} threads; this CPU " + (
              "computes bfloat16 natively: the project runs in bf16" if native
              else "has no native bfloat16: the project runs in fp32"))
    ratios, project_speeds = [], []
    for pair in range(1, pairs + 1):
        a = tutorial_run(fresh(), root, steps, noise_std, seed=pair)
        b = project_run(fresh(), ds.train_x, steps, batch_size, noise_std, seed=pair, amp=native)
        ratios.append(b / a)
        project_speeds.append(b)
        print(f"pair {pair}: tutorial {a:8,.0f} img/s   project {b:8,.0f} img/s   "
              f"ratio {b / a:.2f}x", flush=True)
    print(f"median ratio (project / tutorial): {statistics.median(ratios):.2f}x")

    denoising, evaluation = evaluation_speed(fresh(), ds.test_x, noise_std, amp=native)
    print(f"evaluation: {denoising:,.0f} img/s (denoising {len(ds.test_x):,} test images, "
          f"batches of {train.EVAL_BATCH_SIZE})")
    print(f"evaluation after each epoch (denoise + PSNR + SSIM): {evaluation:.2f} s")
    flops = training_flops_per_image(fresh(), tuple(ds.train_x.shape[1:]))
    peak = matmul_flops_per_second()
    achieved = flops * statistics.median(project_speeds)
    print(f"training cost: {flops / 1e6:.2f} MFLOP per image (forward + backward); "
          f"achieved {achieved / 1e9:.1f} GFLOP/s = {achieved / peak:.0%} of this CPU's "
          f"measured matmul throughput ({peak / 1e9:.0f} GFLOP/s)")
    variants = ["bf16"] + [name for name in variants if name != "bf16"]  # always: fp32 vs bf16
    if variants:
        images = ds.train_x[: steps * 128]  # N x 1 x 28 x 28, the same for every variant
        for name, ratio, speed, note in variant_speeds(fresh, images, steps, noise_std, variants,
                                                       pairs):
            print(f"variant {name}: {speed:,.0f} img/s, {ratio:.2f}x the project's float32 loop "
                  f"(median of {pairs} pairs){note}", flush=True)
    if kernels:
        say_kernel_times(convolution_inputs(fresh(), tuple(ds.train_x.shape[1:]), batch_size),
                         pairs)
    if profile:
        print(profile_steps(fresh(), ds.train_x, 30, batch_size, noise_std))
    return 0


if __name__ == "__main__":
    sys.exit(main())
