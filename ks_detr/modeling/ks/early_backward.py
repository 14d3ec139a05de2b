"""Loss passes whose backward runs inside the forward (``MODEL.KS.EARLY_TEACHER_BACKWARD``).

A teacher's decoder pass only feeds its own loss terms, and gradients add up: so its gradients can be taken
as soon as its losses exist, and its activations freed before the next pass starts. :class:`EarlyBackward`
runs such passes on detached leaves, keeps the gradients (of the inputs they came from and of the model's
parameters), and returns loss terms whose backward hands those gradients on, times the upstream gradient.
The result is the gradient of the plain forward; the peak memory holds one pass's activations instead of all.
"""
import torch

UNEQUAL_UPSTREAM = ("MODEL.KS.EARLY_TEACHER_BACKWARD takes the teachers' gradients in the forward for the sum of "
                    "the loss dict: every teacher loss term must reach the backward with the same weight (sum the "
                    "loss dict as detectron2's trainers do, or turn the key off)")


class _PrecomputedGradients(torch.autograd.Function):
    """(K,) loss values whose gradients with respect to ``inputs`` were taken in the forward (``grads``, one per
    input): the backward returns them times the upstream gradient, which must be the same for the K terms."""

    @staticmethod
    def forward(ctx, values, grads, *inputs):
        ctx.grads = grads
        return values.clone()

    @staticmethod
    def backward(ctx, upstream):
        g = upstream[0]
        torch._assert_async((upstream == g).all(), UNEQUAL_UPSTREAM)  # no host sync on a GPU
        return (None, None, *[grad * g for grad in ctx.grads])


class EarlyBackward:
    """Passes whose gradients are taken at once (see the module docstring).

    ``params``: the parameters a pass may use. For each pass: make its inputs with :meth:`leaf`, compute its
    losses from them, hand them to :meth:`backward`; at the end :meth:`losses` gives every pass's loss terms,
    differentiable. Without grad mode (loss evaluation under ``torch.no_grad``) the passes only compute values.
    """

    def __init__(self, params):
        self.params = [p for p in params if p.requires_grad]
        self.param_grads = [None] * len(self.params)
        self.sources, self.source_grads = [], []  # tensors the leaves came from, their gradient buffers
        self.pending = []  # (leaf, source index, rows) of the current pass
        self.values = {}

    def leaf(self, tensor, rows=None):
        """A detached copy of ``tensor[rows]`` (all of it when ``rows`` is None) whose gradient reaches ``tensor``."""
        part = tensor if rows is None else tensor[rows]
        if not (part.requires_grad and torch.is_grad_enabled()):
            return part.detach()
        leaf = part.detach().requires_grad_()
        index = next((i for i, s in enumerate(self.sources) if s is tensor), None)
        if index is None:
            index = len(self.sources)
            self.sources.append(tensor)
            self.source_grads.append(None)
        self.pending.append((leaf, index, rows))
        return leaf

    def backward(self, losses):
        """Take the gradients of one pass's ``losses`` ({name: scalar}, computed from its leaves) now."""
        pending, self.pending = self.pending, []
        self.values.update({name: value.detach() for name, value in losses.items()})
        if not torch.is_grad_enabled():
            return
        leaves = [leaf for leaf, _, _ in pending]
        total = sum(losses.values())
        with torch.autocast(total.device.type, enabled=False):  # as a backward after the forward runs
            grads = torch.autograd.grad(total, leaves + self.params, allow_unused=True)
        for (_, index, rows), grad in zip(pending, grads):
            if grad is None:
                continue
            if self.source_grads[index] is None:
                self.source_grads[index] = torch.zeros_like(self.sources[index])
            buffer = self.source_grads[index]
            (buffer if rows is None else buffer[rows]).add_(grad)
        for k, grad in enumerate(grads[len(leaves):]):
            if grad is not None:
                # out of place: autograd may hand the same tensor to two parameters
                self.param_grads[k] = grad if self.param_grads[k] is None else self.param_grads[k] + grad

    def losses(self):
        """{name: scalar} of every pass; their backward adds the gradients taken, times the upstream gradient."""
        names = list(self.values)
        values = torch.stack([self.values[n] for n in names])
        if not torch.is_grad_enabled():
            return dict(zip(names, values.unbind()))
        pairs = [(s, g) for s, g in zip(self.sources, self.source_grads) if g is not None]
        pairs += [(p, g) for p, g in zip(self.params, self.param_grads) if g is not None]
        out = _PrecomputedGradients.apply(values, [g for _, g in pairs], *[t for t, _ in pairs])
        return dict(zip(names, out.unbind()))
