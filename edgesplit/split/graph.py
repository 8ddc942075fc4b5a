"""Cut any traceable model at a named module, with torch.fx.

The model's ``forward`` is traced (``torch.fx`` symbolic tracing) with the module named by the
cut kept as one call, and the graph is split at that call: the client segment computes
everything the cut's output needs, the server segment everything after it. Both are
``fx.GraphModule`` objects holding the model's own submodules, so they share parameters with the
model (training a segment trains the model) and their state dicts use the model's names.

Python control flow in ``forward`` is allowed when it depends only on shapes (``if x.dim() ==
2: x = x.reshape(...)``): it is resolved on a probe input of the data's sample shape, as
``torch.export`` would. A branch on input *values* is refused. Exactly one tensor may cross the
cut: a skip connection that jumps over it (the cut inside a residual block, or the model's
input used again later) is refused with the names of what would have to travel.
"""

from __future__ import annotations

import operator
import weakref
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from edgesplit.errors import ConfigError

#: Sample shapes (no batch axis) of models whose data is known: recorded by
#: :func:`remember_input_shape` (the model factory, the chain check) so a cut made later — e.g.
#: when a checkpoint is rebuilt — resolves shape-dependent control flow the same way.
_INPUT_SHAPES: weakref.WeakKeyDictionary[nn.Module, tuple[int, ...]] = (
    weakref.WeakKeyDictionary()
)

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def remember_input_shape(model: nn.Module, input_shape: Iterable[int]) -> None:
    """Record the per-sample input shape ``model`` is built for (see module docstring)."""
    _INPUT_SHAPES[model] = tuple(int(d) for d in input_shape)


def input_shape_of(model: nn.Module) -> tuple[int, ...] | None:
    """The per-sample input shape recorded for ``model``, if any."""
    return _INPUT_SHAPES.get(model)


