"""`python -m rl.sft --config x.yaml [--section.key value ...] [--resume [PATH]]`.

SFT: rows prompt, completion (or messages), packed by default.
The config schema is rl/config.py's OfflineRunConfig; examples/sft.yaml runs offline on CPU.
"""

import sys

from rl.cli import offline_main, run_cli

main = offline_main("sft")

if __name__ == "__main__":
    sys.exit(run_cli("rl.sft", main))
