"""--dask addresses: checked by syntax before anything is created; a service that is no Dask scheduler is one line."""

import socket
import threading

import pytest

from unetkit.distributed import check_dask_address
from unetkit.errors import InputError


@pytest.mark.parametrize("address", ["local:1", "local:8", "tcp://10.0.0.5:8786", "tcp://node-7.cluster:8786",
                                     "tls://[::1]:8786", " tcp://127.0.0.1:1 "])
def test_usable_addresses_pass(address):
    assert check_dask_address(address) == address.strip()


@pytest.mark.parametrize("address", ["banana", "local:0", "local:", "local:two", "tcp://host", "tcp://:8786",
                                     "http://127.0.0.1:8000", "tcp://host:99999", "127.0.0.1:8786", ""])
def test_unusable_addresses_are_one_line_naming_them(address):
    with pytest.raises(InputError) as info:
        check_dask_address(address)
    message = str(info.value)
    assert message.startswith(f"--dask {address!r}: not a Dask address; give local:N") and "\n" not in message


def _server(reply: bytes | None):
    """A TCP service on localhost that is no Dask scheduler: it answers `reply` (then hangs up) or nothing."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    held = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            if reply is None:
                held.append(conn)  # accepted, never answered, like a web server waiting for a request line
            else:
                conn.recv(1024)
                conn.sendall(reply)
                conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return listener, held


@pytest.mark.parametrize("reply", [None, b"HTTP/1.0 400 Bad Request\r\nContent-Length: 0\r\n\r\n"])
def test_connect_to_a_service_that_is_no_scheduler_is_one_line(monkeypatch, reply):
    pytest.importorskip("distributed")
    from unetkit import distributed

    monkeypatch.setattr(distributed, "CONNECT_TIMEOUT", "1s")
    listener, held = _server(reply)
    address = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
    try:
        with pytest.raises(InputError) as info:
            distributed.connect(address)
    finally:
        listener.close()
        for conn in held:
            conn.close()
    message = str(info.value)
    assert message.startswith(f"--dask {address}: no Dask scheduler answered there within 1 s (") and "\n" not in message
    with pytest.raises(InputError, match="not a Dask address"):
        distributed.connect("banana")
