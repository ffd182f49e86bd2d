"""The combiner: h' = (1 + alpha) * h + M @ T + beta, zero at init, read by the frozen head.

h is the final-normed state (what the head reads), so logits = head(h') and at init
h' = 1.0 * h + 0 + 0 = h bit for bit: the base's logits exactly (tested with max |diff| == 0.0).
The parameters stay float32 on a half-precision base (a bf16 alpha would round 1 + alpha to steps of
2^-8): the combiner computes in its own dtype and hands h' back in h's dtype.
Parameters: 1 + d*d + d (262,657 at d = 512, as published).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lab import LabError


class Combiner(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        if not isinstance(d, int) or d < 1:
            raise LabError(f"d must be a positive int, got {d!r}")
        self.d = d
        self.alpha = nn.Parameter(torch.zeros(()))     # scalar gain on h
        self.M = nn.Parameter(torch.zeros(d, d))        # (d_out, d_in) mixes the thought in
        self.beta = nn.Parameter(torch.zeros(d))        # bias
        self.init_weights()

    def init_weights(self) -> None:
        """All zeros: the combiner starts as the exact identity on h."""
        with torch.no_grad():
            self.alpha.zero_()
            self.M.zero_()
            self.beta.zero_()

    def check(self, h: torch.Tensor, t: torch.Tensor) -> None:
        if h.shape[-1] != self.d or t.shape[-1] != self.d:
            raise LabError(f"feature widths do not match the combiner: h has width {h.shape[-1]}, "
                           f"T has width {t.shape[-1]}, expected d = {self.d} for both")
        if h.shape != t.shape:
            raise LabError(f"h {tuple(h.shape)} and T {tuple(t.shape)} must have the same shape (B, d)")

    def forward(self, h: torch.Tensor, t: torch.Tensor, alpha: float | None = None,
                m_scale: float = 1.0) -> torch.Tensor:
        """h, t: (B, d) -> h' (B, d). `alpha` overrides the fitted alpha and `m_scale` scales M and beta
        (the app's sliders); the defaults use the fitted values unchanged. Computed in the parameters' dtype
        (h and t cast to it: no-ops when they match), returned in h's dtype."""
        self.check(h, t)
        out_dtype, h, t = h.dtype, h.to(self.M.dtype), t.to(self.M.dtype)
        a = self.alpha if alpha is None else torch.as_tensor(alpha, dtype=h.dtype, device=h.device)
        if m_scale == 1.0:
            mix = F.linear(t, self.M, self.beta)                     # (B, d)
        else:
            mix = F.linear(t, self.M * m_scale, self.beta * m_scale)
        return ((1 + a) * h + mix).to(out_dtype)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        return {f"{prefix}{n}": p.detach().clone() for n, p in self.named_parameters()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str = "", d: int | None = None) -> "Combiner":
        try:
            M = tensors[f"{prefix}M"]
        except KeyError:
            raise LabError(f"no combiner named {prefix!r} in these tensors (have: {sorted(tensors)[:8]}...)") from None
        if d is not None and M.shape != (d, d):
            raise LabError(f"combiner {prefix!r} has M of shape {tuple(M.shape)}, but the base has width d = {d}")
        c = cls(int(M.shape[0]))
        with torch.no_grad():
            for n, p in c.named_parameters():
                p.copy_(tensors[f"{prefix}{n}"])
        return c.requires_grad_(False).eval()


def combined_logits(base, combiner: Combiner, h: torch.Tensor, t: torch.Tensor, **kw) -> torch.Tensor:
    """Frozen head on h' (no final norm: h is already final-normed; Base.logits casts to the head's dtype). (B, d) -> (B, V)."""
    return base.logits(combiner(h, t, **kw), normed=True)
