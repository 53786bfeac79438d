"""The ``rmod-distill`` command: one subcommand per stage.

    rmod-distill generate --config recipes/default/generate.yaml
    rmod-distill <stage> --help     # every recipe key of that stage
    rmod-distill <stage> --config recipes/default/<stage>.yaml --dry-run   # check the recipe, print it resolved
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, one-line description); each module has main(argv).
STAGES = {
    "generate": ("rmod_distill.generate", "RMOD and baseline decoding over a prompt set into a dataset"),
    "distill": ("rmod_distill.distill", "LoRA SFT (TRL + PEFT) of the policy on RMOD's outputs"),
    "eval": ("rmod_distill.eval", "the adapter against RMOD and the baselines on held-out prompts"),
    "iterate": ("rmod_distill.iterate", "rounds of RMOD over the latest student, each distilled again"),
    "compare": ("rmod_distill.compare", "students side by side: several evals' adapters against one eval's baselines"),
    "values": ("rmod_distill.values", "train a value model (G heads) by Monte-Carlo regression on rollouts"),
    "download": ("rmod_distill.download", "fetch and verify an adapter: folder, W&B offline run or artifact, hub repo"),
    "init": ("rmod_distill.init", "a new experiment's generate, distill and eval recipes, consistent across stages"),
}


def usage() -> str:
    """The top-level help text."""
    lines = ["usage: rmod-distill <stage> --config recipes/<recipe>/<stage>.yaml [--key value ...]", "", "stages:"]
    lines += [f"  {name:<10} {desc}" for name, (_, desc) in STAGES.items()]
    lines += ["", "Run `rmod-distill <stage> --help` for a stage's keys. The recipe stages (generate, distill, eval,",
              "iterate, values) take --dry-run: check the recipe and print it resolved without running anything",
              "(compare, download and init take paths and names, not recipes). Add --debug to see a traceback",
              "behind an error."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Dispatch to a stage's ``main``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        raise SystemExit(0 if argv else 2)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        print(f"rmod-distill: unknown stage {stage!r}\n\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    from rmod_distill.errors import UserError
    from rmod_distill.quiet import install
    from rmod_distill.config import hide_secrets, scrub, secret_values

    # The stage has its arguments in `rest`; whatever reads the process's command line later (W&B records
    # it in the run's metadata) sees <hidden> for a secret such as --hub_token.
    hide_secrets(*secret_values(rest))
    install()  # the libraries' warnings a user cannot act on (rmod_distill/quiet.py says which and why)
    try:
        importlib.import_module(STAGES[stage][0]).main(rest)
    except UserError as exc:
        if debug:
            raise
        # One line a user can act on; --debug shows the traceback.
        message = scrub(" ".join(str(exc).split()))  # a library's error quoted in it may hold a token
        print(f"rmod-distill {stage}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
