"""The link to the vantage6 server: REST, socket.io events, and the payload models.

Nothing else in fednode speaks the server's protocol; the run lifecycle talks to it through
:class:`~node.server.rest.ServerClient` and receives its events through
:class:`~node.server.socket.SocketLink`.
"""
