"""The accelerate config files parse as accelerate's launcher reads them; the multi-node one
describes 2 machines x 4 GPUs and takes the machine rank from the command line."""
from __future__ import annotations

from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"


def _launch_args(*argv: str):  # noqa: ANN202 - argparse.Namespace
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args([*argv, "main.py"])
    return _validate_launch_command(args)[0]


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_config_file_loads(name):
    from accelerate.commands.config.config_args import ClusterConfig

    cfg = ClusterConfig.from_yaml_file(str(CONFIGS / name))
    assert cfg.num_processes >= 1 and cfg.num_machines >= 1


def test_multinode_config_is_two_machines_of_four_gpus():
    args = _launch_args("--config_file", str(CONFIGS / "multinode_2x4gpu.yaml"), "--machine_rank", "1",
                        "--main_process_ip", "10.1.2.3")
    assert (args.num_machines, args.num_processes, args.machine_rank) == (2, 8, 1)
    assert args.main_process_ip == "10.1.2.3" and args.main_process_port == 29500 and args.multi_gpu
