"""Write a SLURM batch script for a run config and submit it. Same as `mssr launch`.

    python tools/slurm_launch.py examples/configs/qwen2_5_vl_7b_mssr.yaml --nodes 2 --partition gpu --dry-run
    python tools/slurm_launch.py examples/configs/tiny_cpu.yaml --gpus-per-node 0 --procs-per-node 2
    python tools/slurm_launch.py --help
"""

import sys

from mssr_megatron.launch import main

if __name__ == "__main__":
    sys.exit(main(prog="slurm_launch.py"))
