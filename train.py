"""Train a convolutional denoising autoencoder: noisy image in, clean image out.

    python train.py --epochs 10            # MNIST, Gaussian noise of std 0.5
    python visualize.py                    # draw noisy / clean / denoised for that model
"""

import argparse
import contextlib
import math
import os
import random
import re
import signal
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import model as models

DEFAULT_CHECKPOINT = "checkpoints/autoencoder.pt"
TEST_NOISE_SEED = 2024  # independent of --seed: every run and epoch is scored on the same noise
DEFAULT_BATCH_SIZE = 128
EVAL_BATCH_SIZE = 1000  # inference only: large batches are fastest and fit easily in memory
FINITE_CHECK_EVERY = 50  # steps between checks that the loss is finite (each check syncs a GPU)
LR_SCHEDULES = ("constant", "onecycle")


class NonFiniteLoss(Exception):
    """The training loss became NaN or infinite; `step` is the step at which it was seen."""

    def __init__(self, step):
        super().__init__(f"non-finite loss by step {step}")
        self.step = step


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's default, except where the default is None: those flags say in
    their help what they fall back to, and "(default: None)" would only confuse."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def positive_int(text):
    """argparse type: an integer > 0."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text):
    """argparse type: a finite float > 0."""
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def seed_int(text):
    """argparse type: a seed NumPy accepts too, 0 <= seed < 2**32."""
    value = int(text)
    if not 0 <= value < 2 ** 32:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**32), got {text}")
    return value


def widths_list(text):
    """argparse type for --widths: '32,64' -> [32, 64], one positive channel count per level."""
    try:
        widths = [int(w) for w in text.split(",")]
    except ValueError:
        widths = []
    if not widths or min(widths) <= 0:
        raise argparse.ArgumentTypeError(f"must be positive integers separated by commas "
                                         f"(e.g. 32,64), got {text!r}")
    return widths


def open_device(name):
    """pick_device, then touch the device, so that an unknown or absent one fails now with one
    line (RuntimeError) instead of mid-run."""
    try:
        device = pick_device(name)
        torch.empty(0, device=device)
    except Exception as e:  # torch says it in many ways: RuntimeError, AssertionError, ...
        raise RuntimeError(f"device {name!r} cannot be used: {_first_line(e)}") from e
    return device


def _first_line(error):
    lines = str(error).strip().splitlines()
    return lines[0][:200] if lines else type(error).__name__


def pick_device(name="auto"):
    """'auto' -> cuda if available, then mps, then cpu; any other name is used as given."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def psnr(pred, target):
    """Peak signal-to-noise ratio in dB, data range 1, computed per image and averaged.

    Per image, because a mean over pixels of the whole set would let the easy images hide the
    hard ones. MSE is floored at 1e-10 (100 dB) so that a perfect image stays finite.
    """
    return psnr_per_image(pred, target).mean().item()


def psnr_per_image(pred, target):
    """PSNR in dB of each image (data range 1): N x C x H x W, N x C x H x W -> N."""
    mse = (pred - target).square().flatten(1).mean(1)  # N
    return -10 * torch.log10(mse.clamp_min(1e-10))  # N


def ssim(pred, target, batch_size=EVAL_BATCH_SIZE):
    """Mean structural similarity (torchmetrics, Gaussian window 11, sigma 1.5, data range 1).

    Computed per image in chunks, so memory stays flat for large test sets. oneDNN is switched
    off for it: its kernel for the one-channel 11x11 Gaussian window is slow on a CPU (10,000
    MNIST images: 1.6 s with it, 0.7 s without, same values), and SSIM runs after every epoch.
    """
    # imported here: torchmetrics imports torchvision's models, 1.6 s that --help and a
    # mistyped flag should not wait for
    from torchmetrics.functional.image import structural_similarity_index_measure

    # None: leave oneDNN's other settings alone (setting them warns on CPUs without TF32)
    with torch.backends.mkldnn.flags(enabled=False, deterministic=None, allow_tf32=None,
                                     fp32_precision=None):
        per_image = [
            structural_similarity_index_measure(p.float(), t.float(), data_range=1.0,
                                                reduction="none")
            for p, t in zip(pred.split(batch_size), target.split(batch_size))
        ]  # chunks of N_chunk
    return torch.cat(per_image).mean().item()


