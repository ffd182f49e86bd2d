"""The inner-link adapter R_in (RecursiveMAS, as re-implemented by ARM), one readable module.

    R_in(h) = LN_post(h + W2 · GELU(W1 · LN_pre(h)))        W1, W2 ∈ R^{d×d}, with biases

Parameters: W1, W2 (2d²) + b1, b2 (2d) + LN_pre and LN_post affine (γ, β each: 4d) = 2d² + 6d
(52,459,520 at d = 5120). The residual adds the raw h, so the map starts near "normalise h".

`latent_rollout` is how the adapter is used (RecursiveMAS latent thoughts): its output is appended as
the base's next input embedding, m times, without decoding text.
"""

from __future__ import annotations

import torch
from torch import nn

from lab import LabError
from lab.hooks import capture, forward


def param_count(d: int) -> int:
    """The published formula: 2d² + 6d."""
    return 2 * d * d + 6 * d


class InnerLink(nn.Module):
    """R_in: last-layer hidden state (…, d) -> a vector in the input-embedding space (…, d).

    A link loaded from disk (`lab.innerlink.load`, `train_or_load`) carries the `Config` it stands for as
    `.config` and its saved `Artifact` as `.artifact`; a freshly built one has None for both."""

    config = None      # the lab.innerlink.Config this link was trained under (set on load)
    artifact = None    # the lab.store.Artifact it was loaded from (set on load)

    def __init__(self, d: int):
        super().__init__()
        if not isinstance(d, int) or d < 1:
            raise LabError(f"the adapter width d must be a positive int, got {d!r}")
        self.d = d
        self.ln_pre = nn.LayerNorm(d)
        self.w1 = nn.Linear(d, d)
        self.w2 = nn.Linear(d, d)
        self.ln_post = nn.LayerNorm(d)

    def check_width(self, h: torch.Tensor, what: str = "hidden state") -> None:
        if not torch.is_tensor(h):
            raise LabError(f"the {what} must be a torch.Tensor, got {type(h).__name__}")
        if h.dim() == 0 or h.shape[-1] != self.d:
            raise LabError(f"the {what} has width {tuple(h.shape)[-1] if h.dim() else 'scalar'} "
                           f"(shape {tuple(h.shape)}), but this inner link expects width d={self.d}")

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Computes in the adapter's own dtype (float32, also on a half-precision base) and returns the
        dtype it was given: a bf16 base's state comes back as a bf16 input embedding. Both casts are
        no-ops when the dtypes already match."""
        self.check_width(h)
        x = h.to(self.w1.weight.dtype)
        return self.ln_post(x + self.w2(nn.functional.gelu(self.w1(self.ln_pre(x))))).to(h.dtype)  # (…, d)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "InnerLink":
        if "w1.weight" not in tensors:
            raise LabError(f"not an inner-link state dict (keys: {sorted(tensors)[:6]}…)")
        m = cls(int(tensors["w1.weight"].shape[0]))
        try:
            m.load_state_dict(tensors)
        except RuntimeError as e:
            raise LabError(f"inner-link tensors do not fit the adapter: {str(e).splitlines()[0]}") from None
        return m


def cosine_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L_in = 1 − cos(pred, target), averaged over all leading dims; computed in float32."""
    return (1 - nn.functional.cosine_similarity(pred.float(), target.float(), dim=-1)).mean()


def build(config, base) -> InnerLink:
    """The adapter for this base, seeded by `config.seed` (W1, W2 d×d; 2d² + 6d parameters)."""
    torch.manual_seed(config.seed)
    return InnerLink(base.d_model).to(base.device)


def latent_rollout(base, link: InnerLink, prefix_embeds: torch.Tensor, steps: int,
                   grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """RecursiveMAS latent thoughts: from the state at the end of `prefix_embeds` (B, T, d), append
    R_in(h) as the next input embedding, `steps` times, through lab.hooks.forward(inputs_embeds=...).
    Returns (latents (B, m, d) in the base's dtype, the raw last-layer states they were made from (B, m, d))."""
    if steps < 1:
        raise LabError(f"a latent rollout needs steps >= 1, got {steps}")
    link.check_width(prefix_embeds, "prefix embedding")
    seq = prefix_embeds
    lat, raw = [], []
    ctx = torch.enable_grad() if grad else torch.no_grad()
    with ctx:
        for _ in range(steps):
            with capture(base, layers=[], final=True, detach=not grad) as cache:
                forward(base, inputs_embeds=seq)
            h = cache["final"][:, -1]          # (B, d)
            e = link(h).to(base.dtype)         # (B, d) the latent thought, an input embedding of the base
            raw.append(h)
            lat.append(e)
            seq = torch.cat([seq, e[:, None]], dim=1)  # (B, T+k, d)
    return torch.stack(lat, 1), torch.stack(raw, 1)
