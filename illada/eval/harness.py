"""An lm-evaluation-harness model for illada checkpoints, and the repository's local tasks.

    lm = IlladaLM(load_for_inference(checkpoint), scorer="confidence")
    results = run_tasks(lm, ["illada_toy_mc"])            # tasks from illada/eval/tasks/

- loglikelihood(context, continuation): the confidence score (`confidence.py`; its reveal
  order `confidence_order`: "target", the candidate's own token, or "argmax", the model's
  top token) or the Monte-Carlo ELBO (`likelihood.py`, mc_num samples); is_greedy is the
  confidence scorer's own, or for the ELBO whether one pass over the fully masked
  continuation predicts it.
- loglikelihood_rolling(text): the ELBO of the text (no context), chunked to the model's
  max_seq_len.
- generate_until(context, {until, max_gen_toks}): the sampler (block_length, steps per
  block, threshold, prefix cache as configured), cut at the first stop token or `until`.
  The repetition guard is off unless asked for (`repetition_guard=True`), so generation
  scores compare with LLaDA's, whose evaluation has none.

Contexts and continuations are tokenized as the harness's own models do: the whole string,
split where the context's tokens end, with the context's trailing spaces moved to the
continuation. The harness's hub datasets cannot be reached offline; the local tasks read
JSON lines shipped in illada/eval/tasks/.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import simple_parse_args_string

from illada.eval.confidence import ORDERS, confidence_scores
from illada.eval.likelihood import elbo, greedy_matches
from illada.sampling.repetition import RepetitionGuard
from illada.sampling.sampler import Decoding, SamplerConfig, generate

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
SCORERS = ("confidence", "likelihood")


@register_model("illada")
class IlladaLM(LM):
    def __init__(
        self,
        loaded,
        *,
        scorer: str = "confidence",
        confidence_order: str = "target",
        mc_num: int = 128,
        batch_size: int = 16,
        block_length: int = 32,
        steps_per_block: int | None = None,
        threshold: float | None = None,
        prefix_cache: bool = False,
        repetition_guard: bool = False,
        seed: int = 1234,
    ):
        super().__init__()
        if scorer not in SCORERS:
            raise ValueError(f"scorer must be one of {', '.join(SCORERS)} (got {scorer!r})")
        if confidence_order not in ORDERS:
            raise ValueError(f"confidence_order must be one of {', '.join(ORDERS)} (got {confidence_order!r})")
        self.loaded = loaded
        self.scorer, self.mc_num, self.batch_size = scorer, mc_num, batch_size
        self.confidence_order = confidence_order
        self.block_length = block_length
        self.steps_per_block = steps_per_block or block_length
        self.decoding = Decoding(threshold=threshold)
        self.prefix_cache = prefix_cache
        self.repetition = RepetitionGuard() if repetition_guard else None
        self.seed = seed
        self.max_length = loaded.config.max_seq_len

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> IlladaLM:
        """`checkpoint=PATH,scorer=likelihood,mc_num=32,...` (illada-lm-eval --model illada --model_args ...)."""
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> IlladaLM:
        from illada.inference import load_for_inference

        args = dict(arg_dict)
        if "checkpoint" not in args:
            raise ValueError("--model_args needs checkpoint=PATH")
        batch_size = (additional_config or {}).get("batch_size")
        if isinstance(batch_size, int):
            args.setdefault("batch_size", batch_size)
        return cls(load_for_inference(str(args.pop("checkpoint"))), **args)

    # --- scoring ------------------------------------------------------------------------

    def _encode_pair(self, context: str, continuation: str) -> tuple[torch.Tensor, torch.Tensor]:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.loaded.encode(context + continuation)
        n_context = len(self.loaded.encode(context)) if context else 0
        prompt, answer = whole[:n_context], whole[n_context:]
        room = self.max_length - len(answer)
        return prompt[max(0, len(prompt) - room) :] if room > 0 else prompt[:0], answer[-self.max_length :]

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [self._encode_pair(*r.args) for r in requests]
        model, special = self.loaded.model, self.loaded.special
        if self.scorer == "confidence":
            return [(s.logprob, s.greedy) for s in confidence_scores(model, pairs, special, order=self.confidence_order, batch_size=self.batch_size)]
        ll = elbo(model, pairs, special, mc_num=self.mc_num, batch_size=self.batch_size, generator=self._generator())
        return list(zip(ll, greedy_matches(model, pairs, special, self.batch_size)))

    def loglikelihood_rolling(self, requests) -> list[float]:
        out = []
        for r in requests:
            tokens = self.loaded.encode(r.args[0])
            chunks = [(tokens[:0], tokens[i : i + self.max_length]) for i in range(0, len(tokens), self.max_length)]
            ll = elbo(self.loaded.model, chunks, self.loaded.special, mc_num=self.mc_num, batch_size=self.batch_size, generator=self._generator())
            out.append(sum(ll))
        return out

    # --- generation ------------------------------------------------------------------------

    def generate_until(self, requests) -> list[str]:
        out = []
        for r in requests:
            context, kwargs = r.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            config = self._sampler(int(kwargs.get("max_gen_toks", 256)))
            prompt = self.loaded.encode(context)[-(self.max_length - config.gen_length) :]
            result = generate(self.loaded.model, [prompt], config, self.loaded.special, generator=self._generator(self.loaded.device))
            text = self.loaded.decode(result.answers(self.loaded.special)[0])
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out

    def _sampler(self, max_tokens: int) -> SamplerConfig:
        blocks = max(1, math.ceil(max_tokens / self.block_length))
        return SamplerConfig(
            gen_length=blocks * self.block_length,
            steps=blocks * self.steps_per_block,
            block_length=self.block_length,
            decoding=self.decoding,
            prefix_cache=self.prefix_cache,
            repetition=self.repetition,
        )

    def _generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self.seed)


def task_names(include_harness_tasks: bool = False) -> list[str]:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=include_harness_tasks).all_subtasks


def run_tasks(lm: LM, tasks: list[str], *, limit: int | None = None, bootstrap_iters: int = 0, include_harness_tasks: bool = False) -> dict:
    """Evaluate `lm` on harness tasks (the local ones; the harness's own too if asked, which
    need its hub datasets); returns the harness's results per task."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=include_harness_tasks)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; local tasks: {', '.join(manager.all_subtasks) if not include_harness_tasks else '(see lm_eval --tasks list)'}")
    results = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, bootstrap_iters=bootstrap_iters, log_samples=False)
    return results["results"]
