"""sMLP: the GT-assisted token transform that makes the teachers' input."""
import torch
from torch import nn


class SMLP(nn.Module):
    """x~ = x + m * (ReLU(W x + b) - x): foreground tokens are replaced by ReLU(Wx+b),
    background and padding tokens pass unchanged. One instance is shared model-wide; all of it is
    teacher-only."""

    TEACHER_PARAMETERS = ("linear",)

    def __init__(self, dim):
        super().__init__()
        self.linear = nn.Linear(dim, dim)  # PyTorch default init, as the official code

    def forward(self, x, fg_mask):
        """x: (B, N, C), fg_mask: (B, N) bool -> (B, N, C)."""
        return torch.where(fg_mask[..., None], torch.relu(self.linear(x)), x)
