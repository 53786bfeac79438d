"""The libraries' warnings that a user cannot act on, filtered in one place.

Each entry of :data:`KNOWN` is one message that torch, transformers, TRL, PEFT, DeepSpeed or
W&B print on every run of a stage, with why hiding it loses nothing. Warnings whose cause was
ours are fixed at the cause instead: distill and values do not ask for pinned memory without
an accelerator (torch's ``pin_memory`` warning), and distill's trainers share one W&B run without
W&B refusing the second trainer's parameter count (transformers' "A ConfigError was raised
whilst setting the number of model parameters"; :func:`rmod_distill.tracking.trainer_wandb`).

:func:`install` runs in ``rmod-distill``'s main (before a stage imports anything heavy) and again
where distill starts its trainers (``accelerate launch -m rmod_distill.distill`` does not pass
through that main); :func:`quiet_wandb` where W&B starts. Every other warning still shows.
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings

# (category, message regex, module regex (where the warning is raised), why hiding it is safe)
KNOWN: tuple[tuple[type[Warning], str, str, str], ...] = (
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated", r"transformers\.modeling_utils",
     # PEFT (PeftModel.__init__, prepare_model_for_*) and TRL (its model utilities) read the old name of the
     # property; transformers answers from the new one, is_activation_checkpointing: the same value. The old
     # name goes in transformers 6, which constraints.txt does not allow until PEFT and TRL follow.
     "PEFT and TRL read transformers' deprecated alias of is_activation_checkpointing"),
    (FutureWarning, r"`gradient_checkpointing_(enable|disable)` is deprecated", r"transformers\.modeling_utils",
     # TRL's generation wrapper (DPO's and GRPO's sampling) switches checkpointing off and on again through the
     # old names; transformers forwards them to activation_checkpointing_disable / _enable unchanged.
     "TRL calls transformers' deprecated aliases of activation_checkpointing_enable / _disable"),
    (FutureWarning, r"`gradient_checkpointing` is deprecated", r"transformers\.training_args",
     # TRL's SFTConfig / DPOConfig / GRPOConfig declare their default (true) under the old name, so every
     # distill config that does not set activation_checkpointing raises it; transformers copies the value to
     # activation_checkpointing, the key the recipes use and the one the trainer reads.
     "TRL's configs default the deprecated gradient_checkpointing key; transformers honours it"),
)

# DeepSpeed's import-time message on a machine without a GPU. On such a machine the CPU is the only
# device and the stages run there as documented (use_cpu, dtype auto); where an NVIDIA device or
# driver is present it still shows, since there it means torch cannot see a GPU that is there.
DEEPSPEED_CPU = "Setting accelerator to CPU"

# W&B's terminal warning each time TRL writes a checkpoint's model card (TRL asks for the run's URL to
# put in that card): an offline run has no URL until it is synced. The card of the adapter is ours
# (cards.py) and W&B prints the offline run's folder and the `wandb sync` command at the end.
WANDB_OFFLINE_URL = "URL not available in offline run"


def _gpu_present() -> bool:
    return os.path.exists("/dev/nvidiactl") or shutil.which("nvidia-smi") is not None


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def install() -> None:
    """Filter the :data:`KNOWN` warnings and DeepSpeed's CPU message (idempotent)."""
    for category, message, module, _why in KNOWN:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    # DeepSpeed makes its "DeepSpeed" logger when imported; a filter added to the same logger first stays.
    logger = logging.getLogger("DeepSpeed")
    if not _gpu_present() and not any(isinstance(f, _DropMessage) for f in logger.filters):
        logger.addFilter(_DropMessage(DEEPSPEED_CPU))


def quiet_wandb() -> None:
    """Drop :data:`WANDB_OFFLINE_URL` from W&B's terminal warnings (idempotent; imports W&B)."""
    import wandb

    if getattr(wandb.termwarn, "_rmod_quiet", False):
        return
    original = wandb.termwarn

    def termwarn(string, *args, **kwargs):
        if WANDB_OFFLINE_URL in str(string):
            return None
        return original(string, *args, **kwargs)

    termwarn._rmod_quiet = True
    wandb.termwarn = termwarn