def fixed_noisy_test_set(clean, level, kind="gaussian"):
    """The test images with noise drawn once from TEST_NOISE_SEED (not --seed), so that PSNR
    and SSIM compare across runs, seeds and epochs."""
    generator = torch.Generator(device=clean.device).manual_seed(TEST_NOISE_SEED)
    return data.add_noise(clean, level, generator, kind)  # N x C x H x W


@torch.inference_mode()
def denoise(model, noisy, batch_size=EVAL_BATCH_SIZE):
    """Run the model over `noisy` in batches, in eval mode: N x C x H x W -> N x C x H x W."""
    was_training = model.training
    model.eval()
    out = torch.cat([model(chunk) for chunk in noisy.split(batch_size)])  # N x C x H x W
    model.train(was_training)
    return out


def evaluate(model, noisy, clean, batch_size=EVAL_BATCH_SIZE):
    """Denoise `noisy` and score it against `clean`: returns (PSNR dB, SSIM)."""
    restored = denoise(model, noisy, batch_size)  # N x C x H x W
    return psnr(restored, clean), ssim(restored, clean)


class Interrupted(Exception):
    """Training stopped between two steps on request; `position` says where, for an exact resume."""

    def __init__(self, position):
        super().__init__(f"interrupted after step {position['step']}")
        self.position = position


def train_epoch(model, optimizer, images, batch_size, noise_level, generator, progress=None,
                position=None, should_stop=None, amp=False, noise="gaussian", scheduler=None):
    """One pass over `images` (clean, N x C x H x W): fresh noise per batch, MSE to the clean
    image, one Adam step per batch. Returns the mean training loss as a float; raises
    NonFiniteLoss if the loss is NaN or inf.

    The model sees only the noisy batch; the clean batch is the target (feeding it the clean
    image, a common tutorial bug, turns denoising into an identity map).

    `should_stop()`, if given, is asked after every step; when it says yes, Interrupted is raised
    with the position after that step: {"order", "step", "loss_sum"}. Passing that `position`
    back (with the generator in the state it was then) finishes the epoch exactly as an
    uninterrupted run would have. `amp` runs the forward pass under bfloat16 autocast (meant
    for CUDA; the loss and the weights stay float32). `noise` is one of data.NOISES and
    `noise_level` its level (or a [lo, hi] range), as data.add_noise takes them. `scheduler`, if
    given (make_scheduler), steps after every Adam step.
    """
    model.train()
    if position is None:
        position = {"order": data.shuffle(len(images), generator), "step": 0, "loss_sum": 0.0}
    order, done = position["order"].to(images.device), position["step"]  # N, steps already done
    # summed on the device: no host sync per step
    total = torch.tensor(position["loss_sum"], device=images.device)  # scalar
    step = done
    for step, idx in enumerate(data.batches(order, batch_size, done), done + 1):
        clean = images[idx]  # B x C x H x W
        noisy = data.add_noise(clean, noise_level, generator, noise)  # B x C x H x W
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
            restored = model(noisy)  # B x C x H x W
        loss = F.mse_loss(restored.float(), clean)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total += loss.detach() * len(idx)
        if step % FINITE_CHECK_EVERY == 0 and not torch.isfinite(total):
            raise NonFiniteLoss(step)
        if progress is not None:
            progress.update(1)
        if should_stop is not None and should_stop():
            if not torch.isfinite(total):  # never save NaN weights as a resumable state
                raise NonFiniteLoss(step)
            raise Interrupted({"order": order.cpu(), "step": step, "loss_sum": total.item()})
    if not torch.isfinite(total):
        raise NonFiniteLoss(step)
    return total.item() / len(images)


