"""The pipeline's cluster: ``--search-only`` helpers on the other hosts of its
``distributed_config.json``, started over ssh by the main process (docs/cluster.md).

* :mod:`step5.cluster.nodes` — the hosts, read and checked;
* :mod:`step5.cluster.remote` — the helper's command line, quoted, and the ssh around it;
* :mod:`step5.cluster.supervision` — what an ended helper's host comes to (pure logic);
* :mod:`step5.cluster.fleet` — the helpers' processes, logs and stopping.
"""
from step5.cluster.fleet import HelperFleet, NoFleet, helper_fleet
from step5.cluster.nodes import ClusterNode, load_cluster_config, parse_cluster_config, split_local, storage_is_loopback
from step5.cluster.remote import helper_arguments, remote_command, ssh_command
from step5.cluster.supervision import HelperAction, HelperRecord

__all__ = [
    "ClusterNode", "HelperAction", "HelperFleet", "HelperRecord", "NoFleet", "helper_arguments", "helper_fleet",
    "load_cluster_config", "parse_cluster_config", "remote_command", "split_local", "ssh_command",
    "storage_is_loopback",
]
