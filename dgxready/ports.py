import socket


def free_port(address: str = "127.0.0.1") -> int:
    """A port the kernel just had free on `address` (for servers the kit starts itself)."""
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]