def make_scheduler(optimizer, schedule, total_steps):
    """The learning-rate schedule of a run of `total_steps` Adam steps: None for "constant";
    for "onecycle", torch's OneCycleLR with the optimizer's lr as its peak: a warm-up from lr/25
    over the first 25% of the steps, then a cosine decay to lr/250,000 (Adam's beta1 moves the
    other way). A short run gains from it: the last steps, at a small lr, settle the weights."""
    if schedule == "constant":
        return None
    if schedule == "onecycle":
        peak = optimizer.param_groups[0]["lr"]
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peak, total_steps=total_steps)
    raise ValueError(f"unknown lr schedule {schedule!r} (choose from {', '.join(LR_SCHEDULES)})")


def save_checkpoint(checkpoint, path):
    """Write `checkpoint` atomically: a temporary file in the same folder, then os.replace.

    A crash mid-write leaves the previous checkpoint intact and no temporary file behind.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# The config keys that train.py and visualize.py read from every checkpoint.
CONFIG_KEYS = ("arch", "channels", "widths", "dataset", "data_dir", "noise", "noise_level")


class CheckpointError(Exception):
    """A checkpoint that cannot be used. The message is one line naming the file."""


def _load_failure(error):
    """A short reason for a failed weights-only torch.load (torch's own messages run to pages)."""
    text = " ".join(str(error).split())
    found = re.search(r"unsupported GLOBAL (\S+)", text)
    if found:  # the pickle names a function or class to call: refused, never run
        return f"it asks to call {found.group(1)} when loaded; refused, only tensors are loaded"
    if isinstance(error, EOFError) or "PytorchStreamReader" in text or "zip" in text.lower():
        return "empty, truncated or not a torch file"
    if "Weights only load failed" in text:
        return "not a torch checkpoint of tensors and plain values"
    return f"unreadable ({text[:120]})"


def _mismatch(error):
    """The first line of a strict load_state_dict failure, and how many more there are."""
    text = " ".join(str(error).split())
    text = re.sub(r"^Error\(s\) in loading state_dict for \w+: ", "", text)
    parts = re.split(r"\.\s+(?=size mismatch|Missing key|Unexpected key)", text)
    more = f" (and {len(parts) - 1} more)" if len(parts) > 1 else ""
    return parts[0].rstrip(".") + more


def load_checkpoint(path):
    """Load a checkpoint written by save_checkpoint, on the CPU, with weights_only=True.

    weights_only=True lets the unpickler build only tensors and plain containers: a file that
    would call a function (os.system, ...) is refused instead of executed.
    Raises CheckpointError with one line naming the file and the problem.
    """
    hint = "run python train.py first"
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist; {hint}")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} is a directory, not a file; {hint}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, random bytes, or a pickle that wants to run code
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {_load_failure(e)}") from e
    if not (isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict)
            and isinstance(checkpoint.get("config"), dict)):
        raise CheckpointError(f"{path} is not a checkpoint of this project "
                              f"(expected a dict with 'model' and 'config'); {hint}")
    config = checkpoint["config"]
    if "noise_std" in config and "noise_level" not in config:  # written before --noise existed
        config.update(noise="gaussian", noise_level=config.pop("noise_std"))
    config.setdefault("lr_schedule", "constant")  # written before --lr-schedule existed
    if config["lr_schedule"] not in LR_SCHEDULES or (
            config["lr_schedule"] != "constant" and not isinstance(config.get("epochs"), int)):
        raise CheckpointError(f"checkpoint {path} has an unusable lr schedule "
                              f"({config['lr_schedule']!r}, epochs {config.get('epochs')!r})")
    missing = [key for key in CONFIG_KEYS if key not in config]
    if missing:
        raise CheckpointError(f"checkpoint {path} has no {', '.join(missing)} in its config")
    wrong = [key for key in ("arch", "dataset", "data_dir", "noise")
             if not isinstance(config[key], str)]
    if wrong:
        raise CheckpointError(f"checkpoint {path} has a config whose {', '.join(wrong)} "
                              f"is not a string")
    try:
        data.check_noise(config["noise"], config["noise_level"])
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path} has an unusable noise setting: {e}") from e
    return checkpoint



