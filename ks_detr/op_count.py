"""Count what a piece of PyTorch code dispatches: aten operators, copies and device-to-host syncs.

On a GPU every non-view operator is a kernel launch and every sync stalls the host until the device
catches up, so these counts, taken on the CPU, predict how launch-bound a small model's step is::

    with OpCounter() as counts:
        losses = model(inputs)
        sum(losses.values()).backward()
    counts.summary()  # {"ops": ..., "kernels": ..., "copies": ..., "syncs": ...}

What is counted (forward and backward alike; the autograd engine carries the mode into the backward):

- ``ops``: every aten operator that reaches the dispatcher below autograd (composite operators such as
  ``linear`` arrive decomposed, so two codebases are compared on equal terms);
- ``kernels``: ``ops`` less those that launch no kernel on a GPU: views (an alias of an input, not written) and
  operators that return no tensor (``promote_types``);
- ``copies``: ``aten.copy_``, ``aten._to_copy`` (dtype or device conversions) and ``aten.clone`` (``.contiguous()``);
- ``syncs``: what makes the host wait for the device: ``.item()`` and Python ``bool``/``int``/``float`` of a
  tensor (``aten._local_scalar_dense``), operators whose output size depends on values (``nonzero``,
  boolean-mask indexing and assignment, ``masked_select``, ``unique``...), and ``.cpu()`` / ``.tolist()`` calls
  (counted on CPU tensors too, where they cost nothing: on a GPU they copy to the host). ``.to(device)`` is not
  counted (on a CPU run it cannot tell the upload of an input from a download), nor ``.numpy()`` (it needs a
  host tensor, so on a GPU a counted ``.cpu()`` comes first).

``by_op`` keeps the count per operator name and ``by_scope`` per module (``scopes=True``: the names of the
modules whose forward is running, to ``depth`` levels; the backward is one scope, "backward").
"""
import collections

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_COPIES = {"copy_", "_to_copy", "clone"}
# operators whose output size depends on the values of their input: the host reads the size back
_VALUE_SIZED = {"_local_scalar_dense", "nonzero", "nonzero_static", "masked_select", "_unique", "_unique2",
                "unique_dim", "unique_consecutive", "unique_dim_consecutive", "repeat_interleave", "equal",
                "is_nonzero"}
_HOST_METHODS = {"cpu", "tolist"}
_INDEXING = {"index", "index_put", "index_put_", "_index_put_impl_"}


def _no_kernel(func):
    """True for an operator that launches no kernel on a GPU: one returning an alias of an input without writing
    it (``view``, ``t``, ``expand``, ``detach``...) or returning no tensor (``promote_types``)."""
    returns = func._schema.returns
    if any(r.alias_info is not None and r.alias_info.is_write for r in returns):
        return False
    views = all(r.alias_info is not None for r in returns)
    tensors = any(isinstance(r.type, (torch.TensorType, torch.ListType, torch.OptionalType)) for r in returns)
    return bool(returns) and (views or (not tensors and func.overloadpacket.__name__ != "_local_scalar_dense"))


class _Dispatch(TorchDispatchMode):
    def __init__(self, counter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name == "repeat_interleave" and not isinstance(args[0], torch.Tensor):
            name = "repeat_interleave_scalar"  # a Python repeat count: the output size is known
        elif name in _INDEXING and any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                                       for i in args[1] if i is not None):
            name += "_bool_mask"  # boolean-mask indexing: a nonzero inside
        self.counter._record(name, _no_kernel(func))
        return func(*args, **(kwargs or {}))


class _Function(TorchFunctionMode):
    """Host transfers that never reach the dispatcher on CPU tensors (``.cpu()`` of a CPU tensor returns it)."""

    def __init__(self, counter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in _HOST_METHODS:
            self.counter._host(func.__name__)
        return func(*args, **(kwargs or {}))


class OpCounter:
    """Context manager counting the operators, copies and syncs dispatched inside it (see the module doc)."""

    def __init__(self, scopes=False, depth=2):
        self.by_op = collections.Counter()
        self.by_scope = collections.Counter()
        self.kernels = 0
        self.depth = depth
        self.scopes = scopes
        self._stack = []
        self._hooks = []
        self._names = {}  # id(module) -> its name, from name_modules

    def _scope(self):
        if torch._C._current_graph_task_id() != -1:
            return "backward"
        return self._stack[-1] if self._stack else "(outside modules)"

    def _record(self, name, no_kernel):
        self.by_op[name] += 1
        if not no_kernel:
            self.kernels += 1
        if self.scopes:
            self.by_scope[self._scope()] += 1

    def _host(self, name):
        self.by_op["host:" + name] += 1

    def __enter__(self):
        if self.scopes:
            names = self._names

            def pre(module, _):
                name = names.get(id(module))
                self._stack.append(name if name is not None else (self._stack[-1] if self._stack else "?"))

            def post(module, _, __):
                self._stack.pop()

            self._hooks = [torch.nn.modules.module.register_module_forward_pre_hook(pre),
                           torch.nn.modules.module.register_module_forward_hook(post, always_call=True)]
        self._modes = [_Function(self), _Dispatch(self)]
        for mode in self._modes:
            mode.__enter__()
        return self

    def name_modules(self, model):
        """With ``scopes``: name ``model``'s submodules (to ``depth`` levels) for :attr:`by_scope`."""
        for name, module in model.named_modules():
            parts = name.split(".") if name else []
            if len(parts) <= self.depth:
                self._names[id(module)] = name or "(model)"
        return self

    def __exit__(self, *exc):
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        for hook in self._hooks:
            hook.remove()
        return False

    @property
    def ops(self):
        return sum(n for k, n in self.by_op.items() if not k.startswith("host:"))

    @property
    def copies(self):
        return sum(self.by_op[k] for k in _COPIES)

    @property
    def syncs(self):
        return sum(self.sync_ops().values())

    def sync_ops(self):
        """{operator or host call: count} of the syncs."""
        return {k: n for k, n in self.by_op.items()
                if k in _VALUE_SIZED or k.startswith("host:") or k.endswith("_bool_mask")}

    def summary(self):
        return {"ops": self.ops, "kernels": self.kernels, "copies": self.copies, "syncs": self.syncs}


def count_train_step(model, inputs, scopes=False, depth=2):
    """Count one train step of a detectron2-style ``model`` (``model(inputs)`` -> dict of losses): forward, the
    sum of the losses and its backward, no optimizer. Gradients are reset first (``set_to_none``)."""
    model.train()
    model.zero_grad(set_to_none=True)
    counter = OpCounter(scopes, depth)
    with counter:
        if scopes:
            counter.name_modules(model)
        losses = model(inputs)
        total = sum(losses.values())
        total.backward()
    model.zero_grad(set_to_none=True)
    return counter
