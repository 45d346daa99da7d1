"""The ``dpcompile`` command line.

    dpcompile pipeline
    dpcompile inspect  pkg.module:factory --input-shape 8,3,32,32 [--html report.html] [--svg graph.svg]
    dpcompile inspect  path/to/model.py:Net --input-shape 4,16:int64:100 --graph book_keeping
    dpcompile export   pkg.module:factory --input-shape 8,10 -o step.onnx

MODEL is ``module.path:attr`` or ``file.py:attr``; attr is an nn.Module instance or a
callable returning one (a class with default arguments, a factory function). Each
``--input-shape`` adds one model input: ``B,d1,...`` (float32 normal) or
``B,d1,...:int64:HIGH`` (integers in [0, HIGH), e.g. token ids). The loss is cross-entropy
against random class ids over the output's last dim (``--target classes``, default) or
mean squared error against Gaussian targets (``--target regression``).
"""
from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import json
import os
import sys
from typing import Any, Sequence

import torch

from ..errors import DPCompileError

DTYPES = {"float32": torch.float32, "float": torch.float32, "float64": torch.float64, "int64": torch.int64,
          "long": torch.int64, "int32": torch.int32}


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except Exception as err:  # one line for the user; the traceback with --verbose
        if args.verbose:
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        kind = "" if isinstance(err, DPCompileError) else f"{type(err).__name__}: "
        print(f"error: {kind}{first} (run with --verbose for the traceback)", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpcompile", description="Inspect and export differentially private "
                                     "training steps compiled by the dpcompile torch.compile backend.")
    parser.add_argument("--verbose", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    pipe = sub.add_parser("pipeline", help="list the DP passes in the order they run")
    pipe.set_defaults(run=_pipeline)

    inspect = sub.add_parser("inspect", help="compile a model and show what every pass did")
    _model_arguments(inspect)
    inspect.add_argument("--graph", metavar="PASS[:before|after]", action="append", default=[],
                         help="print the backward graph around a pass (repeatable), e.g. book_keeping:after")
    inspect.add_argument("--svg", metavar="FILE", help="write a picture of the final backward graph")
    inspect.add_argument("--svg-pass", metavar="PASS", default="noise", help="pass whose result --svg shows")
    inspect.add_argument("--svg-highlight", choices=("all", "pass"), default="all",
                         help="outline the nodes added by all DP passes so far (default) or by that pass only")
    inspect.add_argument("--html", metavar="FILE", help="write an HTML report (pictures of every pass)")
    inspect.add_argument("--json", metavar="FILE", help="write the per-parameter table and privacy summary")
    inspect.set_defaults(run=_inspect)

    export = sub.add_parser("export", help="export the private training step to ONNX (checked in onnxruntime)")
    _model_arguments(export)
    export.add_argument("-o", "--output", required=True, metavar="FILE.onnx")
    export.add_argument("--no-verify", action="store_true", help="skip the onnxruntime-vs-PyTorch check")
    export.add_argument("--no-optimize", action="store_true", help="skip onnxscript's graph optimizer")
    export.add_argument("--opset", type=int, default=None)
    export.set_defaults(run=_export)
    return parser


def _model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="module.path:attr or file.py:attr (an nn.Module or a factory)")
    p.add_argument("--input-shape", action="append", required=True, metavar="SHAPE[:DTYPE[:HIGH]]",
                   help="one model input, batch first, e.g. 8,3,32,32 or 4,16:int64:100 (repeatable)")
    p.add_argument("--target", choices=("classes", "regression"), default="classes",
                   help="loss: cross-entropy on random class ids (default) or MSE on Gaussian targets")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--noise-multiplier", type=float, default=1.0)
    p.add_argument("--strategy", choices=("auto", "ghost", "instantiate"), default="auto")
    p.add_argument("--memory-budget-mb", type=float, default=None)
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="any other dp backend option, value as a Python literal (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="seed of the example inputs and targets (the noise is seeded from OS entropy)")


# ----------------------------------------------------------------------------- commands