def restore_model(checkpoint, path):
    """Rebuild the checkpoint's model from its config and load its weights (strictly)."""
    config = checkpoint["config"]
    try:
        net = models.build_model(config)
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path} has an unusable model config ({e})") from e
    try:
        net.load_state_dict(checkpoint["model"])
    except RuntimeError as e:
        raise CheckpointError(
            f"checkpoint {path}: weights do not fit its config ({config.get('arch')}, "
            f"{config.get('channels')} channels, widths {config.get('widths')}): {_mismatch(e)}"
        ) from e
    return net


def check_writable(path):
    """Raise OSError now, before any training, if the checkpoint's folder cannot be written."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryFile(dir=folder):
        pass
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory")


def add_checkpoint_flag(parser):
    """Declare --checkpoint (shared by train.py and visualize.py)."""
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                        help="checkpoint file: train.py writes it after every epoch, "
                             "visualize.py reads it")


def add_batch_size_flag(parser):
    """Declare --batch-size (shared by train.py and benchmarks/speed.py)."""
    parser.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE,
                        help="images per Adam step")


def parse_args(argv=None):
    """Flags of train.py. Returns (parser, args, the dests of the flags given explicitly)."""
    p = argparse.ArgumentParser(description="Train a convolutional denoising autoencoder.",
                                formatter_class=HelpFormatter,
                                allow_abbrev=False)  # so that given_flags sees every flag
    p.add_argument("--epochs", type=positive_int, default=10,
                   help="passes over the training set (with --resume: the total to reach)")
    add_batch_size_flag(p)
    p.add_argument("--lr", type=positive_float, default=1e-3,
                   help="Adam learning rate (with --lr-schedule onecycle: the peak)")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="constant",
                   help="constant, or onecycle: warm up to --lr over the first 25%% of the run's "
                        "steps, then decay to almost 0 by its last (try --lr 3e-3)")
    data.add_noise_flags(p)
    p.add_argument("--dataset", choices=data.DATASETS, default="mnist",
                   help="mnist falls back to mnist-sample (5,000 digits) when offline; "
                        "folder: every PNG/JPEG under --data-dir, recursively")
    p.add_argument("--channels", type=int, choices=(1, 3), default=None,
                   help="1 (gray) or 3 (colour): converts the images; default: the data set's "
                        "own (colour for a folder)")
    p.add_argument("--crop", type=positive_int, default=None,
                   help=f"--dataset folder only: train on random CROP x CROP crops and test on "
                        f"centre crops (default {data.DEFAULT_CROP})")
    data.add_data_dir_flag(p)
    p.add_argument("--arch", choices=models.ARCHS, default="basic", help="model architecture")
    p.add_argument("--widths", type=widths_list, default=None,
                   help="channels per level, comma-separated; each level halves the image, so "
                        "MNIST's 28 x 28 takes at most 2 (default: "
                        + "; ".join(f"{a} {','.join(map(str, w))}"
                                    for a, w in models.DEFAULT_WIDTHS.items()) + ")")
    p.add_argument("--seed", type=seed_int, default=0,
                   help="seeds Python, NumPy and torch: the weights, the data order and the noise")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), or a name")
    p.add_argument("--amp", action="store_true",
                   help="bfloat16 autocast for the forward pass (CUDA only)")
    p.add_argument("--deterministic", action="store_true",
                   help="use only deterministic algorithms (matters on CUDA; see README)")
    add_checkpoint_flag(p)
    p.add_argument("--overwrite", action="store_true",
                   help="let a new run replace an existing --checkpoint file")
    p.add_argument("--resume", metavar="CHECKPOINT",
                   help="continue this checkpoint's run, exactly, up to --epochs in total")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    if args.crop is not None and args.dataset != "folder":
        p.error("--crop is for --dataset folder (the other data sets are used whole)")
    model = models.model_config(args.arch, widths=args.widths)
    multiple = models.size_multiple(model)
    if args.dataset == "folder" and (args.crop or data.DEFAULT_CROP) % multiple:
        p.error(f"--crop must be a multiple of {multiple} for --arch {args.arch} with "
                f"{len(model['widths'])} levels")
    try:
        args.noise, args.noise_level = data.resolve_noise(args.noise, args.noise_level,
                                                          args.noise_std)
    except ValueError as e:
        p.error(str(e))
    given = given_flags(p, argv)
    if "noise_std" in given:  # one setting, two spellings: compare it as noise_level
        given = (given - {"noise_std"}) | {"noise", "noise_level"}
    return p, args, given


def given_flags(parser, argv):
    """The dests of the flags that appear in argv, as --flag or --flag=value."""
    named = {opt: action.dest for action in parser._actions for opt in action.option_strings}
    return {named[token.split("=")[0]] for token in argv if token.split("=")[0] in named}


# Flags a resume may not change (each flag's dest is also its config key): changing them would
# make the run something other than a continuation. --epochs, --checkpoint, --data-dir and
# --device (within one device type) may change.
RESUME_FIXED = ("arch", "widths", "dataset", "noise", "noise_level", "batch_size", "lr",
                "lr_schedule", "seed")


def resume_conflicts(config, flags):
    """Flags given on a resume ({dest: value}) that contradict the checkpoint's config."""
    return [f"--{key.replace('_', '-')} {value} (the checkpoint has {config[key]})"
            for key, value in flags.items() if key in RESUME_FIXED and value != config[key]]


