"""Scoring masked-diffusion LMs (SPEC §3).

    likelihood  the Monte-Carlo ELBO (low-discrepancy mask counts) and perplexity
    confidence  iLLaDA's confidence-based scoring of a candidate answer
    harness     an lm-evaluation-harness model, and the local tasks in tasks/
    cli         `illada eval`
"""
