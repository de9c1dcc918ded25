"""prunec against Torch-Pruning on the same architecture, in the same run (BENCHMARKS.md).

Torch-Pruning's whole task is a Python process that builds a torchvision ResNet-50, prunes 50%
of every group's channels by L2 magnitude (`MagnitudePruner`, `GroupMagnitudeImportance(p=2)`,
the classifier kept) and exports the result to ONNX. prunec's task is one command on the ONNX
export of the same network (random weights, torchvision, TorchScript exporter, opset 17,
constant folding: BatchNorm folded into the convolutions): `prunec resnet50.onnx -o OUT
--ratio 0.5`, with verification (the default) and with `--no-verify`. `cp` of the export is the
floor any tool that rewrites the file must pay. The four commands run in alternation, after one
untimed warm-up of each; every figure is the whole process (wall time, peak RSS from GNU time).

torch and torch-pruning live in a venv of their own under `target/` (several GB), never in CI
or the test suite. Run with any Python 3.9+; the script creates the venv on first use and
re-runs itself inside it:

    cargo build --release
    python3 xtask/torch_pruning_bench.py target/release/prunec --runs 5
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / "target" / "torch-pruning-venv"
PACKAGES = ["torch", "torchvision", "torch-pruning", "onnx"]


def venv_python() -> Path:
    return VENV / "bin" / "python"


def ensure_venv() -> None:
    """Re-executes the script inside its venv, creating it first when it is missing."""
    if Path(sys.prefix).resolve() == VENV.resolve():
        return
    if not venv_python().exists():
        print(f"creating {VENV} and installing {', '.join(PACKAGES)} (several GB)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(venv_python()), "-m", "pip", "install", "-q", *PACKAGES], check=True)
    os.execv(str(venv_python()), [str(venv_python()), __file__, *sys.argv[1:]])


def export(model, path: Path) -> None:
    import torch

    x = torch.randn(1, 3, 224, 224)
    torch.onnx.export(
        model, (x,), str(path), opset_version=17, do_constant_folding=True, dynamo=False, input_names=["x"], output_names=["y"]
    )


def export_original(path: Path) -> None:
    """The ONNX file prunec is given: a seeded random-weight ResNet-50 in eval mode."""
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    export(model, path)


def torch_pruning_task(path: Path) -> None:
    """Torch-Pruning's build + 50% L2 prune + ONNX export, as one process runs it."""
    import torch
    import torch_pruning as tp
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    example = torch.randn(1, 3, 224, 224)
    pruner = tp.pruner.MagnitudePruner(
        model,
        example,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=0.5,
        ignored_layers=[model.fc],
    )
    pruner.step()
    export(model, path)


def timed(cmd: list) -> tuple:
    """Wall seconds and peak RSS (MiB) of one process, from GNU time."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as f:
        p = subprocess.run(["/usr/bin/time", "-f", "%e %M", "-o", f.name, *map(str, cmd)], capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"`{' '.join(map(str, cmd))}` failed ({p.returncode}):\n{p.stderr[-2000:]}")
        wall, kib = f.read().split()[-2:]
    return float(wall), int(kib) / 1024


def main() -> None:
    ensure_venv()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("prunec", type=Path)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--task", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.task:
        torch_pruning_task(args.task)
        return
    work = ROOT / "target" / "torch-pruning-bench"
    work.mkdir(parents=True, exist_ok=True)
    original = work / "resnet50.onnx"
    if not original.exists():
        export_original(original)
    prunec = args.prunec.resolve()
    commands = {
        "cp": ["cp", original, work / "copy.onnx"],
        "prunec --no-verify": [prunec, original, "-o", work / "prunec.noverify.onnx", "--ratio", "0.5", "--no-verify", "--quiet"],
        "prunec (default)": [prunec, original, "-o", work / "prunec.onnx", "--ratio", "0.5", "--quiet"],
        "Torch-Pruning": [sys.executable, __file__, args.prunec, "--task", work / "tp.onnx"],
    }
    for cmd in commands.values():
        timed(cmd)  # warm-up: page cache, Python's bytecode cache
    times = {k: [] for k in commands}
    for run in range(args.runs):
        # Alternate the order so no command always runs right after the same other one.
        order = list(commands) if run % 2 == 0 else list(reversed(commands))
        for name in order:
            times[name].append(timed(commands[name]))
    size = original.stat().st_size / 2**20
    tp_med = statistics.median(t for t, _ in times["Torch-Pruning"])
    cp_med = statistics.median(t for t, _ in times["cp"])
    print(f"ResNet-50 export: {size:.1f} MiB; {args.runs} runs of each, alternating, after one warm-up; torch "
          f"{__import__('torch').__version__}, torch-pruning {__import__('torch_pruning').__version__}\n")
    print("| command | median s | min s | peak RSS MiB (max) | × cp time | Torch-Pruning time ÷ this | RSS ÷ file size |")
    print("|---|--:|--:|--:|--:|--:|--:|")
    for name, samples in times.items():
        wall = [t for t, _ in samples]
        rss = max(r for _, r in samples)
        med = statistics.median(wall)
        print(f"| {name} | {med:.3f} | {min(wall):.3f} | {rss:.1f} | {med / cp_med:.1f}× | {tp_med / med:.1f}× | {rss / size:.2f}× |")
    shutil.rmtree(work / "tmp", ignore_errors=True)


if __name__ == "__main__":
    main()