def seed_everything(seed):
    """Seed Python's, NumPy's and torch's global generators (torch seeds CUDA too)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state(generator):
    """Every random state that training consumes, as tensors: for an exact resume."""
    state = {"generator": generator.get_state(), "torch_cpu": torch.get_rng_state(),
             "device": generator.device.type}  # a generator's state fits only its device type
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state, generator):
    """Restore what rng_state saved."""
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["torch_cuda"])


def make_checkpoint(net, optimizer, scheduler, config, history, epoch, generator, position=None):
    """What train.py saves: the model and its config for visualize.py, plus everything an exact
    resume needs (optimizer, lr schedule, completed epochs, random state, position inside an
    epoch)."""
    return {"model": {k: v.detach().cpu() for k, v in net.state_dict().items()},
            "config": config, "history": history, "epoch": epoch,
            "optimizer": optimizer.state_dict(),
            "scheduler": None if scheduler is None else scheduler.state_dict(),
            "rng": rng_state(generator), "position": position}


@contextlib.contextmanager
def stop_requests():
    """Turn SIGINT (Ctrl-C) and SIGTERM into a request that the training loop checks between
    steps, so that it stops with a consistent, saved state. Yields a dict whose "signal" becomes
    the signal's number; a second signal interrupts at once. Restores the handlers on exit."""
    requested = {"signal": None}

    def handler(signum, frame):
        if requested["signal"] is not None:
            raise KeyboardInterrupt
        requested["signal"] = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def new_config(ds, data_dir, crop, arch, widths, noise, noise_level, seed, epochs, batch_size,
               lr, lr_schedule, deterministic):
    """The checkpoint config of a new run: model, data, noise and training settings, versions.
    The data set is the one actually loaded (mnist-sample after the offline fallback)."""
    import torchvision  # only for its version here; see ssim for why not at the top

    return {
        **models.model_config(arch, ds.test_x.shape[1], widths),  # channels follow the data
        "dataset": ds.name, "data_dir": os.path.abspath(data_dir),
        "image_size": list(ds.test_x.shape[2:]), "crop": crop,
        "noise": noise, "noise_level": noise_level, "test_noise_seed": TEST_NOISE_SEED,
        "seed": seed, "epochs": epochs, "batch_size": batch_size, "lr": lr,
        "lr_schedule": lr_schedule,
        "deterministic": deterministic,
        "torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
    }


