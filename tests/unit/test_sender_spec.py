"""From the head's SourceTransfer to the sender's Spec, on the node."""

from __future__ import annotations

import pytest

from cm.node.launch import LaunchError
from cm.node.sync import sender_spec
from cm.protocol import SourceTransfer
from cm.transfer.spec import Spec

TRANSFER = dict(transfer_id="5.1", token="ab" * 16, src_path="/a", dst_host="h", dst_port=7001, rank=0, nranks=1,
                policy="size-balanced", delete=True, dry_run=False, checksum=False, exclude=["*.tmp"], bwlimit=None,
                streams=4, chunk_size=64 << 20, owners=False)


def test_a_tcp_transfer_becomes_the_senders_spec_under_the_nodes_data_root():
    spec = Spec.from_dict(sender_spec(SourceTransfer(**TRANSFER, transport="tcp"), "/data/cpu"))
    assert (spec.src_root, spec.src_path, spec.delete, spec.exclude) == ("/data/cpu", "/a", True, ("*.tmp",))


def test_a_transfer_asking_for_rdma_is_refused_by_the_node_not_run_over_tcp():
    with pytest.raises(LaunchError, match="--transport rdma is not available"):
        sender_spec(SourceTransfer(**TRANSFER, transport="rdma"), "/data/cpu")
