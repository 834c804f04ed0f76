"""How an elastic layer takes the leading slice of its weights: the supernet's two training semantics of weight
entanglement (its ``entangle`` setting), decided here once for every layer.

An elastic layer (layers.py) computes with the leading slice ``weight[:s0, :s1, ...]`` of each weight that a
path's sizes ask for. What differs is the gradient.

* ``dense`` (the layers' own views; the default, and what the stand-alone PSViT always uses): a view that autograd
  differentiates through. A sliced weight receives a full-size ``.grad``, zero outside the slice, so the gradient
  all-reduce sends the whole tensor and AdamW updates the whole tensor: outside the slice its moments decay and
  keep moving the weights, and decoupled weight decay shrinks them.
* ``slice`` (:class:`SliceLeaves`, which the supernet sets as every elastic layer's ``slicer``): the same view,
  detached and made an autograd leaf of its own, so backward
  writes a slice-sized gradient into it and the parameter keeps ``grad is None``. The all-reduce, the gradient
  clipping and ``SliceAdamW`` (engine/optim.py) then see that slice only: nothing outside the slices a step
  trained moves, as nothing moves for the weights of ops off the path. This is lazy Adam (torch.optim.SparseAdam,
  TensorFlow's LazyAdam): a tensor's moments and weights change where the step's gradient is, and its bias
  correction counts the steps that trained any part of it.

A step that trains one tensor at several sizes (the sandwich rule's paths) trains the smallest leading box that
holds them all: :meth:`SliceLeaves.trained` adds their gradients into one gradient of that box.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Slicer = Callable[[Tensor, tuple[int, ...]], Tensor]  # (weight, leading sizes) -> the slice a path computes with


def lead(t: Tensor, sizes: tuple[int, ...]) -> Tensor:
    """``t[:s0, :s1, ...]`` for the leading dims named by ``sizes`` (the others whole), a view; ``t`` itself when
    nothing shrinks, so a full-size layer takes no slicing node."""
    if all(s == n for s, n in zip(sizes, t.shape)):
        return t
    return t[tuple(slice(0, s) for s in sizes)]


class SliceLeaves:
    """The slicer of ``entangle=slice``: every (weight, sizes) it is asked for is one leaf, a view of the weight's
    slice with a gradient of its own, made once and kept (a view holds no memory of its own); the leaves that a
    forward recording autograd took since :meth:`zero_grad` are the step's.

    The step's leaves are its trainable tensors: engine/distributed.py's ``GradReducer`` hooks them, the trainer
    clips :meth:`trained` and ``SliceAdamW`` applies it. Without autograd (validation, search) the same views
    serve as plain slices. A leaf stays a view of its weight's storage while the optimizer updates the weight in
    place; :meth:`clear` forgets them all, for a model whose weights move to new storage (``Supernet._apply``).
    """

    def __init__(self) -> None:
        self._leaves: dict[tuple[int, tuple[int, ...]], tuple[Tensor, Tensor]] = {}  # (id(weight), sizes) -> both
        self._step: dict[tuple[int, tuple[int, ...]], tuple[Tensor, Tensor]] = {}  # the step's, in the order taken
        self._step_weights: set[int] = set()  # id of every weight with a leaf in the step
        self._several = False  # a weight of the step has leaves of several sizes (to be merged)
        self._trained: list[tuple[Tensor, Tensor]] | None = None  # cached by trained(), until a leaf is added

    def __call__(self, weight: Tensor, sizes: tuple[int, ...]) -> Tensor:
        key = (id(weight), sizes)  # a call site passes its sizes alike every time: one key per slice
        entry = self._leaves.get(key)
        if entry is None:
            entry = self._leaves[key] = (weight, lead(weight.detach(), sizes).requires_grad_(weight.requires_grad))
        if key not in self._step and torch.is_grad_enabled() and weight.requires_grad:
            self._step[key] = entry  # one leaf for every use in the step: its gradient adds up (sandwich paths)
            self._several |= key[0] in self._step_weights
            self._step_weights.add(key[0])
            self._trained = None
        return entry[1]

    def leaves(self) -> list[Tensor]:
        """The step's leaves so far, in the order first taken (the same on every rank)."""
        return [leaf for _, leaf in self._step.values()]

    def trained(self) -> list[tuple[Tensor, Tensor]]:
        """(weight, leaf) for every weight the step trained, in the order first taken: ``leaf`` is a view of the
        weight's trained box and ``leaf.grad`` its gradient (the sum over the sizes the step used, each added into
        its own leading slice). Computed at the first call once backward (and the all-reduce) is done; the same
        objects until the step takes another leaf."""
        if self._trained is not None:
            return self._trained
        if not self._several:  # one size per weight (one path a step): the leaves themselves
            self._trained = [entry for entry in self._step.values() if entry[1].grad is not None]
            return self._trained
        boxes: dict[int, tuple[Tensor, list[Tensor]]] = {}
        for weight, leaf in self._step.values():
            if leaf.grad is not None:
                boxes.setdefault(id(weight), (weight, []))[1].append(leaf)
        out = []
        for weight, leaves in boxes.values():
            if len(leaves) == 1:
                out.append((weight, leaves[0]))
                continue
            box = tuple(max(sizes) for sizes in zip(*(leaf.shape for leaf in leaves)))
            merged = lead(weight.detach(), box).requires_grad_()
            merged.grad = torch.zeros(box, dtype=leaves[0].grad.dtype, device=weight.device)
            for leaf in leaves:
                lead(merged.grad, tuple(leaf.shape)).add_(leaf.grad)
            out.append((weight, merged))
        self._trained = out
        return out

    def zero_grad(self) -> None:
        """End the step: its leaves lose their gradients, and the next forward starts a new step."""
        for _, leaf in self._step.values():
            leaf.grad = None
        self._step.clear()
        self._step_weights.clear()
        self._several, self._trained = False, None

    def clear(self) -> None:
        """Forget every leaf (the weights moved to new storage)."""
        self.zero_grad()
        self._leaves.clear()
