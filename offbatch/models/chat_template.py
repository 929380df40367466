"""Chat templates: rendered in jinja2's immutable sandbox, with limits on size, work and time.

A model folder's chat template is code from elsewhere. The sandbox already keeps it from reaching
anything outside (no attribute of a Python internal, no mutation of our objects, ranges of at most
100 000 items); it does not keep it from running forever or filling memory. So every render has a
budget, charged where the template does work:

- steps: each loop iteration, call, filter, operator and piece of output costs one;
- characters: each string, list or output piece the template makes is charged its length, and an
  operation whose result can be sized in advance (`'x' * n`, `s.center(n)`, `'%9999999d' % 1`,
  `replace`, `join`, `indent`, ...) is refused before it allocates;
- integers: a product or power of more than MAX_INT_BITS bits is refused before it is computed;
- time: a deadline checked as steps are charged, a backstop for what the other limits let through.

A render that exceeds a limit, or fails in any other way, raises ChatTemplateError (a ValueError):
that request fails alone, as an error record. A template source over MAX_TEMPLATE_CHARS is refused
when the model folder is loaded (the job fails at once: every chat line would).

Loops, `~` concatenation and output are counted by rewriting the parsed template before it is
compiled (For's iterable, Concat and each Output piece go through filters of ours); operators and
calls through the sandbox's own hooks (intercepted_binops, call).
"""

from __future__ import annotations

import functools
import json
import re
import threading
import time
from typing import Any

# Limits (the README lists them).
MAX_TEMPLATE_CHARS = 2**20  # the template's source
MAX_RENDER_CHARS = 32 * 2**20  # characters (and list items) one render may make, output included
MAX_RENDER_STEPS = 1_000_000  # loop iterations, calls, filters, operators and outputs of one render
MAX_INT_BITS = 4096  # the largest integer a product or power may make
MAX_JSON_INDENT = 64
RENDER_SECONDS = 10.0  # a backstop: the step and character budgets bind long before on real templates


class ChatTemplateError(ValueError):
    """A chat template that fails or exceeds a limit; the request that needed it fails alone."""


class _Budget:
    __slots__ = ("steps", "chars", "deadline")

    def __init__(self):
        self.steps = MAX_RENDER_STEPS
        self.chars = MAX_RENDER_CHARS
        self.deadline = time.monotonic() + RENDER_SECONDS

    def step(self) -> None:
        self.steps -= 1
        if self.steps < 0:
            raise ChatTemplateError(f"the chat template took more than {MAX_RENDER_STEPS:,} steps "
                                    "(loop iterations, calls, outputs) for one request")
        if self.steps % 512 == 0 and time.monotonic() > self.deadline:
            raise ChatTemplateError(f"the chat template ran for more than {RENDER_SECONDS:g} s for one request")

    def reserve(self, n: int) -> None:
        if n > self.chars:
            raise ChatTemplateError(f"the chat template made more than {MAX_RENDER_CHARS:,} characters "
                                    "for one request")
        self.chars -= n


_local = threading.local()


def _budget() -> _Budget:
    # Outside a render (jinja2 folds constant filters while compiling) one operation gets a whole budget.
    return getattr(_local, "budget", None) or _Budget()


def _size(value: Any) -> int:
    return len(value) if isinstance(value, (str, bytes, list, tuple, dict, set, frozenset)) else 0


def _charged(value: Any) -> Any:
    _budget().reserve(_size(value))
    return value


# ---- sizes of results, known before the operation runs -----------------------------------------
def _int_arg_ok(value: Any, limit: int) -> bool:
    return not isinstance(value, int) or isinstance(value, bool) or abs(value) <= limit


def _format_estimate(fmt: str, args: tuple, kwargs: dict) -> int:
    """An upper bound on what `fmt % args` or `fmt.format(...)` makes: field widths and precisions
    written in the format, and every placeholder filled by the largest argument."""
    widths = []
    for width, precision in re.findall(r"%(?:\([^)]*\))?[-#0 +]*(\d*)(?:\.(\d*))?", fmt):
        widths += [w for w in (width, precision) if w]
    for spec in re.findall(r"\{[^{}]*:([^{}]*)\}", fmt):
        widths += re.findall(r"\d+", spec)
    width = sum(int(w) if len(w) < 10 else 10**10 for w in widths)
    values = list(args) + list(kwargs.values())
    for v in list(values):
        if isinstance(v, (tuple, list)):
            values += list(v)
        elif isinstance(v, dict):
            values += list(v.values())
    if any(not _int_arg_ok(v, MAX_RENDER_CHARS) for v in values):  # '%*d' % (10**9, 1)
        return MAX_RENDER_CHARS + 1
    largest = max((_size(v) for v in values), default=0)
    return len(fmt) + width + (fmt.count("%") + fmt.count("{")) * max(largest, 24)


