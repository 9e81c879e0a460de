"""One matrix product for sibling projections that read the same input.

Transformers' Llama-family blocks project the same hidden states three times for attention
(``q_proj``, ``k_proj``, ``v_proj``) and twice in the MLP (``gate_proj``, ``up_proj``). At decode
batch sizes those products read their weights once per step and little else, and the small ones
(the key and value projections of a GQA model: 1 MB each in the 1.1B Llama shape) run far below
the copy rate; one product over the concatenated weights reads the same bytes in one kernel.

:func:`fuse_sibling_linears` replaces each such group in place: the parent module gets a
:class:`FusedLinear` holding the concatenated weight (and bias), and the projections become
:class:`FusedLinearPart` views of it. The model's own forward is unchanged: the first part called
computes the whole product and leaves the other parts' slices for them; a part called with a
different input (another call order, or a caller of its own) computes its slice alone, so results
never depend on the order. The last part releases the shared result, so nothing outlives a layer's
forward. The parts work eagerly, under ``torch.compile(fullgraph=True)`` and in CUDA graphs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FusedLinear", "FusedLinearPart", "fuse_sibling_linears", "SIBLING_GROUPS"]

#: (fused module name, sibling projection names), in the order the blocks call them
SIBLING_GROUPS = (("qkv_proj", ("q_proj", "k_proj", "v_proj")), ("gate_up_proj", ("gate_proj", "up_proj")))


class FusedLinear(nn.Module):
    """The concatenated weights ``[sum(out_features), in_features]`` (and biases) of sibling linears.

    Args:
        linears: ``nn.Linear`` modules with the same ``in_features``, dtype and device, all with or
            all without a bias.
    """

    def __init__(self, linears: list[nn.Linear]):
        super().__init__()
        self.sizes = [m.out_features for m in linears]
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.weight = nn.Parameter(_concat_in_place([m.weight for m in linears]), requires_grad=False)
        has_bias = linears[0].bias is not None
        self.bias = (nn.Parameter(_concat_in_place([m.bias for m in linears]), requires_grad=False)
                     if has_bias else None)
        #: (input, output slices) of the last whole product, until its last part takes its slice
        self.pending: tuple[torch.Tensor, list[torch.Tensor]] | None = None


def _concat_in_place(params: list[torch.Tensor]) -> torch.Tensor:
    """The parameters concatenated along dim 0; each parameter then holds its rows of the result
    (``.data`` swapped), so its old memory is freed at once, whoever else refers to the parameter,
    and the model's weights are never held twice."""
    first = params[0]
    fused = torch.empty((sum(p.shape[0] for p in params), *first.shape[1:]), dtype=first.dtype,
                        device=first.device)
    offset = 0
    for p in params:
        rows = fused[offset:offset + p.shape[0]]
        rows.copy_(p.detach())
        p.data = rows
        offset += p.shape[0]
    return fused


class FusedLinearPart(nn.Module):
    """Part ``index`` of a :class:`FusedLinear`: the product of its rows of the weights."""

    def __init__(self, group: FusedLinear, index: int):
        super().__init__()
        object.__setattr__(self, "group", group)  # not a submodule: the parent holds it once
        self.index = index
        self.in_features = group.weight.shape[1]
        self.out_features = group.sizes[index]

    def _rows(self, fused: torch.Tensor | None) -> torch.Tensor | None:
        start = self.group.offsets[self.index]
        return None if fused is None else fused[start:start + self.out_features]

    @property
    def weight(self) -> torch.Tensor:
        """This part's rows of the fused weight (a view)."""
        return self._rows(self.group.weight)

    @property
    def bias(self) -> torch.Tensor | None:
        """This part's entries of the fused bias (a view), or ``None``."""
        return self._rows(self.group.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, i = self.group, self.index
        last = len(g.sizes) - 1
        if i == 0:
            parts = list(F.linear(x, g.weight, g.bias).split(g.sizes, dim=-1))
            g.pending = (x, parts)
            return parts[0]
        pending = g.pending
        if pending is not None and pending[0] is x:
            if i == last:
                g.pending = None
            return pending[1][i]
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"part {self.index} of {self.group.sizes}, in_features={self.in_features}"


def _fusable(linears: list) -> bool:
    if not all(type(m) is nn.Linear for m in linears):
        return False
    first = linears[0]
    return all(m.in_features == first.in_features and m.weight.dtype == first.weight.dtype
               and m.weight.device == first.weight.device and (m.bias is None) == (first.bias is None)
               for m in linears)


@torch.no_grad()
def fuse_sibling_linears(model: nn.Module) -> int:
    """Fuse every module's ``q_proj / k_proj / v_proj`` and ``gate_proj / up_proj`` (plain
    ``nn.Linear`` siblings with one input size, dtype and device) in place.

    Returns:
        The number of groups fused (0 for models without such siblings, e.g. GPT-2's fused
        ``c_attn``). Calling it again fuses nothing more.
    """
    count = 0
    for module in list(model.modules()):
        for fused_name, names in SIBLING_GROUPS:
            linears = [getattr(module, n, None) for n in names]
            if hasattr(module, fused_name) or not _fusable(linears):
                continue
            group = FusedLinear(linears)
            setattr(module, fused_name, group)
            for i, n in enumerate(names):
                setattr(module, n, FusedLinearPart(group, i))
            count += 1
    return count
