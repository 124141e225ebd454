"""LLaDA's generate loop written out as SPEC §3 states it (one full forward per step, every
block given steps/num_blocks steps, topk per row): the reference the sampler must equal.
Greedy only (the noise streams of temperature sampling are not comparable). Like the
sampler, it never proposes the mask token."""

from __future__ import annotations

import torch


def llada_generate(model, prompt: torch.Tensor, *, steps: int, gen_length: int, block_length: int, mask_id: int, cfg_scale: float = 0.0) -> torch.Tensor:
    b, p = prompt.shape
    x = torch.full((b, p + gen_length), mask_id, dtype=torch.long)
    x[:, :p] = prompt
    prompt_index = x != mask_id
    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    for nb in range(num_blocks):
        lo, hi = p + nb * block_length, p + (nb + 1) * block_length
        masked_in_block = (x[:, lo:hi] == mask_id).sum(1)
        n = (masked_in_block // steps_per_block)[:, None].repeat(1, steps_per_block)
        for j in range(b):
            n[j, : int(masked_in_block[j] % steps_per_block)] += 1
        for i in range(steps_per_block):
            mask_index = x == mask_id
            if cfg_scale > 0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                logits, un_logits = torch.chunk(model(torch.cat([x, un_x])), 2)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = model(x)
            logits = logits.double()
            proposable = logits.clone()
            proposable[..., mask_id] = float("-inf")
            x0 = proposable.argmax(-1)
            x0_p = torch.gather(torch.softmax(logits, -1), -1, x0[..., None]).squeeze(-1)
            x0_p[:, hi:] = float("-inf")
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, torch.tensor(float("-inf"), dtype=torch.float64))
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(b):
                _, select = torch.topk(confidence[j], k=int(n[j, i]))
                transfer[j, select] = True
            x[transfer] = x0[transfer]
    return x
