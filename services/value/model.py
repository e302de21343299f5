"""The critic: a transformer trunk from a Hugging Face checkpoint plus a scalar head.

The trunk is `AutoModel.from_pretrained(path)`: for a causal LM checkpoint (the policy's) that is its
base model without the LM head, for a sequence-classification checkpoint (a reward model's) its
encoder without the score head. The head is `nn.Linear(hidden, 1)` in fp32 on the trunk's last
hidden state (cast to fp32), so values are fp32 whatever the trunk's dtype.

Alignment (services/common/batching.py): the value at position p is V of the state after tokens
0..p, i.e. the state whose next action is token p + 1. The value reported for response token k is
therefore head(hidden[k - 1]): the value of the state *before* emitting token k, the V(s_t) that GAE
pairs with action a_t = token k.

Head initialisation: zeros by default (`head_init_std = 0`), so a fresh critic predicts V = 0
everywhere, the neutral guess for returns near zero, and its first values do not depend on random
numbers. With zero weights the trunk gets no gradient on the first optimizer step (d loss / d hidden
= head.weight = 0) and is trained from the second on. `head_init_std > 0` draws the weight from
N(0, std²) with the role's seed instead. The bias always starts at 0.

Weights stay in the role's model dtype (the head in fp32). AdamW on bf16 weights drops updates smaller
than bf16's resolution, so train the critic with model.dtype=float32 where memory allows (the
default on CPU; "auto" picks bf16 on CUDA).

Dropout stays off (the model is kept in eval mode even while training): values must be a
deterministic function of the weights, for Values, for the clipped loss and for Save/Load round trips.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import AutoModel, PreTrainedModel


def hidden_size_of(trunk: PreTrainedModel) -> int:
    """Width of the trunk's last hidden state (text config for multimodal configs)."""
    config = trunk.config.get_text_config() if hasattr(trunk.config, "get_text_config") else trunk.config
    return int(config.hidden_size)


class Critic(nn.Module):
    """trunk + fp32 linear head: token ids [b, W] -> values [b, W] (one per position)."""

    def __init__(self, trunk: PreTrainedModel, *, head_init_std: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = nn.Linear(hidden_size_of(trunk), 1, dtype=torch.float32)
        with torch.no_grad():
            self.head.bias.zero_()
            if head_init_std > 0:
                gen = torch.Generator().manual_seed(seed)
                w = torch.randn(self.head.weight.shape, generator=gen) * head_init_std
                self.head.weight.copy_(w)
            else:
                self.head.weight.zero_()
        self.head.to(next(trunk.parameters()).device)
        self.eval()

    def train(self, mode: bool = True) -> Critic:
        """Always eval: dropout off (see the module doc). Gradients do not depend on this flag."""
        return super().train(False)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
        """Values per position.

        Args:
            input_ids: [b, W] int64, right-padded.
            attention_mask: [b, W] 1 on real tokens.
            position_ids: [b, W] 0..len-1 on real tokens.

        Returns:
            [b, W] fp32: entry p = V(state after tokens 0..p). Padded positions hold garbage.
        """
        hidden = self.trunk(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state  # [b, W, H]
        return self.head(hidden.float()).squeeze(-1)


def load_critic(
    path: str,
    *,
    dtype: torch.dtype,
    device: torch.device,
    head_init_std: float = 0.0,
    seed: int = 0,
    attn_implementation: str | None = None,
) -> Critic:
    """Trunk from a local checkpoint directory (AutoModel, no download) + a fresh head, on `device`."""
    kwargs: dict[str, object] = {"dtype": dtype, "local_files_only": True}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    trunk = AutoModel.from_pretrained(path, **kwargs)
    trunk.to(device)
    return Critic(trunk, head_init_std=head_init_std, seed=seed)
