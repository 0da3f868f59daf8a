"""The live dashboard: a loopback web page fed from the bus (``fedbus dashboard``, ``fedbus run
--dashboard PORT``). Standard library only: asyncio HTTP and server-sent events."""

from fedbus.dashboard.server import dashboard_socket, serve_dashboard

__all__ = ["dashboard_socket", "serve_dashboard"]
