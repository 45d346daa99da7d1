"""Errors raised by dpcompile, with enough context to fix the model."""
from __future__ import annotations

import re

import torch.fx as fx


class DPCompileError(RuntimeError):
    """A model, option or op that dpcompile cannot make private correctly.

    Raised instead of producing a gradient we cannot prove per-sample correct.
    """


def describe_node(node: fx.Node) -> str:
    """Name the op, the module that emitted it and the user source line."""
    parts = [f"op `{getattr(node.target, '__name__', node.target)}` (graph node `{node.name}`)"]
    module = module_path(node)
    if module:
        parts.append(f"in module `{module}`")
    line = source_line(node)
    if line:
        parts.append(f"at {line}")
    return " ".join(parts)


def module_path(node: fx.Node) -> str | None:
    """Dotted path and class of the innermost nn.Module that produced `node`."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, cls = list(stack.values())[-1]
    cls_name = getattr(cls, "__name__", None) or str(cls).rsplit(".", 1)[-1].rstrip("'>")
    return f"{_clean_module_path(path)} ({cls_name})"


def _clean_module_path(path: str) -> str:
    # Dynamo records paths such as "L['self'].encoder.layers[0]" or "L['self']._modules['fc']".
    for junk in ("L['self'].", "L['self']", "L['fn'].", "L['fn']"):
        path = path.replace(junk, "")
    path = re.sub(r"^L\['[^']*'\]\.?", "", path)  # a model passed as an argument (dpcompile.tools.inspection)
    return path.replace("._modules['", ".").replace("_modules['", "").replace("']", "") or "<root>"


def source_line(node: fx.Node) -> str | None:
    """The last user frame of the recorded stack trace, as 'file:line: code'."""
    trace = node.meta.get("stack_trace")
    if not trace:
        return None
    lines = [l.strip() for l in trace.strip().splitlines()]
    frames = [i for i, l in enumerate(lines) if l.startswith("File ")]
    if not frames:
        return None
    i = frames[-1]
    where = lines[i].replace("File ", "", 1)
    code = lines[i + 1] if i + 1 < len(lines) and not lines[i + 1].startswith("File ") else ""
    return f"{where}: `{code}`" if code else where
