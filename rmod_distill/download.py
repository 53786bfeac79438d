"""The download command: fetch and verify an adapter from any source.

    rmod-distill download SOURCE --to DIR

SOURCE is a local PEFT folder, a W&B offline run folder, a W&B artifact path
``entity/project/name:alias`` or a hub repo id ``org/name`` (see :mod:`rmod_distill.adapters`).
"""

from __future__ import annotations

import argparse
import json
import sys

from rmod_distill.adapters import fetch_adapter


def main(argv: list[str] | None = None) -> None:
    """``rmod-distill download SOURCE --to DIR``."""
    parser = argparse.ArgumentParser(prog="rmod-distill download", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="PEFT folder, W&B offline run folder, W&B artifact path or hub repo id")
    parser.add_argument("--to", required=True, help="Folder to write the adapter to (must be empty or new)")
    args = parser.parse_args(argv)
    dest = fetch_adapter(args.source, args.to)
    config = json.loads((dest / "adapter_config.json").read_text())
    base = config.get("base_model_name_or_path") or "BASE_MODEL"
    print(f"adapter verified -> {dest} (base policy: {base})")
    print("sample from it with PEFT (it loads the base; the tokenizer pads on the left, as batches need):")
    print("  from peft import AutoPeftModelForCausalLM")
    print("  from transformers import AutoTokenizer")
    print(f"  model = AutoPeftModelForCausalLM.from_pretrained({str(dest)!r})")
    print(f"  tokenizer = AutoTokenizer.from_pretrained({str(dest)!r})")
    print("or with rmod-distill (the embedded default too):")
    print(f"  from rmod_distill.policy import load_policy; load_policy({base!r}, adapter={str(dest)!r})")
    print(f"evaluate it with your experiment's eval recipe (its policy.model must be {base}):")
    print(f"  rmod-distill eval --config recipes/<experiment>/eval.yaml --adapter {dest}")


if __name__ == "__main__":
    main(sys.argv[1:])
