"""`python -m rl.kto --config x.yaml [--section.key value ...] [--resume [PATH]]`.

KTO: unpaired rows prompt, completion, label (true = desirable).
The config schema is rl/config.py's OfflineRunConfig; examples/kto.yaml runs offline on CPU.
"""

import sys

from rl.cli import offline_main, run_cli

main = offline_main("kto")

if __name__ == "__main__":
    sys.exit(run_cli("rl.kto", main))