def _estimate(name: str, value: Any, args: tuple, kwargs: dict) -> int:
    """An upper bound on the size of `name(value, *args, **kwargs)` for the operations that can make
    far more than they are given (a string method or a filter of that name); 0 when not one."""
    if not isinstance(value, str) and name not in ("join",):
        return 0
    arg = args[0] if args else None
    if name in ("center", "ljust", "rjust", "zfill"):
        width = arg if arg is not None else kwargs.get("width", 0)
        return max(len(value), width if isinstance(width, int) else 0)
    if name == "expandtabs":
        tab = arg if arg is not None else kwargs.get("tabsize", 8)
        return len(value) + value.count("\t") * (tab if isinstance(tab, int) else 0)
    if name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        old, new = args[0], args[1]
        hits = len(value) + 1 if old == "" else value.count(old)
        return len(value) + hits * max(len(new) - len(old), 0)
    if name == "join":  # str.join(seq) (value: the separator) or the join filter (value: the sequence)
        sep, seq = (value, arg) if isinstance(value, str) else (arg if arg is not None else kwargs.get("d", ""), value)
        if not isinstance(seq, (list, tuple, str)) or not isinstance(sep, str):
            return 0
        return len(sep) * max(len(seq) - 1, 0) + sum(_size(x) or 24 for x in seq)
    if name == "indent":
        width = arg if arg is not None else kwargs.get("width", 4)
        per_line = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
        return len(value) + (value.count("\n") + 1) * per_line
    if name == "wordwrap":
        wrap = args[2] if len(args) > 2 else kwargs.get("wrapstring") or "\n"
        width = arg if isinstance(arg, int) and arg > 0 else 1
        return len(value) + (len(value) // width + 1) * (len(wrap) if isinstance(wrap, str) else 1)
    if name in ("format", "format_map"):
        if name == "format_map" and args and isinstance(args[0], dict):
            return _format_estimate(value, (), args[0])
        return _format_estimate(value, args, kwargs)
    return 0


# Operations whose integer arguments are sizes (widths, counts): one over the budget is refused.
SIZED_OPERATIONS = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs", "replace", "join", "indent",
                              "wordwrap", "format", "format_map", "truncate", "batch", "slice", "tojson"})


def _check_operation(name: str, value: Any, args: tuple, kwargs: dict) -> None:
    b = _budget()
    b.step()
    if name in SIZED_OPERATIONS and not all(_int_arg_ok(a, b.chars) for a in (*args, *kwargs.values())):
        raise ChatTemplateError(f"the chat template passed {name} a size over its limit of "
                                f"{MAX_RENDER_CHARS:,} characters")
    n = _estimate(name, value, args, kwargs)
    if n > b.chars:
        b.reserve(n)  # raises, naming the limit


def _check_binop(op: str, left: Any, right: Any) -> None:
    b = _budget()
    b.step()
    ints = isinstance(left, int) and isinstance(right, int)
    if op == "*":
        if ints and left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise ChatTemplateError(f"the chat template made an integer of more than {MAX_INT_BITS} bits")
        seq, n = (left, right) if isinstance(right, int) else (right, left)
        if isinstance(n, int) and _size(seq) and _size(seq) * n > b.chars:
            b.reserve(_size(seq) * n)
    elif op == "**" and ints and right > 0 and abs(left) > 1:
        if right * abs(left).bit_length() > MAX_INT_BITS:
            raise ChatTemplateError(f"the chat template made an integer of more than {MAX_INT_BITS} bits")
    elif op == "+" and _size(left) + _size(right) > b.chars:
        b.reserve(_size(left) + _size(right))
    elif op == "%" and isinstance(left, str):
        args = right if isinstance(right, tuple) else (right,)
        n = _format_estimate(left, args, {})
        if n > b.chars:
            b.reserve(n)


