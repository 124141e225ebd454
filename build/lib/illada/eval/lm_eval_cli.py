"""`illada-lm-eval`: lm-evaluation-harness's own command line with the `illada` model.

lm_eval (0.4.13) finds models only in its built-in table or in modules already imported
(`@register_model`); it has no plug-in discovery, so `lm_eval --model illada` cannot see
this package. This entry point imports the adapter, then hands every argument to lm_eval:

    illada-lm-eval --model illada --model_args checkpoint=CKPT,scorer=likelihood \\
        --include_path $(python -c 'import illada.eval.harness as h; print(h.TASKS_DIR)') --tasks illada_toy_mc
"""

from __future__ import annotations

import sys


def main() -> int:
    import illada.eval.harness  # noqa: F401  (registers "illada" in lm_eval's model registry)
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