def _pipeline(args: argparse.Namespace) -> int:
    from ..compiler import passes

    for which, pipeline in (("forward", passes.FORWARD_PIPELINE), ("backward", passes.BACKWARD_PIPELINE)):
        print(f"{which} graph:")
        for i, (name, _) in enumerate(pipeline, 1):
            module = getattr(passes, name, None)
            doc = (module.__doc__ or "").strip().splitlines()[0] if module is not None and module.__doc__ else ""
            summary = doc.split(":", 1)[1].strip() if doc.startswith(name) and ":" in doc else doc
            print(f"  {i}. {name:<13} {summary}")
    print("then: decompose (Inductor's table) -> Inductor (compile_fx_inner)")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .inspection import inspect_model

    model, inputs, target, loss_fn, options = _setup(args)
    report = inspect_model(model, inputs, target=target, loss_fn=loss_fn, options=options)
    print(report)
    for spec in args.graph:
        name, _, when = spec.partition(":")
        record = report.record(name)
        print(f"\nbackward graph {when or 'after'} {name}:")
        print(report.graph(name, when or "after").text(record.added if (when or "after") == "after" else ()))
    for path, kind in ((args.svg, "svg"), (args.html, "html")):
        if path:
            report.render(path, name=args.svg_pass, highlight=args.svg_highlight) if kind == "svg" \
                else report.render(path)
            print(f"wrote {path}")
    if args.json:
        _write_json(args.json, report)
        print(f"wrote {args.json}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .export import export_onnx

    model, inputs, target, loss_fn, options = _setup(args)
    exported = export_onnx(model, inputs, args.output, target=target, loss_fn=loss_fn, options=options,
                           verify=not args.no_verify, opset_version=args.opset, optimize=not args.no_optimize)
    print(f"wrote {exported.path}")
    print("inputs : " + ", ".join(exported.input_names))
    print("outputs: " + ", ".join(exported.output_names))
    if exported.errors:
        worst = max(exported.errors, key=exported.errors.get)
        print(f"onnxruntime vs PyTorch (same inputs and noise): max error {exported.errors[worst]:.2e} of the "
              f"largest entry ({worst})")
    print("feed dp_noise ~ N(0, I) drawn afresh every step and dp_scalars = [noise std, expected batch size or 0]; "
          "apply the gradients only if dp_checks_ok")
    return 0


def _write_json(path: str, report) -> None:
    import dataclasses

    data = {"table": [dataclasses.asdict(r) for r in report.table()], "privacy": report.privacy_summary(),
            "passes": [{"graph": r.graph, "name": r.name, "added": r.added, "removed": r.removed, "notes": r.notes}
                       for r in report.records()]}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, default=str)


# ----------------------------------------------------------------------------- arguments

def _setup(args: argparse.Namespace):
    from .inspection import default_loss, mse_loss, random_target

    torch.manual_seed(args.seed)
    model = load_model(args.model)
    inputs = tuple(make_input(spec, args.seed + i) for i, spec in enumerate(args.input_shape))
    loss_fn = default_loss if args.target == "classes" else mse_loss
    with torch.no_grad():
        target = random_target(model(*inputs), args.target, args.seed)
    return model, inputs, target, loss_fn, _options(args)


def _options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {"max_grad_norm": args.max_grad_norm, "noise_multiplier": args.noise_multiplier,
                               "strategy": args.strategy}
    if args.memory_budget_mb is not None:
        options["memory_budget_mb"] = args.memory_budget_mb
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep:
            raise DPCompileError(f"--option expects KEY=VALUE, got {item!r}")
        try:
            options[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key.strip()] = value  # a bare string such as clipping=automatic
    return options


def make_input(spec: str, seed: int) -> torch.Tensor:
    """'8,3,32,32' -> randn; '4,16:int64:100' -> randint(0, 100)."""
    shape_text, _, rest = spec.partition(":")
    dtype_name, _, high = rest.partition(":")
    try:
        shape = [int(s) for s in shape_text.split(",") if s.strip()]
    except ValueError:
        raise DPCompileError(f"--input-shape {spec!r}: the shape must be comma-separated integers") from None
    dtype = DTYPES.get(dtype_name or "float32")
    if not shape or dtype is None:
        raise DPCompileError(f"--input-shape {spec!r}: expected SHAPE[:DTYPE[:HIGH]] with DTYPE one of "
                             f"{sorted(DTYPES)}")
    gen = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen, dtype=dtype)
    if not high:
        raise DPCompileError(f"--input-shape {spec!r}: integer inputs need an upper bound, e.g. {shape_text}:int64:100")
    return torch.randint(0, int(high), shape, generator=gen, dtype=dtype)


def load_model(spec: str) -> torch.nn.Module:
    """'pkg.module:attr' or 'path/file.py:attr' -> the nn.Module it names (calling factories)."""
    location, sep, attr = spec.rpartition(":")
    if not sep or not location or not attr:
        raise DPCompileError(f"MODEL {spec!r}: expected module.path:attr or file.py:attr")
    module = _import(location)
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise DPCompileError(f"MODEL {spec!r}: {location} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not isinstance(obj, torch.nn.Module):
        if not callable(obj):
            raise DPCompileError(f"MODEL {spec!r} is a {type(obj).__name__}, not an nn.Module or a factory")
        try:
            obj = obj()
        except TypeError as err:
            raise DPCompileError(f"MODEL {spec!r}: calling it without arguments failed ({err}); point at a "
                                 "factory function or an instance instead") from err
    if not isinstance(obj, torch.nn.Module):
        raise DPCompileError(f"MODEL {spec!r} returned a {type(obj).__name__}, not an nn.Module")
    return obj


def _import(location: str):
    if location.endswith(".py") or os.sep in location:
        path = os.path.abspath(location)
        if not os.path.exists(path):
            raise DPCompileError(f"model file {location} does not exist")
        name = "dpcompile_user_" + os.path.splitext(os.path.basename(path))[0]
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        sys.path.insert(0, os.path.dirname(path))  # the file's own imports (siblings)
        try:
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(os.path.dirname(path))
        return module
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: modules of the current directory
    try:
        return importlib.import_module(location)
    except ImportError as err:
        raise DPCompileError(f"cannot import {location!r}: {err}") from err


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