# ---- the environment ----------------------------------------------------------------------------
def _bounded_filter(name: str, func):
    skip = 2 if getattr(func, "jinja_pass_arg", None) is not None else 1  # (context/env, value, args...)

    @functools.wraps(func)
    def run(*args, **kwargs):
        value = args[skip - 1] if len(args) >= skip else None
        _check_operation(name, value, args[skip:], kwargs)
        return _charged(func(*args, **kwargs))

    return run


def _tojson(value, indent=None, ensure_ascii=False):
    if indent is not None and not (isinstance(indent, int) and 0 <= indent <= MAX_JSON_INDENT):
        raise ChatTemplateError(f"tojson: indent must be an integer from 0 to {MAX_JSON_INDENT}")
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)


def _raise_exception(message):
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


@functools.cache
def _environment():
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "+", "%"})

        def call_binop(self, context, operator, left, right):
            _check_binop(operator, left, right)
            return _charged(super().call_binop(context, operator, left, right))

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja2's own signature
            owner = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)  # str.format comes wrapped
            _check_operation(getattr(__obj, "__name__", "call"), owner, args, kwargs)
            return _charged(super().call(__context, __obj, *args, **kwargs))

    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise_exception
    env.filters["tojson"] = _tojson
    env.filters = {name: _bounded_filter(name, f) for name, f in env.filters.items()}

    @jinja2.pass_context
    def iterate(context, seq):
        b = _budget()
        for item in seq:
            b.step()
            yield item

    @jinja2.pass_context
    def concat(context, parts):
        texts = [str(p) for p in parts]
        _budget().reserve(sum(map(len, texts)))
        return "".join(texts)

    @jinja2.pass_context
    def output(context, piece):
        _budget().step()
        return _charged(piece if isinstance(piece, str) else str(piece))

    # Names a template cannot write (filter names are identifiers; these are not reachable by users
    # since the template's own filters are looked up by the names it writes: harmless if it does).
    env.filters.update({"_offbatch_iter": iterate, "_offbatch_concat": concat, "_offbatch_output": output})
    return env


def _counted(tree, env):
    """The parsed template, with every loop's iterable, every `~` and every output piece routed
    through our counting filters."""
    from jinja2 import nodes
    from jinja2.visitor import NodeTransformer

    def through(name: str, node):
        return nodes.Filter(node, name, [], [], None, None, lineno=node.lineno)

    class Counter(NodeTransformer):
        def visit_For(self, node):
            self.generic_visit(node)
            node.iter = through("_offbatch_iter", node.iter)
            return node

        def visit_Concat(self, node):
            self.generic_visit(node)
            return through("_offbatch_concat", nodes.List(node.nodes, lineno=node.lineno))

        def visit_Output(self, node):
            self.generic_visit(node)
            node.nodes = [through("_offbatch_output", n) for n in node.nodes]
            return node

    tree = Counter().visit(tree)
    tree.set_environment(env)
    return tree


class ChatTemplate:
    """A chat template's source, compiled on first use (a compile error fails each chat request, with
    its message, not the job)."""

    def __init__(self, source: str):
        if len(source) > MAX_TEMPLATE_CHARS:
            raise ValueError(f"the chat template is {len(source):,} characters; the limit is {MAX_TEMPLATE_CHARS:,}")
        self.source = source
        self._compiled = None
        self._error: str | None = None
        self._lock = threading.Lock()

    def _template(self):
        with self._lock:
            if self._compiled is None and self._error is None:
                env = _environment()
                _local.budget = _Budget()  # constant folding while compiling runs our filters
                try:
                    code = env.compile(_counted(env.parse(self.source), env))
                    self._compiled = env.template_class.from_code(env, code, env.make_globals(None), None)
                except Exception as e:  # noqa: BLE001 - syntax errors, a source nested too deeply, ...
                    self._error = f"chat template failed: {type(e).__name__}: {e}"
                finally:
                    _local.budget = None
        if self._error is not None:
            raise ChatTemplateError(self._error)
        return self._compiled

    def render(self, variables: dict) -> str:
        template = self._template()
        _local.budget = _Budget()
        try:
            return template.render(variables)
        except ChatTemplateError:
            raise
        except Exception as e:  # noqa: BLE001 - the template is code from the model folder: whatever it
            # raises (raise_exception, a TypeError, RecursionError, MemoryError) fails this request alone.
            message = str(e) or type(e).__name__
            raise ChatTemplateError(f"chat template failed: {message[:500]}") from None
        finally:
            _local.budget = None
