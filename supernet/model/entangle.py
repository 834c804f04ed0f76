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

Layout: autograd writes a linear layer's weight gradient in the layout of a dense weight; for a slice of a larger
row-major weight (``w[:o, :i]``, rows ``i`` wide in memory rows of the full width) it comes transposed, and a leaf
that is not dense must receive a contiguous gradient, so every backward would copy it once more. The supernet
with ``entangle=slice`` therefore stores its linear weights column-major (the same (out, in) values, memory laid
out as their transpose); a leaf is then taken in the storage's orientation (:func:`oriented`: ``w.t()[:i, :o]``,
rows of the full width), the layer computes with its transpose, and its gradient arrives contiguous in that
orientation: no copy, and the optimizer's views of weight, gradient and moments share one layout.
"""

from __future__ import annotations

import torch
from torch import Tensor


def column_major(t: Tensor) -> bool:
    """Whether ``t`` is a 2-D tensor stored as its transpose (strides (1, rows))."""
    return t.dim() == 2 and not t.is_contiguous() and t.t().is_contiguous()


def oriented(t: Tensor) -> Tensor:
    """``t`` in the orientation of its storage: ``t.t()`` for a column-major matrix, else ``t`` (a view)."""
    return t.t() if column_major(t) else t


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
        # (id(weight), sizes) -> (weight, leaf, whether the leaf is the slice's transpose: see oriented())
        self._leaves: dict[tuple[int, tuple[int, ...]], tuple[Tensor, Tensor, bool]] = {}
        self._step: dict[tuple[int, tuple[int, ...]], tuple[Tensor, Tensor, bool]] = {}  # the step's, in order
        self._step_weights: set[int] = set()  # id of every weight with a leaf in the step
        self._several = False  # a weight of the step has leaves of several sizes (to be merged)
        self._trained: list[tuple[Tensor, Tensor]] | None = None  # cached by trained(), until a leaf is added

    def __call__(self, weight: Tensor, sizes: tuple[int, ...]) -> Tensor:
        _, leaf, flip = self._take(weight, sizes)
        return leaf.t() if flip else leaf  # a fresh transpose: autograd records it in the mode of this call

    def transposed(self, weight: Tensor, sizes: tuple[int, int]) -> Tensor:
        """``weight[:o, :i].t()`` of a matrix, ``sizes`` = (o, i): for a column-major weight, the leaf itself, so a
        layer computing ``x @ weight[:o, :i].t()`` adds no transpose to the graph (layers.py's linear)."""
        _, leaf, flip = self._take(weight, sizes)
        return leaf if flip else leaf.t()

    def _take(self, weight: Tensor, sizes: tuple[int, ...]) -> tuple[Tensor, Tensor, bool]:
        """The entry of (weight, sizes), made at the first call; recorded as the step's when autograd records."""
        key = (id(weight), sizes)  # a call site passes its sizes alike every time: one key per slice
        entry = self._leaves.get(key)
        if entry is None:
            flip = column_major(weight)
            leaf = lead(weight.detach().t(), sizes[::-1]) if flip else lead(weight.detach(), sizes)
            entry = self._leaves[key] = (weight, leaf.requires_grad_(weight.requires_grad), flip)
        if key not in self._step and torch.is_grad_enabled() and weight.requires_grad:
            self._step[key] = entry  # one leaf for every use in the step: its gradient adds up (sandwich paths)
            self._several |= key[0] in self._step_weights
            self._step_weights.add(key[0])
            self._trained = None
        return entry

    def leaves(self) -> list[Tensor]:
        """The step's leaves so far, in the order first taken (the same on every rank)."""
        return [entry[1] for entry in self._step.values()]

    def trained(self) -> list[tuple[Tensor, Tensor]]:
        """(weight, leaf) for every weight the step trained, in the order first taken: ``leaf`` is a view of the
        weight's trained box in the storage's orientation (``oriented(weight)[:s0, :s1, ...]``) and ``leaf.grad``
        its gradient (the sum over the sizes the step used, each added into its own leading slice). Computed at
        the first call once backward (and the all-reduce) is done; the same objects until the step takes another
        leaf."""
        if self._trained is not None:
            return self._trained
        if not self._several:  # one size per weight (one path a step): the leaves themselves
            self._trained = [(w, leaf) for w, leaf, _ in self._step.values() if leaf.grad is not None]
            return self._trained
        boxes: dict[int, tuple[Tensor, list[Tensor]]] = {}
        for weight, leaf, _ in self._step.values():
            if leaf.grad is not None:
                boxes.setdefault(id(weight), (weight, []))[1].append(leaf)
        out = []
        for weight, leaves in boxes.values():
            if len(leaves) == 1:
                out.append((weight, leaves[0]))
                continue
            box = tuple(max(sizes) for sizes in zip(*(leaf.shape for leaf in leaves)))
            merged = lead(oriented(weight.detach()), box).requires_grad_()
            merged.grad = torch.zeros(box, dtype=leaves[0].grad.dtype, device=weight.device)
            for leaf in leaves:
                lead(merged.grad, tuple(leaf.shape)).add_(leaf.grad)
            out.append((weight, merged))
        self._trained = out
        return out

    def zero_grad(self) -> None:
        """End the step: its leaves lose their gradients, and the next forward starts a new step."""
        for _, leaf, _ in self._step.values():
            leaf.grad = None
        self._step.clear()
        self._step_weights.clear()
        self._several, self._trained = False, None

    def clear(self) -> None:
        """Forget every leaf (the weights moved to new storage)."""
        self.zero_grad()
        self._leaves.clear()