RESUME_KEYS = ("optimizer", "rng", "epoch", "history", "position")
RESUME_CONFIG_KEYS = ("batch_size", "lr", "seed")


def open_resume(path, flags, epochs):
    """Load a checkpoint to resume and check it against the flags given ({dest: value}) and the
    epochs asked for; raises CheckpointError with one line."""
    checkpoint = load_checkpoint(path)
    missing = ([k for k in RESUME_KEYS if k not in checkpoint]
               + [f"config {k}" for k in RESUME_CONFIG_KEYS if k not in checkpoint["config"]])
    if checkpoint["config"]["lr_schedule"] != "constant" and not checkpoint.get("scheduler"):
        missing.append("scheduler state")
    if missing:
        raise CheckpointError(f"checkpoint {path} cannot be resumed: it has no "
                              f"{', '.join(missing)} (not written by this train.py)")
    conflicts = resume_conflicts(checkpoint["config"], flags)
    if conflicts:
        raise CheckpointError(f"--resume {path}: flags contradict the checkpoint: "
                              + "; ".join(conflicts))
    schedule, planned = checkpoint["config"]["lr_schedule"], checkpoint["config"]["epochs"]
    if schedule != "constant":  # its lr curve spans exactly the epochs it was started with
        if checkpoint["epoch"] >= planned:
            raise CheckpointError(f"--resume {path}: its {schedule} lr schedule ended with "
                                  f"epoch {planned} and cannot be extended; start a new run")
        if epochs != planned:
            raise CheckpointError(f"--resume {path}: its {schedule} lr schedule spans {planned} "
                                  f"epochs and cannot be stretched; finish it with "
                                  f"--epochs {planned}")
    if epochs <= checkpoint["epoch"]:
        raise CheckpointError(f"--resume {path}: it has {checkpoint['epoch']} epochs already; "
                              f"ask for more with --epochs")
    return checkpoint


def main(argv=None):
    """Train, printing one line per epoch, and save a checkpoint after every epoch.

    Returns the exit code: 0, 1 (non-finite loss), 130 / 143 (stopped by SIGINT / SIGTERM);
    bad flags, data or checkpoints exit with 2 through argparse.
    """
    parser, args, given = parse_args(argv)
    with stop_requests() as requested:  # from here on, Ctrl-C never ends in a traceback
        return run(parser, args, given, requested)


