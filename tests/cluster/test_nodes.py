"""distributed_config.json as the pipeline writes it: its nodes read and checked, the main
host told apart from the helper hosts, every value that could reach ssh unsafely refused."""
from __future__ import annotations

import json

import pytest

from step5.cluster import (
    ClusterNode,
    load_cluster_config,
    parse_cluster_config,
    split_local,
    storage_warnings,
)
from step5.errors import DataError

SOURCE = "site/distributed_config.json"


def node(hostname: str, **overrides) -> dict:
    raw = {"hostname": hostname, "username": "michael", "gpu_count": 8, "gpu_type": "RX 6600",
           "script_path": "/home/michael/distributed_prng_analysis", "python_env": "/home/michael/rocm_env/bin/python",
           "max_concurrent_script_jobs": 8, "use_ramdisk": True}  # keys of other steps: left alone
    raw.update(overrides)
    return raw


def pipeline_config() -> dict:
    """The pipeline's layout: the CUDA coordinator (localhost) and three ROCm rigs."""
    coordinator = node("localhost", gpu_count=2, gpu_type="RTX 3080 Ti", python_env="/home/michael/venvs/torch/bin/python")
    return {"nodes": [coordinator, node("192.168.3.120"), node("192.168.3.154"), node("192.168.3.162")],
            "sieve_defaults": {"window_size": 512}}


def test_the_pipelines_four_hosts_are_read_and_the_coordinator_is_this_host(tmp_path):
    path = tmp_path / "distributed_config.json"
    path.write_text(json.dumps(pipeline_config()))
    nodes = load_cluster_config(path)
    assert [n.hostname for n in nodes] == ["localhost", "192.168.3.120", "192.168.3.154", "192.168.3.162"]
    assert nodes[1] == ClusterNode("192.168.3.120", "michael", 8, "RX 6600", "/home/michael/distributed_prng_analysis",
                                   "/home/michael/rocm_env/bin/python")
    assert nodes[1].destination == "michael@192.168.3.120"
    local, remote = split_local(nodes)
    assert [n.hostname for n in local] == ["localhost"] and len(remote) == 3


def test_this_hosts_own_name_is_local_too():
    nodes = parse_cluster_config({"nodes": [node("Zeus"), node("rig-1")]}, SOURCE)
    local, remote = split_local(nodes, names={"zeus", "localhost"})
    assert [n.hostname for n in local] == ["Zeus"] and [n.hostname for n in remote] == ["rig-1"]


def test_a_node_without_a_user_uses_sshs_default():
    (n,) = parse_cluster_config({"nodes": [node("rig-1", username=None)]}, SOURCE)
    assert n.destination == "rig-1"


@pytest.mark.parametrize("raw, message", [
    ([], "must be a JSON object with a `nodes` array"),
    ({"nodes": []}, "`nodes` must be a non-empty array"),
    ({"hosts": [node("a")]}, "`nodes` must be a non-empty array"),
    ({"nodes": ["rig-1"]}, "nodes[0] must be an object"),
    ({"nodes": [node("")]}, "nodes[0].hostname must be a non-empty string"),
    ({"nodes": [node("-oProxyCommand=touch /tmp/x")]}, "nodes[0].hostname '-oProxyCommand=touch /tmp/x' is not a host"),
    ({"nodes": [node("rig 1")]}, "nodes[0].hostname 'rig 1' is not a host"),
    ({"nodes": [node("rig-1", username="-l root")]}, "nodes[0].username '-l root' is not a user name"),
    ({"nodes": [node("rig-1", username="a@b")]}, "is not a user name"),
    ({"nodes": [node("rig-1", gpu_count=-1)]}, "nodes[0].gpu_count must be a non-negative int"),
    ({"nodes": [node("rig-1", gpu_count=True)]}, "nodes[0].gpu_count must be a non-negative int"),
    ({"nodes": [node("rig-1", script_path="relative/dir")]}, "nodes[0].script_path must be an absolute path"),
    ({"nodes": [node("rig-1", python_env=None)]}, "nodes[0].python_env must be a non-empty string"),
    ({"nodes": [node("rig-1", python_env="/bin/py\nrm -rf /")]}, "nodes[0].python_env holds a control character"),
    ({"nodes": [node("rig-1", python_env=" /home/m/env/bin/python")]},
     "nodes[0].python_env ' /home/m/env/bin/python' has whitespace at its start or end"),
    ({"nodes": [node("rig-1", script_path="/home/m/step5 ")]},
     "nodes[0].script_path '/home/m/step5 ' has whitespace at its start or end"),
    ({"nodes": [node("a"), node("b"), node("A")]}, "nodes[2].hostname 'A' is listed twice (also nodes[0])"),
])
def test_a_malformed_config_is_a_data_error_naming_the_file_node_and_key(raw, message):
    with pytest.raises(DataError) as info:
        parse_cluster_config(raw, SOURCE)
    assert str(info.value).startswith(SOURCE) and message in str(info.value)


