"""`python -m rl.dpo --config x.yaml [--section.key value ...] [--resume [PATH]]`.

DPO (loss types sigmoid, ipo, hinge, robust): preference pairs prompt, chosen, rejected.
The config schema is rl/config.py's OfflineRunConfig; examples/dpo.yaml runs offline on CPU.
"""

import sys

from rl.cli import offline_main, run_cli

main = offline_main("dpo")

if __name__ == "__main__":
    sys.exit(run_cli("rl.dpo", main))