def run(parser, args, given, requested):
    """The body of main, with SIGINT / SIGTERM turned into `requested["signal"]`."""
    checkpoint = net = None
    try:
        if args.resume:
            flags = {key: getattr(args, key) for key in given}
            checkpoint = open_resume(args.resume, flags, args.epochs)
            net = restore_model(checkpoint, args.resume)
            if "checkpoint" not in given:  # continue in the same file, not in the default one
                args.checkpoint = args.resume
        elif os.path.exists(args.checkpoint) and not args.overwrite:
            raise CheckpointError(f"{args.checkpoint} exists; continue it with --resume "
                                  f"{args.checkpoint}, or pass --overwrite or another "
                                  f"--checkpoint")
        if args.deterministic or (checkpoint and checkpoint["config"].get("deterministic")):
            # before any CUDA work: cuBLAS reads the workspace setting when it starts
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            args.deterministic = True
        check_writable(args.checkpoint)
        device = open_device(args.device)
        if args.amp and device.type != "cuda":  # CPUs without bf16 units only get slower
            raise RuntimeError(f"--amp needs a CUDA device, and this run is on {device}")
        if checkpoint and checkpoint["rng"].get("device", "cpu") != device.type:
            raise CheckpointError(f"--resume {args.resume}: its random state is from a "
                                  f"{checkpoint['rng'].get('device', 'cpu')} run; an exact "
                                  f"resume needs the same device type, not {device.type}")
    except (CheckpointError, OSError, RuntimeError) as e:
        parser.exit(2, f"train.py: error: {e}\n")
    dataset = checkpoint["config"]["dataset"] if checkpoint else args.dataset
    data_dir = (checkpoint["config"]["data_dir"] if checkpoint and "data_dir" not in given
                else args.data_dir)
    channels = checkpoint["config"]["channels"] if checkpoint else args.channels
    crop = (checkpoint["config"].get("crop") if checkpoint else args.crop) or data.DEFAULT_CROP
    try:
        ds = data.load_dataset(dataset, data_dir, channels=channels, crop=crop)
    except data.DataError as e:
        parser.exit(2, f"train.py: error: {e}\n")
    print(ds.note)
    if checkpoint and ds.name != checkpoint["config"]["dataset"]:
        parser.exit(2, f"train.py: error: --resume {args.resume} was trained on "
                       f"{checkpoint['config']['dataset']}, but {ds.name} was loaded; "
                       f"point --data-dir at the original data\n")

    seed_everything(args.seed)  # the weights' initialisation
    train_x, test_x = ds.train_x, ds.test_x.to(device)  # whole test set on the device
    if isinstance(train_x, torch.Tensor):  # a folder's images stay a list, cropped per epoch
        train_x = train_x.to(device)
    if checkpoint:  # what a resume may change is recorded, so that the next resume keeps it
        config = {**checkpoint["config"], "epochs": args.epochs,
                  "data_dir": os.path.abspath(data_dir), "deterministic": args.deterministic}
    else:
        config = new_config(ds, args.data_dir, crop if dataset == "folder" else None, args.arch,
                            args.widths, args.noise, args.noise_level, args.seed,
                            args.epochs, args.batch_size, args.lr, args.lr_schedule,
                            args.deterministic)
        multiple = models.size_multiple(config)
        if any(size % multiple for size in config["image_size"]):
            parser.exit(2, f"train.py: error: {len(config['widths'])} widths halve the image "
                           f"{len(config['widths'])} times, so its sides must be multiples of "
                           f"{multiple}; {ds.name} is "
                           f"{'x'.join(map(str, config['image_size']))}: use fewer --widths\n")
        net = models.build_model(config)
    generator = torch.Generator(device=device).manual_seed(config["seed"])  # order and noise
    # NHWC lets oneDNN pick its fast convolution kernels: ~1.6x per step on CPU (measured).
    net = net.to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(net.parameters(), lr=config["lr"])
    steps_per_epoch = math.ceil(data.images_per_epoch(train_x) / config["batch_size"])
    scheduler = make_scheduler(optimizer, config["lr_schedule"], steps_per_epoch * args.epochs)
    history, done, position = [], 0, None
    if checkpoint:
        if scheduler is not None and (checkpoint["scheduler"].get("total_steps")
                                      != scheduler.total_steps):  # a folder with other images
            parser.exit(2, f"train.py: error: --resume {args.resume}: its lr schedule has "
                           f"{checkpoint['scheduler'].get('total_steps')} steps, this data gives "
                           f"{scheduler.total_steps}; resume with the data it was trained on\n")
        optimizer.load_state_dict(checkpoint["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(checkpoint["scheduler"])
        set_rng_state(checkpoint["rng"], generator)
        history, done, position = checkpoint["history"], checkpoint["epoch"], checkpoint["position"]
        where = f", step {position['step']}" if position else ""
        print(f"resuming {args.resume}: {done} epochs done{where}, training to {args.epochs}")
    noise, level, batch_size = config["noise"], config["noise_level"], config["batch_size"]
    test_noisy = fixed_noisy_test_set(test_x, level, noise)  # N x C x H x W
    print(f"model: {config['arch']} {config['widths']}, {models.count_parameters(net):,} "
          f"parameters, device {device}, {data.images_per_epoch(train_x):,} "
          f"training images per epoch, lr {config['lr']:g} {config['lr_schedule']}")
    base_psnr, base_ssim = psnr(test_noisy, test_x), ssim(test_noisy, test_x)
    print(f"noisy input ({data.describe_noise(noise, level)}): test PSNR {base_psnr:.2f} dB, "
          f"SSIM {base_ssim:.4f}")

    if requested["signal"] is not None:  # came while loading: nothing new to save
        name = signal.Signals(requested["signal"]).name
        print(f"train.py: stopped by {name} before training; nothing saved", file=sys.stderr)
        return 128 + requested["signal"]
    for epoch in range(done + 1, args.epochs + 1):
        start = time.perf_counter()
        images = data.epoch_images(train_x, crop, config["seed"], epoch).to(device)  # N x C x H x W
        steps = math.ceil(len(images) / batch_size)
        try:
            with tqdm(total=steps, initial=position["step"] if position else 0,
                      desc=f"epoch {epoch}", leave=False, disable=None) as bar:
                # disable=None: a bar on a terminal, none in logs and CI
                loss = train_epoch(net, optimizer, images, batch_size, level, generator,
                                   bar, position, lambda: requested["signal"] is not None,
                                   args.amp, noise, scheduler)
        except NonFiniteLoss as e:
            kept = f"{args.checkpoint} keeps epoch {epoch - 1}" if history else "nothing saved"
            print(f"train.py: error: the loss became NaN or infinite in epoch {epoch} by step "
                  f"{e.step} (lr {config['lr']}); stopped, {kept}", file=sys.stderr)
            return 1
        except Interrupted as e:
            save_checkpoint(make_checkpoint(net, optimizer, scheduler, config, history, epoch - 1,
                                            generator, e.position), args.checkpoint)
            return stopped(requested["signal"], args.checkpoint, args.epochs,
                           f"in epoch {epoch} after step {e.position['step']}")
        position = None
        train_seconds = time.perf_counter() - start
        test_psnr, test_ssim = evaluate(net, test_noisy, test_x)
        seconds = time.perf_counter() - start
        history.append({"epoch": epoch, "train_loss": loss, "test_psnr": test_psnr,
                        "test_ssim": test_ssim, "seconds": seconds})
        print(f"epoch {epoch:3d}  train loss {loss:.5f}  test PSNR {test_psnr:.2f} dB  "
              f"SSIM {test_ssim:.4f}  {seconds:.1f} s  "
              f"{len(images) / train_seconds:,.0f} img/s", flush=True)
        save_checkpoint(make_checkpoint(net, optimizer, scheduler, config, history, epoch,
                                        generator), args.checkpoint)
        if requested["signal"] is not None and epoch < args.epochs:  # came during evaluation
            return stopped(requested["signal"], args.checkpoint, args.epochs,
                           f"after epoch {epoch}")

    print(f"checkpoint: {args.checkpoint}")
    show = "python visualize.py" + ("" if args.checkpoint == DEFAULT_CHECKPOINT
                                    else f" --checkpoint {args.checkpoint}")
    print(f"draw the figure: {show}")
    return 0


def stopped(signum, path, epochs, where):
    """Say where training stopped and how to resume; return the shell's code for the signal."""
    name = signal.Signals(signum).name
    print(f"train.py: stopped by {name} {where}; saved {path}; resume with: "
          f"python train.py --resume {path} --epochs {epochs}", file=sys.stderr)
    return 128 + signum  # 130 for SIGINT, 143 for SIGTERM, as a shell reports them


if __name__ == "__main__":
    sys.exit(main())
