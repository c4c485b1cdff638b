"""Who holds a path's ports (``harness.observe.owners``), read from this machine's own
/proc: sockets this test opens, looked up by their inodes."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import numpy as np
import pytest

from harness.observe.owners import OWNERS_TOP, OwnerIndex, container_of


@pytest.fixture
def connections() -> Iterator[list[socket.socket]]:
    """Three loopback connections of this process: their client ends."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    clients, accepted = [], []
    try:
        for _ in range(3):
            clients.append(socket.create_connection(server.getsockname()))
            accepted.append(server.accept()[0])
        yield clients
    finally:
        for s in (*clients, *accepted, server):
            s.close()


def _inode(s: socket.socket) -> int:
    return os.fstat(s.fileno()).st_ino


def test_a_socket_of_this_process_is_found_by_its_inode(connections: list[socket.socket]) -> None:
    index = OwnerIndex()
    inodes = np.array([_inode(s) for s in connections] + [0, 2**31 + 12345], np.uint64)
    pids = index.pids(inodes)
    assert pids.tolist() == [os.getpid()] * 3 + [0, 0]  # TIME_WAIT (0) and unknown: none
    assert index.reads == 1


def test_owners_group_a_paths_sockets_by_process_most_first(
    connections: list[socket.socket],
) -> None:
    """Path 0: three sockets of this process and one in TIME_WAIT; path 1: one socket
    nobody holds that the index knows."""
    inodes = np.array([_inode(s) for s in connections] + [0, 2**31 + 7], np.uint64)
    path_of_row = np.array([0, 0, 0, 0, 1])
    owners, unattributed = OwnerIndex().owners(path_of_row, inodes, paths=2)
    me = owners[0][0]
    assert (me.pid, me.ports) == (os.getpid(), 3) and len(owners[0]) == 1
    with open(f"/proc/{os.getpid()}/comm") as f:
        assert me.comm == f.read().strip()
    assert me.cgroup  # every process has one
    assert owners[1] == []
    assert unattributed.tolist() == [1, 1]
    assert OWNERS_TOP >= 1


def test_the_index_is_read_again_only_when_stale_and_not_before_refresh(
    connections: list[socket.socket],
) -> None:
    now = [0.0]
    index = OwnerIndex(refresh_s=5.0, clock=lambda: now[0])
    known = np.array([_inode(connections[0])], np.uint64)
    index.pids(known)
    assert index.reads == 1
    index.pids(known)  # all known: no read
    late = socket.create_connection(connections[0].getpeername())  # a socket made since
    try:
        fresh = np.array([_inode(late)], np.uint64)
        assert index.pids(fresh).tolist() == [0]  # unknown, but read 0 s ago: not again
        assert index.reads == 1
        now[0] = 5.0
        assert index.pids(fresh).tolist() == [os.getpid()]
        assert index.reads == 2
    finally:
        late.close()


@pytest.mark.parametrize(
    ("cgroup", "container"),
    [
        ("/system.slice/docker-" + "a" * 64 + ".scope", "a" * 12),
        ("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1f2e3d4c_5b6a_"
         "4789_8a9b_0c1d2e3f4a5b.slice/cri-containerd-" + "b" * 64 + ".scope", "b" * 12),
        ("/kubepods/besteffort/pod1f2e3d4c-5b6a-4789-8a9b-0c1d2e3f4a5b/" + "c" * 64, "c" * 12),
        ("/kubepods.slice/kubepods-pod1f2e3d4c_5b6a_4789_8a9b_0c1d2e3f4a5b.slice",
         "pod 1f2e3d4c-5b6a-4789-8a9b-0c1d2e3f4a5b"),
        ("/system.slice/nginx.service", None),
        ("/user.slice/user-1000.slice/session-2.scope", None),
        ("/", None),
    ],
)  # fmt: skip
def test_the_container_or_pod_a_cgroup_names(cgroup: str, container: str | None) -> None:
    assert container_of(cgroup) == container
