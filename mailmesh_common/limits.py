"""Limits both SMTP servers (svc_ingest's MX, svc_send's submission) put on their sessions:
concurrent connections per client (an IPv6 client by its /64, see address.client_key), and how
often a session may send the commands that move no mail."""

from __future__ import annotations

from mailmesh_common.address import client_key

# Commands that move no mail, per session (aiosmtpd's command_call_limit: it answers 421 4.7.0 and
# closes past these); RSET is not limited: clients that keep a connection open send one before
# every message
JUNK_COMMAND_LIMITS = {"NOOP": 100, "VRFY": 100, "EXPN": 100, "HELP": 100, "HELO": 50, "EHLO": 50,
                       "*": 2**62}


class ConnectionLimiter:
    """Counts open connections per IP."""

    def __init__(self, max_per_ip: int) -> None:
        self.max_per_ip = max_per_ip
        self._open: dict[str, int] = {}

    def acquire(self, ip: str) -> bool:
        """Takes a slot for ip; False (and nothing taken) when ip is at its limit."""
        ip = client_key(ip)
        n = self._open.get(ip, 0)
        if self.max_per_ip and n >= self.max_per_ip:
            return False
        self._open[ip] = n + 1
        return True

    def release(self, ip: str) -> None:
        ip = client_key(ip)
        n = self._open.get(ip, 0) - 1
        if n > 0:
            self._open[ip] = n
        else:
            self._open.pop(ip, None)

    def open_connections(self, ip: str) -> int:
        return self._open.get(client_key(ip), 0)


__all__ = ["JUNK_COMMAND_LIMITS", "ConnectionLimiter"]