class _CutTracer(fx.Tracer):
    """Keeps the named modules as single calls and resolves shape-only control flow."""

    def __init__(self, leaves: set[str], probes: list[torch.Tensor] | None) -> None:
        super().__init__()
        self.leaves = leaves
        self.probes = probes
        self.evaluating = False   # running a probe: module calls execute instead of record

    def call_module(self, m: nn.Module, forward: Any, args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        if self.evaluating:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if self.evaluating:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.leaves or super().is_leaf_module(
            m, module_qualified_name)

    def to_bool(self, obj: fx.Proxy) -> bool:
        if not self.probes:
            raise ConfigError(
                "forward has Python control flow on its input and the input shape is unknown; "
                "pass the sample shape (input_shape=...)")
        # tracing patches nn.Module.__call__; probes run the modules through call_module above
        self.evaluating = True
        try:
            values = {bool(_evaluate(self.root, self.graph, obj.node, p)) for p in self.probes}
        finally:
            self.evaluating = False
        if len(values) > 1:
            raise ConfigError(
                "forward branches on input values (an `if` on a tensor's contents); only "
                "branches on shapes can be traced: move the branch into a module and cut "
                "elsewhere, or make it depend on x.shape / x.dim()")
        return values.pop()


def _evaluate(root: nn.Module, graph: fx.Graph, node: fx.Node, probe: torch.Tensor) -> object:
    """The value ``node`` (of a graph under construction) takes for input ``probe``."""
    partial = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in graph.nodes:
        env[n] = partial.node_copy(n, lambda a: env[a])
        if n is node:
            break
    partial.output(env[node])
    modes = {m: m.training for m in root.modules()}
    root.eval()   # no running statistics updated, no dropout, by a probe
    try:
        with torch.no_grad():
            return fx.GraphModule(root, partial)(probe)
    finally:
        for m, training in modes.items():
            m.training = training


def _probes(shape: tuple[int, ...] | None) -> list[torch.Tensor] | None:
    if shape is None:
        return None
    # different inputs: a branch that differs between them depends on values
    generator = torch.Generator().manual_seed(0)   # never the global RNG: seeds stay as set
    return [torch.zeros(2, *shape), torch.ones(2, *shape),
            torch.randn(2, *shape, generator=generator)]


def trace(model: nn.Module, leaves: Iterable[str] = (),
          input_shape: tuple[int, ...] | None = None) -> fx.GraphModule:
    """Trace ``model.forward`` with the modules named in ``leaves`` kept as single calls.

    Raises
    ------
    ConfigError
        The forward cannot be traced (the message says why and what would work).
    """
    shape = input_shape if input_shape is not None else input_shape_of(model)
    tracer = _CutTracer(set(leaves), _probes(shape))
    try:
        graph = tracer.trace(model)
    except ConfigError:
        raise
    except Exception as exc:   # fx raises TraceError, TypeError, ... from the user's forward
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(
            f"cannot trace {type(model).__name__}.forward with torch.fx to cut it "
            f"({type(exc).__name__}: {first}); make forward traceable or build the model as an "
            "nn.Sequential") from None
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise ConfigError(
            f"{type(model).__name__}.forward takes {len(placeholders)} inputs "
            f"({', '.join(n.target for n in placeholders)}); a split model takes one tensor")
    # conditions resolved while tracing (x.dim() == 2) stay behind as unused nodes on the input
    graph.eliminate_dead_code(is_impure_node=_impure)
    return fx.GraphModule(model, graph, class_name=f"{type(model).__name__}Traced")


def _impure(node: fx.Node) -> bool:
    """Kept by dead-code elimination even when unused: in-place calls (``x.relu_()``). An
    in-place module whose result is ignored is not seen; :func:`check_chain`'s comparison
    with the real forward catches that."""
    if node.op in ("placeholder", "output"):
        return True
    name = str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", "")
    return node.op in ("call_method", "call_function") and name.endswith("_")


@dataclass
class CutAnalysis:
    """Which nodes of a traced graph go to each side of a cut after ``node``."""

    node: fx.Node
    client: set[fx.Node]         # computes the cut tensor (the input and its descendants)
    server: set[fx.Node]         # everything else that depends on the input
    crossing: list[fx.Node]      # client nodes the server (or the output) uses


def _input_dependent(graph: fx.Graph) -> set[fx.Node]:
    dependent: set[fx.Node] = set()
    for n in graph.nodes:   # topological order
        if n.op == "placeholder" or any(a in dependent for a in n.all_input_nodes):
            dependent.add(n)
    return dependent


def analyse_cut(graph: fx.Graph, node: fx.Node) -> CutAnalysis:
    """Split ``graph``'s input-dependent nodes at ``node`` (no error: see ``crossing``)."""
    dependent = _input_dependent(graph)
    client: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n in client or n not in dependent:
            continue
        client.add(n)
        stack.extend(n.all_input_nodes)
    server = {n for n in dependent if n not in client and n.op != "output"}
    crossing = [n for n in graph.nodes if n in client
                and any(u.op == "output" or u in server for u in n.users)]
    return CutAnalysis(node, client, server, crossing)


def module_calls(graph: fx.Graph) -> list[fx.Node]:
    """The ``call_module`` nodes of ``graph``, in forward order."""
    return [n for n in graph.nodes if n.op == "call_module"]


def split_graph(gm: fx.GraphModule, cut: str) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Split a traced model after the call of module ``cut``: (client, server) GraphModules.

    Raises
    ------
    ConfigError
        ``cut`` is not called once in forward, nothing would be left on one side, or more
        than the cut's output would cross the cut (a skip connection over it).
    """
    calls = [n for n in module_calls(gm.graph) if n.target == cut]
    if not calls:
        names = ", ".join(str(n.target) for n in module_calls(gm.graph)) or "(none)"
        raise ConfigError(f"unknown cut {cut!r}: forward calls no module of that name; modules "
                          f"it calls: {names}")
    if len(calls) > 1:
        raise ConfigError(f"module {cut!r} is called {len(calls)} times in forward; cut at a "
                          "module called once")
    node = calls[0]
    a = analyse_cut(gm.graph, node)
    if not a.server:
        raise ConfigError(f"cut {cut!r} leaves nothing for the server (it computes the output)")
    if a.crossing != [node]:
        others = [n for n in a.crossing if n is not node]
        what = ", ".join("the model's input" if n.op == "placeholder" else repr(n.name)
                         for n in others)
        raise ConfigError(
            f"cut {cut!r}: besides its output, {what} cross{'es' if len(others) == 1 else ''} "
            "the cut (a skip connection over it); cut where one tensor carries everything "
            f"(see `edgesplit cuts`)")
    return _client_module(gm, a), _server_module(gm, a)


def _copy(nodes: Iterable[fx.Node], graph: fx.Graph, env: dict[fx.Node, fx.Node],
          keep: set[fx.Node], dependent: set[fx.Node]) -> None:
    for n in nodes:
        if n.op in ("placeholder", "output") or n in env:
            continue
        if n in keep or n not in dependent:   # constants and attributes: both sides, if used
            env[n] = graph.node_copy(n, lambda x: env[x])


def _client_module(gm: fx.GraphModule, a: CutAnalysis) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            env[n] = graph.node_copy(n)
    _copy(gm.graph.nodes, graph, env, a.client, _input_dependent(gm.graph))
    graph.output(env[a.node])
    return _finish(gm, graph)


def _server_module(gm: fx.GraphModule, a: CutAnalysis) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {a.node: graph.placeholder(a.node.name)}
    _copy(gm.graph.nodes, graph, env, a.server, _input_dependent(gm.graph))
    out = next(n for n in gm.graph.nodes if n.op == "output")
    graph.output(fx.map_arg(out.args[0], lambda x: env[x]))
    return _finish(gm, graph)


def _finish(gm: fx.GraphModule, graph: fx.Graph) -> fx.GraphModule:
    graph.eliminate_dead_code(is_impure_node=_impure)
    graph.lint()
    return fx.GraphModule(gm, graph, class_name="Segment")


def as_module(gm: fx.GraphModule) -> nn.Module:
    """``gm`` as an ``nn.Sequential`` when it only calls top-level modules one after the
    other (what the vertical configuration and the Sequential path produce), else ``gm``."""
    nodes = list(gm.graph.nodes)
    prev = nodes[0]
    children: list[tuple[str, nn.Module]] = []
    for n in nodes[1:-1]:
        if n.op != "call_module" or "." in str(n.target) or n.args != (prev,) or n.kwargs:
            return gm
        children.append((str(n.target), gm.get_submodule(str(n.target))))
        prev = n
    if not children or nodes[-1].args != (prev,):
        return gm
    return nn.Sequential(OrderedDict(children))


def candidate_modules(model: nn.Module) -> list[str]:
    """Names a cut may follow: the direct children, and the children of direct children
    that are containers (``layer2.1``, ``features.6``), instead of the containers."""
    names: list[str] = []
    for name, child in model.named_children():
        if isinstance(child, _CONTAINERS):
            names += [f"{name}.{sub}" for sub, _ in child.named_children()]
        else:
            names.append(name)
    return names


def graph_cuts(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> list[str]:
    """Candidate modules after which exactly one tensor crosses, the client segment has
    parameters and the server segment is not empty, in forward order."""
    candidates = candidate_modules(model)
    gm = trace(model, candidates, input_shape)
    out: list[str] = []
    seen: set[str] = set()
    for node in module_calls(gm.graph):
        name = str(node.target)
        if name not in candidates or name in seen:
            continue
        seen.add(name)
        a = analyse_cut(gm.graph, node)
        if a.crossing != [node] or not a.server:
            continue
        if not any(_has_params(gm, n) or any(_has_params(gm, i) for i in n.all_input_nodes)
                   for n in a.client):
            continue
        if sum(1 for n in module_calls(gm.graph) if n.target == name) == 1:
            out.append(name)
    return out


def _has_params(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return any(True for _ in gm.get_submodule(str(node.target)).parameters())
    if node.op == "get_attr":
        return isinstance(_attr(gm, str(node.target)), nn.Parameter)
    return False


def _attr(gm: nn.Module, target: str) -> object:
    return operator.attrgetter(target)(gm)
