"""Train a lexlora adapter.

    accelerate launch scripts/train_lora.py --config configs/smoke.yaml [key=value ...]
    python scripts/train_lora.py --config configs/smoke.yaml [key=value ...]
"""

import sys

from lexlora.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
