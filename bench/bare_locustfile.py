"""A bare Locust user that only connects and closes: the yardstick for eph's Locust engine."""

import os
import socket
import struct
import time

from locust import User, constant, events, task

HOST, PORT = os.environ["BENCH_TARGET"].rsplit(":", 1)
LINGER = struct.pack("ii", 1, 0)


class BareUser(User):
    wait_time = constant(0)

    @task
    def churn(self) -> None:
        t0 = time.perf_counter()
        sock = socket.socket()
        sock.connect((HOST, int(PORT)))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER)
        sock.close()
        events.request.fire(
            request_type="TCP",
            name="bare",
            response_time=(time.perf_counter() - t0) * 1000,
            response_length=0,
            exception=None,
            context={},
        )
