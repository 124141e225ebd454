"""The bidirectional masked-diffusion Transformer on megatron-core.

The config (illada.model.config) is importable without megatron; building and running the
model is in illada.model.build, the CPU bridge in illada.model.cpu_bridge.
"""

# illada.config and illada.model.config import each other (Strict one way, ModelConfig the
# other). Importing illada.config first, whichever module is asked for first, makes both
# orders work as long as illada/config.py imports ModelConfig below its Strict class.
import illada.config  # noqa: F401
