"""The ``ugsep`` command: train, export, check, inspect, bench, serve, triton, demo.

Each subcommand is a small function; heavy imports happen inside it so ``ugsep --help``
is instant. Errors a user can cause print one line and exit 2; a parity breach exits 1.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path

from exporter.progress import console
from runtime import signing_cli
from runtime.errors import UgsepError

log = logging.getLogger("ugsep")

# Subcommands owned by other modules: name -> (module with add_arguments/run, help)
DELEGATED = {
    "bench": ("exporter.commands.bench", "benchmark split vs full (and eager) latency across N"),
    "serve": ("runtime.serving.cli", "serve bundles over the KServe v2 protocol"),
    "triton": ("runtime.triton.cli", "write a Triton Inference Server model repository"),
    "build-trt": ("exporter.steps.tensorrt", "build TensorRT engines into a bundle (needs a GPU)"),
    "embeddings": ("runtime.redis_tier.cli", "push a bundle's embedding store to a Redis Cluster; ls, rm versions"),
}


def cmd_train(args: argparse.Namespace) -> int:
    from students.train import distill

    report = distill(kind=args.kind, size=args.size, out_dir=args.out, seed=args.seed)
    console.print_json(json.dumps(report, default=str))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    sign_key = _signing_key(args.sign)  # a bad key fails before the export, not after

    from exporter.data import load_rows
    from exporter.load import load_student
    from exporter.pipeline import ExportOptions, export_bundle

    loaded = load_student(args.checkpoint, factory=args.factory, spec=args.spec,
                          kwargs=json.loads(args.kwargs) if args.kwargs else None,
                          trust=args.trust_module)
    options = ExportOptions.from_args(args, data=load_rows(args.data, loaded.spec) if args.data else None)
    ctx = export_bundle(loaded, args.out, options)
    console.print(f"bundle written to [bold]{args.out}[/bold]")
    if sign_key is not None:
        from runtime.signing import sign_bundle

        sign_bundle(args.out, sign_key)
        console.print(f"signed with {sign_key.algorithm} key {sign_key.key_id}")
    if ctx.parity_report is not None and not ctx.parity_report.passed:
        console.print("[red]parity FAILED[/red]: the bundle will be refused by the runtime")
        return 1
    return 0


def _signing_key(spec: str | None):
    if spec is None:
        return None
    from runtime.signing import load_key

    key = load_key(spec)
    if not key.can_sign:
        key.sign(b"")  # raises: a public key cannot sign
    return key


def cmd_check(args: argparse.Namespace) -> int:
    from exporter.commands.check import run_check

    return run_check(args)


def cmd_inspect(args: argparse.Namespace) -> int:
    from exporter.commands.inspect import inspect_bundle

    return inspect_bundle(args.bundle, as_json=args.json, key=args.verify,
                          allow_extra_files=args.allow_extra_files)


def cmd_demo(args: argparse.Namespace) -> int:
    from exporter.commands.demo import run_demo

    return run_demo(out_dir=Path(args.out), seed=args.seed, quick=args.quick)


def add_trust_argument(p: argparse.ArgumentParser) -> None:
    """``--trust-module PKG`` (repeatable): whose registered factories a checkpoint may name."""
    p.add_argument("--trust-module", action="append", default=[], metavar="PKG",
                   help="trust this module (or package) to provide the model factory a checkpoint's "
                   "config.json or a bundle's manifest names; repeatable. Only registered factories "
                   "(@exporter.trust.model_factory or the 'ugsep.models' entry points) are called. "
                   "Default: only the project's own 'students'")


def _add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint dir (config.json + model.safetensors + spec.json), "
                   "a weights file (with --factory and --spec), or a .pt2 program")
    p.add_argument("--out", "-o", required=True, help="bundle directory to write")
    p.add_argument("--factory", help="package.module:callable that builds the model (a registered "
                   "model factory; naming it here trusts its module)")
    p.add_argument("--kwargs", help="JSON kwargs for --factory")
    add_trust_argument(p)
    p.add_argument("--spec", help="feature spec (YAML/JSON); default: the checkpoint's spec.json")
    p.add_argument("--data", help="held-out rows (.npz/.csv) for parity and quantization calibration")
    p.add_argument("--sign", metavar="KEY", default=None,
                   help="sign the bundle's manifest (manifest.sig): a PEM Ed25519 private key "
                   "(ugsep keygen) or hmac:FILE for a shared HMAC-SHA256 secret")
    from exporter.options import (
        ExportOptions,  # imports the steps' options: only when export is parsed
    )

    ExportOptions.add_arguments(p)


def _add_check_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle")
    p.add_argument("--checkpoint", help="the eager model (default: the checkpoint recorded in the manifest)")
    p.add_argument("--factory", help="registered model factory for --checkpoint (package.module:callable)")
    add_trust_argument(p)
    p.add_argument("--bundle-only", action="store_true",
                   help="no eager model: verify the files and the recorded parity, and compare the "
                   "compiled stages with the full graph (nothing the manifest names is imported)")
    p.add_argument("--data", help="held-out rows (.npz/.csv); default: rows sampled from the spec")
    p.add_argument("--rows", type=int, default=None,
                   help="with --data: use its first N rows (default: all, as export's parity "
                   "step does); without: sample N rows from the spec (default 1000)")
    p.add_argument("--budgets", help="budgets file (JSON/YAML) overriding the defaults")
    p.add_argument("--report", help="write a self-contained HTML report here")
    p.add_argument("--trt-lint", action="store_true", help="only run the TensorRT readiness check")
    signing_cli.add_verify_arguments(p)
    p.add_argument("--seed", type=int, default=0)


class _LazyParser(argparse.ArgumentParser):
    """A subcommand's parser whose arguments may be added on first use (``add_later``):
    ``export`` takes its flags from the step modules, which ``ugsep --help`` and the serving
    commands never import."""

    add_later = None

    def _complete(self) -> None:
        add, self.add_later = self.add_later, None
        if add is not None:
            add(self)

    def parse_known_args(self, args=None, namespace=None):
        self._complete()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._complete()
        return super().format_help()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ugsep", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_LazyParser)

    p = sub.add_parser("train", help="train a teacher and distil a student on synthetic CTR data")
    p.add_argument(
        "--kind", default="rankmixer", choices=["rankmixer", "dcn", "twotower", "tokenmixer"]
    )
    p.add_argument("--size", default="tiny", choices=["tiny", "bench"])
    p.add_argument("--out", "-o", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="export a checkpoint to a bundle")
    p.add_later = _add_export_args  # the steps' flags: their modules import torch and onnx
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("check", help="parity of every compiled stage against the eager model")
    _add_check_args(p)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("inspect", help="summarise a bundle")
    p.add_argument("bundle")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    signing_cli.add_verify_arguments(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("keygen", help="make an Ed25519 key pair (or an HMAC secret) to sign bundles")
    signing_cli.add_keygen_arguments(p)
    p.set_defaults(func=signing_cli.run_keygen)

    p = sub.add_parser("sign", help="sign an existing bundle's manifest (writes manifest.sig)")
    signing_cli.add_sign_arguments(p)
    p.set_defaults(func=signing_cli.run_sign)

    p = sub.add_parser("demo", help="train tiny students, export, check, score, benchmark")
    p.add_argument("--out", default="artifacts/demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="one student, fewer benchmark repeats")
    p.set_defaults(func=cmd_demo)

    for name, (module, help_) in DELEGATED.items():
        p = sub.add_parser(name, help=help_)
        p.set_defaults(func=_delegate(module), _module=module)
        try:
            importlib.import_module(module).add_arguments(p)
        except ImportError as e:
            p.set_defaults(_unavailable=f"'ugsep {name}' is unavailable: {e}")
    return parser


def _delegate(module: str):
    def run(args: argparse.Namespace) -> int:
        if getattr(args, "_unavailable", None):
            raise UgsepError(args._unavailable)
        return importlib.import_module(module).run(args) or 0

    return run


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:  # graph-pass libraries log every pass at INFO
        for noisy in ("onnx_ir", "onnxscript", "torch.onnx", "torch._export"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except UgsepError as e:
        console.print(f"[red]error:[/red] {e}", soft_wrap=True)  # one unbroken line: greppable
        return 2
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
