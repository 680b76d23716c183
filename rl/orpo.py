"""`python -m rl.orpo --config x.yaml [--section.key value ...] [--resume [PATH]]`.

ORPO: preference pairs prompt, chosen, rejected; no reference model.
The config schema is rl/config.py's OfflineRunConfig; examples/orpo.yaml runs offline on CPU.
"""

import sys

from rl.cli import offline_main, run_cli

main = offline_main("orpo")

if __name__ == "__main__":
    sys.exit(run_cli("rl.orpo", main))
