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


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (what is wrong, where to look), exit code 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="fastbridge", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    sub.add_parser("info", help="versions, device, and which backends can run here")
    sub.add_parser("build", help="prebuild the C++/CUDA extension (otherwise built on first use)")
    from .bench import BENCH_DESCRIPTION, BENCH_EPILOG

    sub.add_parser("bench", help="run the benchmark suite (pytest benchmarks/), print a table, write plots; "
                                 "see fastbridge bench --help", description=BENCH_DESCRIPTION, epilog=BENCH_EPILOG,
                   usage="fastbridge bench [pytest arguments: -k EXPR, --fb-quick, --fb-results-dir DIR, ...]",
                   formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False)
    from .train.cli import add_demo_arguments, add_train_arguments

    add_train_arguments(sub.add_parser("train", help="train one vision-language bridge (see --help)"))
    add_demo_arguments(sub.add_parser("demo", help="train and score bridges on synthetic data, before vs after"))
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"] and any(a in ("-h", "--help") for a in argv[1:]):
        sub.choices["bench"].print_help()
        return 0
    args, extra = parser.parse_known_args(argv)
    if extra and args.cmd != "bench":
        sub.choices[args.cmd].error(f"unrecognized arguments: {' '.join(extra)}")
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

        return train_cli.main(args, sub.choices[args.cmd])
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