def test_a_missing_or_broken_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="cluster config file not found"):
        load_cluster_config(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{nodes: ")
    with pytest.raises(DataError, match="is not valid JSON"):
        load_cluster_config(tmp_path / "bad.json")


@pytest.mark.parametrize("url, loopback, password", [
    ("postgresql+psycopg://step5:pw@127.0.0.1:5432/s5", True, True),
    ("postgresql+psycopg://step5@localhost/s5", True, False),
    ("postgresql+psycopg://step5@/s5", True, False),  # a local socket
    ("postgresql+psycopg://step5:pw@192.168.3.10/s5", False, True),
    ("postgresql+psycopg://step5@zeus.lan/s5", False, False),  # the password in ~/.pgpass: nothing to say
])
def test_a_storage_url_on_loopback_or_with_a_password_is_warned_about(url, loopback, password):
    warnings = storage_warnings(url)
    assert [w for w in warnings if "names this host as the database" in w] == warnings[:loopback]
    assert [w for w in warnings if "carries a password" in w and "~/.pgpass" in w] == warnings[loopback:]
    assert len(warnings) == loopback + password
    assert not any(":pw@" in w for w in warnings)  # shown as ***


def test_a_node_listed_by_one_of_this_hosts_addresses_is_this_host():
    import psutil

    address = next(a.address for addrs in psutil.net_if_addrs().values() for a in addrs
                   if a.family.name == "AF_INET")
    nodes = parse_cluster_config({"nodes": [node(address), node("rig-1")]}, SOURCE)
    local, remote = split_local(nodes)
    assert [n.hostname for n in local] == [address] and [n.hostname for n in remote] == ["rig-1"]


def test_an_ipv6_address_in_brackets_is_given_to_ssh_bare():
    """ssh cannot resolve "[2001:db8::5]" (the host would be named unreachable); bare it can."""
    from step5.cluster import ssh_command

    (n,) = parse_cluster_config({"nodes": [node("[2001:db8::5]")]}, SOURCE)
    assert n.hostname == "2001:db8::5" and n.destination == "michael@2001:db8::5"
    assert ssh_command(n, "true")[-2] == "michael@2001:db8::5"


def test_one_address_written_two_ways_is_listed_twice():
    with pytest.raises(DataError, match=r"nodes\[1\].hostname '2001:DB8:0::5' is listed twice \(also nodes\[0\]\)"):
        parse_cluster_config({"nodes": [node("[2001:db8::5]"), node("2001:DB8:0::5")]}, SOURCE)


@pytest.mark.parametrize("hostname", ["[::1]", "127.0.1.1", "127.0.0.2", "::ffff:127.0.0.1", "0:0:0:0:0:0:0:1"])
def test_every_loopback_address_is_this_host(hostname):
    """A helper started over ssh on this very host would compete with the main process for its GPUs."""
    nodes = parse_cluster_config({"nodes": [node(hostname), node("rig-1")]}, SOURCE)
    local, remote = split_local(nodes, names={"zeus", "localhost"})
    assert len(local) == 1 and [n.hostname for n in remote] == ["rig-1"]
