"""What lets a training run resume where it stopped: a directory of its own, checkpoints replaced
whole, and randomness drawn from generators seeded by (seed, stream...), so a resumed run draws
what an unbroken one would."""
import zlib
from pathlib import Path

import torch


def run_directory(out_dir, resume: bool, checkpoints) -> Path:
    """out_dir as a Path, created if missing. Unless resume is set, it must not hold any of the
    `checkpoints` (file names) of an earlier run, which this one would overwrite."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not resume and any((out / name).exists() for name in checkpoints):
        raise ValueError(f"{out} already holds a training run: pass resume=True (--resume) to "
                         "continue it, or choose an empty directory")
    return out


def seeded_generator(seed: int, *stream) -> torch.Generator:
    """A generator seeded by (seed, stream...) the same way in every process."""
    return torch.Generator().manual_seed(zlib.crc32(repr((seed,) + stream).encode()))


def save_checkpoint(obj, path: Path):
    """torch.save through a temporary file, so an interrupted save leaves the old file whole."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path):
    """What save_checkpoint wrote, on the CPU."""
    return torch.load(path, map_location="cpu", weights_only=False)
