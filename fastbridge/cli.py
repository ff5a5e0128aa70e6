"""fastbridge command line: ``fastbridge info | build | bench | train | demo`` (also ``python -m fastbridge ...``)."""
from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys


def _version(module: str) -> str:
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - reporting, not handling
        return f"not importable ({type(e).__name__})"
    version = getattr(mod, "__version__", None)
    if version is None:
        from importlib import metadata

        try:
            version = metadata.version(module)
        except metadata.PackageNotFoundError:
            version = "unknown"
    return version


def info_lines() -> list[str]:
    import torch

    import fastbridge
    from fastbridge import _backend

    lines = [
        f"fastbridge   {fastbridge.__version__}  ({os.path.dirname(fastbridge.__file__)})",
        f"python       {platform.python_version()}  ({platform.machine()}, {platform.system()})",
        f"torch        {torch.__version__}  (built with CUDA {torch.version.cuda or 'none'})",
        f"triton       {_version('triton')}",
        f"transformers {_version('transformers')}",
        f"peft         {_version('peft')}",
        f"safetensors  {_version('safetensors')}",
        f"datasets     {_version('datasets')}  (fastbridge demo / train data)",
        f"pycocoeval   {_version('pycocoevalcap')}  (pycocoevalcap: caption metrics)",
    ]
    from fastbridge.eval import java_info

    j = java_info()
    lines.append(f"java         {j.version} at {j.path} (PTB tokenizer, METEOR)" if j.available else
                 f"java         not usable ({j.reason}): METEOR skipped, pure-Python tokenizer")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"device       cuda:{i} {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
                         f"{p.multi_processor_count} SMs)")
    else:
        lines.append(f"device       cpu only ({os.cpu_count()} cores; no CUDA device visible to torch)")
    from fastbridge import _build

    lines.append(f"extension    {_build.describe()}")
    lines.append(f"backend      {_backend.current_backend()} (FASTBRIDGE_BACKEND / fastbridge.use_backend)")
    lines.append(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}")
    lines.append("can run here:")
    for name, state in _backend.available_backends().items():
        lines.append(f"  {name:28s} {state}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastbridge", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, device, and which backends can run here")
    sub.add_parser("build", help="prebuild the C++/CUDA extension (otherwise built on first use)")
    sub.add_parser("bench", help="run the benchmark suite (pytest benchmarks/ --benchmark-only), then print "
                                 "the table and write plots; other arguments are passed to pytest")
    from .train.cli import add_demo_arguments, add_train_arguments

    add_train_arguments(sub.add_parser("train", help="train one vision-language bridge (see --help)"))
    add_demo_arguments(sub.add_parser("demo", help="train and score bridges on synthetic data, before vs after"))
    args, extra = parser.parse_known_args(argv)
    if extra and args.cmd != "bench":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.cmd == "info":
        print("\n".join(info_lines()))
        return 0
    if args.cmd == "build":
        from ._build import ExtensionUnavailable, build

        try:
            build(verbose=True)
        except ExtensionUnavailable as e:
            print(f"fastbridge build: {e}", file=sys.stderr)
            return 1
        return 0
    if args.cmd == "bench":
        from .bench import run_bench

        return run_bench(extra)  # every other argument goes to pytest (e.g. -k blip --fb-quick)
    if args.cmd in ("train", "demo"):
        from .train import cli as train_cli

        return train_cli.train_main(args) if args.cmd == "train" else train_cli.demo_main(args)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
